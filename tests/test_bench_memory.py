"""bench/memory.py: the max-batch search (pure) and one small run on the tiny model (JSON keys; a batch too large
for the stated memory is reported as not fitting). The official-size run is the benchmark itself (minutes)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "bench" / "memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_search_finds_the_largest_power_of_two_that_fits():
    bench = _bench()
    cap, margin = 1000, 0.1  # usable: 900
    for fixed, per_row in ((100, 7), (10, 1), (500, 50), (850, 60)):
        peak = lambda b: fixed + per_row * b  # noqa: E731
        measured = {b: peak(b) for b in (1, 8)}
        calls = []

        def measure(b):
            calls.append(b)
            return peak(b)

        best, new = bench.search_max_batch(measure, measured, cap, margin, max_batch=1024)
        want = max((1 << i for i in range(11) if peak(1 << i) <= 900), default=0)
        assert best == want, (fixed, per_row, best, want)
        assert new == calls and len(calls) <= 4  # the line through the measured peaks lands next to the boundary
        if best:
            assert peak(best) <= 900 and (best == 1024 or measured[2 * best] > 900)  # confirmed on both sides
    # batch 1 already too large: nothing fits
    best, _ = bench.search_max_batch(lambda b: 10_000 * b, {1: 10_000}, cap, margin, 1024)
    assert best == 0


def test_tiny_run_writes_rows_and_rejects_a_batch_too_large(tmp_path):
    out = tmp_path / "mem.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    # tiny model, tiny workload, batch 64 only (one compile, ~13 s of CPU): its ~10 MB peak does not fit 5 MiB
    cmd = [sys.executable, str(REPO / "bench" / "memory.py"), "--tiny", "--targets", "1xH100", "--batches", "64",
           "--no-search", "--no-train", "--text", "8", "--prompt-patches", "2", "--max-patches", "8",
           "--flow-steps", "1", "--memory-gib", str(5 / 1024), "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Will it fit?" in proc.stdout and "max B" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1
    r = rows[0]
    for key in ("target", "devices", "param_bytes_per_device", "peak_bytes_per_device", "fits", "max_batch",
                "kv_cache_bytes_per_device", "param_bytes_per_device_float32", "usable_bytes_per_device"):
        assert key in r, key
    assert r["target"] == "1xH100" and r["devices"] == 1
    assert r["peak_bytes_per_device"] > r["usable_bytes_per_device"] == int(0.9 * 5 * 2**20)
    assert r["fits"] is False and r["max_batch"] == 0
    assert r["param_bytes_per_device_float32"] > r["param_bytes_per_device"] > 0
    t = r["tts"]["64"]
    assert t["peak"] == max(t["init_peak"], t["run_peak"]) > r["param_bytes_per_device"]
    kv = r["kv_cache_bytes_per_device"]["64"]
    assert kv["llm"] > 0 and kv["semantic"] > 0
