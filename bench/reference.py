"""The PyTorch reference's timings on this project's CPU machine types, read from raw runs
(``reference_run*.json``): ``../shared/perf/small/`` (the Xeon runs; ``REFERENCE_TIMINGS.md`` beside them describes
the setup) and ``bench/reference_runs/*/`` (runs timed on other machine types with ``../shared/perf/refbench/``,
each folder's README says when and how). By default a ratio divides by the runs of THIS machine's CPU model when a
folder has them, else by the shared runs (and ``describe`` warns that the CPUs differ).
One home for every benchmark that prints a ratio to the reference."""
from __future__ import annotations

import json
import pathlib
import statistics
from typing import Optional

PERF = pathlib.Path(__file__).resolve().parents[2] / "shared" / "perf" / "small"
LOCAL = pathlib.Path(__file__).resolve().parent / "reference_runs"


def runs(folder: Optional[pathlib.Path] = None) -> list[dict]:
    """Every reference run found in ``folder`` (default :func:`default_folder`; empty when absent)."""
    folder = default_folder() if folder is None else folder
    return [json.loads(p.read_text()) for p in sorted(folder.glob("reference_run*.json"))]


def _run_cpu(folder: pathlib.Path) -> Optional[str]:
    for p in sorted(folder.glob("reference_run*.json")):
        return json.loads(p.read_text()).get("env", {}).get("cpu_model", "").split(":")[-1].strip() or None
    return None


def default_folder(candidates: Optional[list] = None) -> pathlib.Path:
    """The first folder of reference runs timed on this machine's CPU model (the shared runs first, then
    ``bench/reference_runs/*`` in name order); the shared folder when none is."""
    if candidates is None:
        candidates = [PERF] + (sorted(p for p in LOCAL.iterdir() if p.is_dir()) if LOCAL.is_dir() else [])
    here = cpu_model()
    for folder in candidates:
        if _run_cpu(folder) == here:
            return folder
    return PERF


def value(*keys: str, folder: Optional[pathlib.Path] = None) -> Optional[float]:
    """The mean over the runs of the entry at ``keys`` (a ``median_ms`` of a timing, or a number), None if no run
    has it. E.g. ``value("tts_step_b1", "whole_step")`` (ms), ``value("tts_loop_50_b1", "latent_frames_per_s")``."""
    got = []
    for run in runs(folder):
        x = run
        for k in keys:
            x = x.get(k) if isinstance(x, dict) else None
        if isinstance(x, dict):
            x = x.get("median_ms")
        if isinstance(x, (int, float)):
            got.append(float(x))
    return statistics.mean(got) if got else None


def cpu_model() -> str:
    """This machine's CPU model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def reference_cpu(folder: Optional[pathlib.Path] = None) -> Optional[str]:
    return _run_cpu(default_folder() if folder is None else folder)


def same_cpu(folder: Optional[pathlib.Path] = None) -> Optional[bool]:
    """Whether this machine's CPU model is the one the reference was timed on (None: unknown)."""
    ref = reference_cpu(folder)
    return None if ref is None else ref == cpu_model()


def describe(folder: Optional[pathlib.Path] = None) -> str:
    folder = default_folder() if folder is None else folder
    rs = runs(folder)
    if not rs:
        return "reference timings: not found (../shared/perf/small/reference_run*.json)"
    env = rs[0].get("env", {})
    where = folder.name if folder.parent == LOCAL else "../shared/perf/small"
    text = (f"reference: {len(rs)} run(s) of the PyTorch reference ({env.get('torch', '?')}, "
            f"{env.get('threads', '?')} threads) on {reference_cpu(folder)} ({where}), mean of the runs' medians; "
            f"this machine: {cpu_model()}")
    if same_cpu(folder) is False:
        text += (" -- ANOTHER CPU: the ratios compare different machines (time the reference here with "
                 "../shared/perf/refbench/ before drawing conclusions)")
    return text
