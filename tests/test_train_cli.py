"""train.py (stage vae) end to end in real processes, on two simulated devices (the state and batch sharded over
the mesh): a run stopped by SIGTERM (which saves a checkpoint and exits 0) and resumed equals an uninterrupted run
(which also logs held-out samples: TensorBoard scalars, audio and mel images, held-out metrics in metrics.jsonl)."""
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
import orbax.checkpoint as ocp
import pytest
import soundfile as sf

from conftest import REPO, SHARED_DATA, xla_flags
from unitok_jax.convert import load


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    wave, sr = sf.read(SHARED_DATA / "librispeech-1089-134686-0000.flac", dtype="float32")
    lines = []
    for i in range(4):  # 2 s pieces of real speech
        sf.write(root / f"p{i}.wav", wave[i * 32000 : (i + 1) * 32000], sr)
        lines.append(json.dumps({"id": f"p{i}", "audio": f"p{i}.wav", "speaker": "1089"}))
    (root / "held.jsonl").write_text("\n".join(lines[2:]) + "\n")  # two clips for the held-out samples
    lines.append("{broken line")
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "m.jsonl")


def _cmd(workdir, manifest, *extra, sample_every=0):
    return [sys.executable, "train.py", "--config", "configs/vae.py:tiny", "--workdir", str(workdir),
            f"--config.data.manifest={manifest}", "--config.train.steps=4", "--config.log_every=1",
            "--config.checkpoint.every_steps=100", "--config.data.batch_size=2", "--config.data.crop_seconds=0.5",
            f"--config.sample_every={sample_every}", *extra]


def _params(workdir):
    return jax.tree.leaves(load(os.path.join(workdir, "export")).params["vae"])


ENV = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"), JAX_PLATFORMS="cpu")


def test_sigterm_then_resume_equals_uninterrupted_run(manifest, tmp_path):
    held = os.path.join(os.path.dirname(manifest), "held.jsonl")
    straight = subprocess.run(_cmd(tmp_path / "a", manifest, f"--config.data.heldout_manifest={held}",
                                   "--config.data.heldout_seconds=1.0", sample_every=2),
                              cwd=REPO, capture_output=True, text=True, env=ENV)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert "m.jsonl:5" in straight.stderr  # the broken manifest line is reported and skipped
    assert "2 clips of 1.00 s from the held-out manifest" in straight.stdout
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1, 'expert': 1} over 2 devices" in straight.stdout
    # SIGTERM once the first step is logged (frozen first, so the signal lands before the run ends)
    work = tmp_path / "b"
    proc = subprocess.Popen(_cmd(work, manifest), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    log = work / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.read_text().strip()) and proc.poll() is None:
        time.sleep(0.002)
    assert log.exists(), "training never logged a step"
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    m = re.search(r"stopped at step (\d+) \(SIGTERM\)", out)
    assert m and 1 <= int(m.group(1)) < 4, out + err[-2000:]
    assert int(m.group(1)) in [int(d) for d in os.listdir(work / "checkpoints") if d.isdigit()]
    assert not (work / "export").exists()
    second = subprocess.run(_cmd(work, manifest), cwd=REPO, capture_output=True, text=True, env=ENV)
    assert second.returncode == 0 and f"at step {m.group(1)}" in second.stdout, second.stderr[-2000:]
    for x, y in zip(_params(tmp_path / "a"), _params(tmp_path / "b")):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    # the checkpoint of the SIGTERM step as an inference export (on this process's one device): its generator params
    from unitok_jax.export import main as export_main
    from unitok_jax.training.checkpoint import TrainCheckpointer

    assert export_main([str(work), "--step", m.group(1)]) == 0
    ckpt = TrainCheckpointer(str(work))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = ckpt.manager.restore(int(m.group(1)), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=one)))["state"]["gen_params"]
    ckpt.close()
    exported = load(str(work / f"export_step{m.group(1)}")).params["vae"]
    assert jax.tree.structure(exported) == jax.tree.structure(saved)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(saved)))
    logs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logs] == [1, 2, 3, 4] and all(np.isfinite(m["loss_g"]) for m in logs)
    _check_monitoring(tmp_path / "a", logs)


def _check_monitoring(workdir, logs):
    """The uninterrupted run's monitoring: throughput from the 2nd step on (the 1st compiles), no MFU on CPU,
    held-out metrics every 2 steps, TensorBoard scalars / audio / mel images."""
    from test_monitor import read_events, summaries

    assert "step_s" not in logs[0] and all(m["step_s"] > 0 and m["audio_s_per_s"] > 0 for m in logs[1:])
    assert not any("mfu" in m for m in logs)
    held = ("heldout/mel_l1", "heldout/si_sdr", "heldout/log_mel_dist")
    assert [m["step"] for m in logs if all(k in m for k in held)] == [2, 4]
    assert all(np.isfinite(m[k]) for m in logs[1::2] for k in held) and logs[1]["heldout/mel_l1"] > 0
    vals = summaries(read_events(str(workdir / "tb")))
    scalars = {(s, t) for s, t, v in vals if v.HasField("simple_value")}
    assert {(s, "loss_g") for s in (1, 2, 3, 4)} <= scalars and {(s, k) for s in (2, 4) for k in held} <= scalars
    audio = {(s, t): v.audio for s, t, v in vals if v.HasField("audio")}
    # the reference once, the reconstruction at every sample, for both clips
    assert set(audio) == {(2, "heldout/0/reference"), (2, "heldout/1/reference")} | {
        (s, f"heldout/{i}/reconstruction") for s in (2, 4) for i in (0, 1)}
    assert audio[(4, "heldout/1/reconstruction")].sample_rate == 16000
    assert audio[(4, "heldout/1/reconstruction")].length_frames == 16000
    images = {(s, t): v.image for s, t, v in vals if v.HasField("image")}
    assert set(images) == {(s, f"heldout/{i}/mel") for s in (2, 4) for i in (0, 1)}
    assert images[(2, "heldout/0/mel")].encoded_image_string[:4] == b"\x89PNG"
