"""The PyTorch reference's timings on this project's CPU machine type, read from
``../shared/perf/small/reference_run*.json`` (raw runs; ``REFERENCE_TIMINGS.md`` beside them describes the setup).
One home for every benchmark that prints a ratio to the reference."""
from __future__ import annotations

import json
import pathlib
import statistics
from typing import Optional

PERF = pathlib.Path(__file__).resolve().parents[2] / "shared" / "perf" / "small"


def runs(folder: pathlib.Path = PERF) -> list[dict]:
    """Every reference run found (empty when the shared folder is absent)."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("reference_run*.json"))]


def value(*keys: str, folder: pathlib.Path = PERF) -> Optional[float]:
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


def reference_cpu(folder: pathlib.Path = PERF) -> Optional[str]:
    rs = runs(folder)
    return rs[0].get("env", {}).get("cpu_model", "").split(":")[-1].strip() or None if rs else None


def same_cpu(folder: pathlib.Path = PERF) -> Optional[bool]:
    """Whether this machine's CPU model is the one the reference was timed on (None: unknown)."""
    ref = reference_cpu(folder)
    return None if ref is None else ref == cpu_model()


def describe(folder: pathlib.Path = PERF) -> str:
    rs = runs(folder)
    if not rs:
        return "reference timings: not found (../shared/perf/small/reference_run*.json)"
    env = rs[0].get("env", {})
    text = (f"reference: {len(rs)} run(s) of the PyTorch reference ({env.get('torch', '?')}, "
            f"{env.get('threads', '?')} threads) on {reference_cpu(folder)}, mean of the runs' medians; this machine: "
            f"{cpu_model()}")
    if same_cpu(folder) is False:
        text += (" -- ANOTHER CPU: the ratios compare different machines (time the reference here with "
                 "../shared/perf/refbench/ before drawing conclusions)")
    return text
