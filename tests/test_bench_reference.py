"""bench/reference.py, the one home of the PyTorch reference's timings for every bench ratio: ``value`` is the mean of
the raw runs' medians (checked against the JSON files read directly), None for a key no run has, and ``describe``
names the CPU the reference ran on. Plus bench/peak.py's pure helpers (the cost-analysis forms, the achieved rate).
Nothing is compiled."""
from __future__ import annotations

import json
import statistics
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
try:
    import peak  # noqa: E402
    import reference  # noqa: E402
finally:  # bench/ holds generate.py, train.py, ...: keep it from shadowing other modules of the session
    sys.path.remove(str(REPO / "bench"))

RUNS = sorted(reference.PERF.glob("reference_run*.json"))
needs_runs = pytest.mark.skipif(len(RUNS) < 2, reason=f"reference runs not found in {reference.PERF}")


def _raw(path):
    with open(path) as f:
        return json.load(f)


@needs_runs
def test_value_is_the_mean_of_the_runs_medians():
    raw = [_raw(p) for p in RUNS]
    # a timing dict (median_ms) nested two deep, one one deep, and the headline encode->decode at batch 8
    for keys in (("tts_step_b1", "flow_sample"), ("vae_10s", "b8", "encode_then_decode"),
                 ("llm_prefill_200_b1",)):
        medians = []
        for run in raw:
            x = run
            for k in keys:
                x = x[k]
            medians.append(x["median_ms"] if isinstance(x, dict) else x)
        assert len(medians) == len(RUNS) >= 2
        assert reference.value(*keys, folder=reference.PERF) == pytest.approx(statistics.mean(medians), rel=1e-12), keys
    # the two runs differ, so the mean is not just one run's figure
    b1 = [r["vae_10s"]["b1"]["encode_then_decode"]["median_ms"] for r in raw]
    assert b1[0] != b1[1]
    assert min(b1) < reference.value("vae_10s", "b1", "encode_then_decode", folder=reference.PERF) < max(b1)


@needs_runs
def test_missing_key_is_none():
    assert reference.value("no_such_timing") is None
    assert reference.value("vae_10s", "b3", "decode") is None  # no batch 3
    assert reference.value("vae_10s", "b1", "decode", "deeper") is None  # past a leaf


def test_value_averages_only_the_runs_that_have_the_key(tmp_path):
    (tmp_path / "reference_run1.json").write_text(json.dumps({"a": {"median_ms": 10.0}, "n": 3}))
    (tmp_path / "reference_run2.json").write_text(json.dumps({"a": {"median_ms": 20.0}, "b": {"median_ms": 7.0}}))
    assert reference.value("a", folder=tmp_path) == 15.0
    assert reference.value("b", folder=tmp_path) == 7.0
    assert reference.value("n", folder=tmp_path) == 3.0  # a plain number
    assert reference.value("a", folder=tmp_path / "absent") is None
    assert "not found" in reference.describe(tmp_path / "absent")


@needs_runs
def test_describe_names_the_reference_cpu():
    cpu = _raw(RUNS[0])["env"]["cpu_model"].split(":")[-1].strip()
    assert cpu  # e.g. "Intel(R) Xeon(R) Processor"
    text = reference.describe(reference.PERF)
    assert cpu in text and reference.cpu_model() in text
    assert f"{len(RUNS)} run(s)" in text
    # the warning appears exactly when this machine's CPU differs from the reference's
    assert ("ANOTHER CPU" in text) == (cpu != reference.cpu_model())
    assert reference.same_cpu(reference.PERF) == (cpu == reference.cpu_model())


def _fake_runs(folder, cpu, ms):
    folder.mkdir()
    for i in (1, 2):
        (folder / f"reference_run{i}.json").write_text(json.dumps(
            {"env": {"cpu_model": cpu, "torch": "x", "threads": 2}, "tts_step_b1": {"whole_step": {"median_ms": ms}}}))
    return folder


def test_default_folder_is_the_runs_of_this_cpu(tmp_path):
    other = _fake_runs(tmp_path / "other", "Some Other CPU 9000", 50.0)
    mine = _fake_runs(tmp_path / "mine", reference.cpu_model(), 80.0)
    assert reference.default_folder([other, mine]) == mine
    assert reference.value("tts_step_b1", "whole_step", folder=reference.default_folder([other, mine])) == 80.0
    assert reference.same_cpu(mine) is True and reference.same_cpu(other) is False
    assert "ANOTHER CPU" not in reference.describe(mine) and "ANOTHER CPU" in reference.describe(other)
    # no folder of this CPU: the shared runs (whatever their CPU), as before
    assert reference.default_folder([other]) == reference.PERF


def test_committed_runs_hold_what_the_benches_read():
    # bench/reference_runs/*: raw runs of the reference on other machine types; every key a bench divides by
    folders = sorted(p for p in reference.LOCAL.iterdir() if p.is_dir())
    assert folders
    for folder in folders:
        assert (folder / "README.md").is_file()
        assert len(reference.runs(folder)) >= 2 and reference.reference_cpu(folder)
        for keys in (("tts_step_b1", "whole_step"), ("tts_step_b1", "flow_sample"), ("tts_step_b1", "llm"),
                     ("tts_loop_50_b1", "latent_frames_per_s"), ("llm_prefill_200_b1",),
                     ("vae_10s", "b1", "encode_then_decode"), ("vae_10s", "b8", "encode_then_decode")):
            assert reference.value(*keys, folder=folder) > 0, (folder, keys)


def test_peak_helpers_read_both_cost_analysis_forms():
    class Compiled:
        def __init__(self, ca):
            self.ca = ca

        def cost_analysis(self):
            return self.ca

    assert peak.xla_flops(Compiled({"flops": 8.0, "bytes accessed": 1.0})) == 8.0  # a dict (recent jax)
    assert peak.xla_flops(Compiled([{"flops": 8.0}, {"flops": 2.0}])) == 10.0  # a list of dicts (older jax)
    assert peak.xla_flops(Compiled(None)) is None
    a = peak.achieved(4e9, 0.5, 16.0)
    assert a == {"gflops": 4.0, "gflop_s": 8.0, "pct_of_peak": 50.0}
    assert peak.achieved(None, 0.5, 16.0)["gflop_s"] is None and peak.fmt(None) == "n/a"
