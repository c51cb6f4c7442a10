"""Preemption and crashes, with real processes and real signals (train.py stage lm, tiny config, CPU):

* one run of STEPS straight (``straight``) against one run that is SIGKILLed while an async checkpoint save is in
  flight, resumed, SIGTERMed, and resumed again to STEPS (``interrupted``): the killed save leaves the previous
  checkpoint restorable, SIGTERM saves and exits 0, and the two runs have the same loss at every step and the same
  exported params (same data order, same noise);
* the manifest of both runs is full of bad records (missing, empty, truncated, non-audio, NaN samples, 0.01 s;
  broken JSON, missing fields, wrong types, non-UTF-8 bytes, a NaN duration) next to audio that must be resampled
  and downmixed (8 / 44.1 / 48 kHz, stereo, 5.1, int and float PCM, silence): bad lines are reported by line number,
  bad rows are skipped and counted (``bad_records``), no update is skipped, training goes on;
* ``sample.py tts`` killed (SIGKILL) in the middle of a job and re-run: the re-run completes the rest without
  redoing or touching the finished outputs, and leaves no temporary files.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, SHARED_DATA, save_tiny_checkpoint, tiny_uniaudio
from unitok_jax.convert import load

STEPS = 9  # 3 epochs of 3 batches of 4 rows
SENTENCES = ["he hoped there would be stew for dinner", "turnips and carrots and bruised potatoes",
             "and fat mutton pieces to be ladled out", "in thick peppered flour fattened sauce",
             "stuff it into you his belly counselled him", "after early nightfall the yellow lamps",
             "would light up here and there the squalid quarter", "of the brothels hello bertie"]


def _speech(seconds: float = 1.5, offset: int = 0) -> np.ndarray:
    wave, sr = sf.read(SHARED_DATA / "librispeech-1089-134686-0000.flac", dtype="float32")
    assert sr == 16000
    n = int(seconds * sr)
    return wave[offset * n : (offset + 1) * n]


def _resample(x: np.ndarray, sr: int) -> np.ndarray:  # test-side linear interpolation (not the library's soxr)
    t = np.arange(int(len(x) * sr / 16000)) * 16000 / sr
    return np.interp(t, np.arange(len(x)), x).astype(np.float32)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """12 records whose headers read (9 usable, 3 bad at load time) + 9 lines refused when the manifest is read."""
    root = tmp_path_factory.mktemp("bad_corpus")
    lines = []

    def rec(i, audio, **kw):
        lines.append(json.dumps({"id": f"r{i}", "audio": audio, "text": SENTENCES[i % 8], "speaker": "1089", **kw}))

    for i in range(4):  # plain 16 kHz speech
        sf.write(root / f"s{i}.wav", _speech(offset=i), 16000)
        rec(i, f"s{i}.wav")
    x = _speech(offset=4)
    sf.write(root / "st44.wav", np.stack([_resample(x, 44100), 0.5 * _resample(x, 44100)], 1), 44100,
             subtype="PCM_16")  # stereo, 44.1 kHz, int16
    rec(4, "st44.wav")
    sf.write(root / "six48.wav", np.repeat(_resample(x, 48000)[:, None], 6, 1) * 0.5, 48000,
             subtype="FLOAT")  # 5.1, 48 kHz, float
    rec(5, "six48.wav")
    sf.write(root / "nb8.wav", _resample(x, 8000), 8000, subtype="PCM_32")  # 8 kHz, int32
    rec(6, "nb8.wav")
    sf.write(root / "silence.wav", np.zeros(24000, np.float32), 16000)
    rec(7, "silence.wav")
    # loadable header, bad at load time (counted in bad_records every time they come up)
    sf.write(root / "short.wav", x[:160], 16000)  # 0.01 s: shorter than one 0.1 s patch
    rec(8, "short.wav")
    sf.write(root / "trunc.wav", x, 16000)
    data = (root / "trunc.wav").read_bytes()
    (root / "trunc.wav").write_bytes(data[: len(data) // 2])
    rec(9, "trunc.wav")
    y = x.copy()
    y[100] = np.nan
    sf.write(root / "nan.wav", y, 16000, subtype="FLOAT")
    rec(10, "nan.wav")
    sf.write(root / "s11.wav", _speech(offset=5), 16000)
    rec(11, "s11.wav")
    # refused when the manifest is read (reported with the line number, never trained on)
    (root / "empty.wav").write_bytes(b"")
    (root / "notaudio.wav").write_text("this is not audio\n" * 20)
    bad = [json.dumps({"id": "m1", "audio": "missing.wav", "text": "x", "speaker": "1"}),
           json.dumps({"id": "m2", "audio": "empty.wav", "text": "x", "speaker": "1"}),
           json.dumps({"id": "m3", "audio": "notaudio.wav", "text": "x", "speaker": "1"}),
           '{"id": "m4", "audio": "s0.wav", "text": "broken',
           json.dumps({"id": "m5", "audio": "s0.wav", "speaker": "1"}),
           json.dumps({"id": "m6", "audio": 7, "text": "x", "speaker": "1"}),
           json.dumps({"id": "m7", "audio": "s0.wav", "text": "x", "speaker": "1", "duration": float("nan")}),
           json.dumps({"id": "r0", "audio": "s1.wav", "text": "x", "speaker": "1"})]  # duplicate id
    with open(root / "m.jsonl", "wb") as f:
        for line in lines[:6] + bad[:5]:
            f.write(line.encode() + b"\n")
        f.write(b'{"id": "m9", "audio": "s0.wav", "text": "caf\xe9", "speaker": "1"}\n')
        for line in lines[6:] + bad[5:8]:
            f.write(line.encode() + b"\n")
    expect = {7: "missing.wav", 8: "empty.wav", 9: "notaudio.wav", 10: "not valid JSON", 11: "missing field 'text'",
              12: "not valid UTF-8", 19: "'audio' must be str", 20: "'duration' must be a finite number",
              21: "duplicate id 'r0'"}
    return str(root / "m.jsonl"), expect


def _cmd(workdir, manifest, *extra):
    return [sys.executable, "train.py", "--config", "configs/lm.py:tiny", "--workdir", str(workdir),
            f"--config.data.manifest={manifest}", f"--config.train.steps={STEPS}", "--config.log_every=1",
            "--config.data.batch_size=4", "--config.train.warmup_steps=0", "--config.mesh.fsdp=1",
            "--config.data.seq_len=128", "--config.data.max_patches=16", "--config.data.buckets_seconds=(2.0,)",
            "--config.data.max_seconds=2.0", "--config.tensorboard=False", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One persistent compilation cache for every process of this module: the runs after the first load their
    programs instead of compiling them (the same executables, so the comparisons are unaffected)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _metrics(workdir) -> dict:
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows}


def _wait_for(cond, proc, what: str, timeout: float = 300.0, poll: float = 0.002):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}:\n"
                                 + proc.stderr.read()[-3000:])
        time.sleep(poll)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _logged_lines(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


@pytest.fixture(scope="module")
def straight(manifest, env, tmp_path_factory):
    w = tmp_path_factory.mktemp("straight")
    r = subprocess.run(_cmd(w, manifest[0], "--config.checkpoint.every_steps=100"), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return w, r


@pytest.fixture(scope="module")
def interrupted(manifest, env, straight, tmp_path_factory):
    """SIGKILL while an async checkpoint save is being written, resume, SIGTERM, resume to the end."""
    w = tmp_path_factory.mktemp("interrupted")
    ck = w / "checkpoints"
    cmd = _cmd(w, manifest[0], "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=2")

    # 1. kill -9 while a save is in flight: freeze the process (SIGSTOP) when a step's temporary folder appears;
    #    if that save already finished, let it go on to the next step's save
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp_re = re.compile(r"^\d+\.orbax-checkpoint-tmp")

    def in_flight():
        return ck.is_dir() and [d for d in os.listdir(ck) if tmp_re.match(d)]

    killed_during = None
    while killed_during is None:
        _wait_for(in_flight, p, "an async checkpoint save")
        p.send_signal(signal.SIGSTOP)
        frozen = in_flight()
        if frozen and [d for d in os.listdir(ck) if d.isdigit()]:  # a previous checkpoint exists to fall back on
            p.kill()
            killed_during = frozen
        else:
            p.send_signal(signal.SIGCONT)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    steps_after_kill = sorted(int(d) for d in os.listdir(ck) if d.isdigit())
    assert steps_after_kill, "no complete checkpoint before the kill"
    half_written = int(killed_during[0].split(".")[0])
    assert half_written not in steps_after_kill and half_written > steps_after_kill[-1]

    # 2. resume, then SIGTERM once it has logged a step (frozen first, so the signal lands before the end)
    logged = _logged_lines(w)
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    resumed_at = steps_after_kill[-1]
    _wait_for(lambda: _logged_lines(w) > logged, p, "a step after the resume")
    p.send_signal(signal.SIGSTOP)
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert f"resumed {w} at step {resumed_at}" in out, out
    m = re.search(r"stopped at step (\d+) \(SIGTERM\)", out)
    assert m, out + err[-2000:]
    stopped = int(m.group(1))
    assert resumed_at < stopped < STEPS and not (w / "export").exists()

    # 3. resume to the end
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed {w} at step {stopped}" in r.stdout
    return w, {"killed_during": half_written, "resumed_at": resumed_at, "sigterm_at": stopped}


def test_training_skips_bad_records_and_counts_them(straight, manifest):
    w, r = straight
    _, expect = manifest
    skipped = [x for x in r.stderr.splitlines() if x.startswith("skipped ")]
    for line, why in expect.items():
        assert any(f"m.jsonl:{line}:" in x and why in x for x in skipped), (line, why, skipped)
    assert len(skipped) == len(expect)
    m = _metrics(w)
    assert sorted(m) == list(range(1, STEPS + 1))
    # each epoch holds the 3 records that fail at load time (truncated, NaN samples, 0.01 s) once
    assert m[STEPS]["bad_records"] == 3 * STEPS // 3
    assert all(m[s]["skipped_step"] == 0 and np.isfinite(m[s]["loss"]) for s in m)
    assert "done: 9 steps" in r.stdout


def test_sigkill_during_save_then_sigterm_then_resume_equals_straight_run(straight, interrupted):
    a, b = straight[0], interrupted[0]
    ma, mb = _metrics(a), _metrics(b)
    assert sorted(mb) == sorted(ma) == list(range(1, STEPS + 1))
    for s in ma:  # the same data and noise at every step, across the kill and the SIGTERM
        for k in ("loss", "text_ce", "flow", "stop", "text_tokens", "flow_patches", "bad_records"):
            assert ma[s][k] == pytest.approx(mb[s][k], rel=1e-5, abs=1e-6), (s, k, ma[s][k], mb[s][k])
    pa = jax.tree.leaves(load(os.path.join(a, "export")).params["uniaudio"])
    pb = jax.tree.leaves(load(os.path.join(b, "export")).params["uniaudio"])
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- sample.py


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A tiny full checkpoint with random params (numpy, no compilation) and a BPE tokenizer."""
    tok, cfg, params = tiny_uniaudio(SENTENCES * 2, normal_scale=0.05)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tok, cfg, params)


def test_sample_py_killed_mid_job_resumes_without_redoing_or_corrupting(ckpt_dir, env, tmp_path):
    req = tmp_path / "req.jsonl"
    ids = [f"u{i}" for i in range(6)]
    req.write_text("".join(json.dumps({"id": rid, "text": " ".join(SENTENCES[: i + 1])}) + "\n"
                           for i, rid in enumerate(ids)))
    out = tmp_path / "out"
    cmd = [sys.executable, "sample.py", "tts", "--checkpoint", str(ckpt_dir), "--input", str(req), "--out", str(out),
           "--quiet", "--steps", "2", "--max-patches", "3", "--batch-size", "2"]
    results = out / "results.jsonl"
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(results.exists, p, "the first finished request")
    p.send_signal(signal.SIGSTOP)  # frozen right after its first results write, then killed
    p.kill()
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    finished = [json.loads(x)["id"] for x in results.read_text().splitlines()]
    assert 1 <= len(finished) < len(ids)
    before = {rid: (os.stat(out / f"{rid}.wav").st_ino, (out / f"{rid}.wav").read_bytes()) for rid in finished}
    # what a kill in the middle of a write leaves behind: temporary files (never a partial <id>.wav)
    (out / f".u5.wav.{'0' * 32}.tmp").write_bytes(b"RIFF partial")
    (out / ".results.k1ll3d").write_text('{"id": "u5"')

    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(ids) - len(finished)} done, {len(finished)} already done, 0 failed" in r.stdout, r.stdout
    for rid, (ino, data) in before.items():  # not redone: the very same file, untouched
        assert os.stat(out / f"{rid}.wav").st_ino == ino and (out / f"{rid}.wav").read_bytes() == data
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x["id"] for x in rows] == ids
    for x in rows:
        wave, sr = sf.read(out / x["wav"], dtype="float32")
        assert sr == 16000 and len(wave) == round(x["seconds"] * sr) > 0 and np.isfinite(wave).all()
    assert sorted(os.listdir(out)) == sorted([f"{rid}.wav" for rid in ids] + ["results.jsonl"])
