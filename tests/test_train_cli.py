"""train.py (stage vae) end to end in real processes: resume equals an uninterrupted run; SIGTERM saves and exits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, SHARED_DATA
from unitok_jax.convert import load


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    wave, sr = sf.read(SHARED_DATA / "librispeech-1089-134686-0000.flac", dtype="float32")
    lines = []
    for i in range(4):  # 2 s pieces of real speech
        sf.write(root / f"p{i}.wav", wave[i * 32000 : (i + 1) * 32000], sr)
        lines.append(json.dumps({"id": f"p{i}", "audio": f"p{i}.wav", "speaker": "1089"}))
    lines.append("{broken line")
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "m.jsonl")


def _cmd(workdir, manifest, *extra):
    return [sys.executable, "train.py", "--config", "configs/vae.py:tiny", "--workdir", str(workdir),
            f"--config.data.manifest={manifest}", "--config.train.steps=4", "--config.log_every=1",
            "--config.checkpoint.every_steps=100", "--config.data.batch_size=2", "--config.data.crop_seconds=0.5",
            *extra]


def _params(workdir):
    return jax.tree.leaves(load(os.path.join(workdir, "export")).params["vae"])


def test_resume_equals_uninterrupted_run(manifest, tmp_path):
    straight = subprocess.run(_cmd(tmp_path / "a", manifest), cwd=REPO, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert "m.jsonl:5" in straight.stderr  # the broken manifest line is reported and skipped
    first = subprocess.run(_cmd(tmp_path / "b", manifest, "--stop_after=2"), cwd=REPO, capture_output=True,
                           text=True)
    assert first.returncode == 0 and "stopped at step 2" in first.stdout, first.stderr[-2000:]
    second = subprocess.run(_cmd(tmp_path / "b", manifest), cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0 and "resumed" in second.stdout, second.stderr[-2000:]
    for x, y in zip(_params(tmp_path / "a"), _params(tmp_path / "b")):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    logs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logs] == [1, 2, 3, 4] and all(np.isfinite(m["loss_g"]) for m in logs)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(manifest, tmp_path):
    work = tmp_path / "c"
    proc = subprocess.Popen(_cmd(work, manifest, "--config.train.steps=1000"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = work / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.5)
    assert log.exists(), "training never logged a step"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM" in out
    steps = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert steps and steps[-1] >= 1
