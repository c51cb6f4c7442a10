"""Tokenizer stage S1 (semantic distillation, ``--config.train.objective=s1``): teacher features read from disk, one
row per 50 Hz latent frame.

* the crop pipeline starts crops on a frame boundary and slices the teacher rows of exactly those frames; records
  with missing / malformed features are bad items, not exceptions;
* a train.py run on real speech (``librispeech-1089-134686-0000.flac``) from an exported VAE: the distillation loss
  falls, only ``decoder/fc2`` + ``decoder/semantic`` move (the encoder and the low-level reconstruction path stay
  bitwise equal), held-out distillation metrics are logged;
* setup errors: an unknown objective, no teacher field, a teacher of the wrong width (exit 2, no traceback).

The teacher is a fixed random projection of each frame's log spectrum: a deterministic function of the audio, so
the semantic path can learn it (a stand-in for Whisper-large-v3 features, which need torch to compute).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, SHARED_DATA

HOP = 320
DIM = 48  # the tiny config's semantic width (configs/vae.py:tiny, n_state)


def _teacher(wave: np.ndarray, proj: np.ndarray) -> np.ndarray:
    frames = wave[: len(wave) // HOP * HOP].reshape(-1, HOP)
    spec = np.log1p(np.abs(np.fft.rfft(frames * np.hanning(HOP), axis=-1)))
    feats = spec @ proj
    return ((feats - feats.mean()) / feats.std()).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s1")
    wave, sr = sf.read(SHARED_DATA / "librispeech-1089-134686-0000.flac", dtype="float32")
    proj = np.random.default_rng(0).standard_normal((HOP // 2 + 1, DIM)).astype(np.float32) / 4
    recs = []
    for i in range(6):
        piece = wave[i * 24000 : i * 24000 + 32000]  # 2 s each
        sf.write(tmp / f"u{i}.wav", piece, sr)
        np.save(tmp / f"u{i}.npy", _teacher(piece, proj))
        recs.append({"id": f"u{i}", "audio": f"u{i}.wav", "speaker": "1089", "teacher": f"u{i}.npy"})
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:5]))
    (tmp / "held.jsonl").write_text(json.dumps(recs[5]) + "\n")
    return tmp


def test_crops_are_frame_aligned_and_carry_their_teacher_rows(tmp_path):
    from unitok_jax.data.pipeline import vae_batches

    rng = np.random.default_rng(1)
    recs = []
    for i, n in enumerate((7000, 16000, 23000, 300)):  # shorter and longer than the 0.5 s crop
        wave = rng.standard_normal(n).astype(np.float32) * 0.1
        sf.write(tmp_path / f"a{i}.wav", wave, 16000, subtype="FLOAT")
        feats = np.zeros((n // HOP + 1, 8), np.float32)  # one extra row, as an encoder may emit
        feats[:, 0] = np.arange(len(feats))  # row k knows its frame index
        feats[:, 1] = i
        np.save(tmp_path / f"a{i}.npy", feats)
        recs.append({"id": str(i), "audio": str(tmp_path / f"a{i}.wav"), "teacher": str(tmp_path / f"a{i}.npy"),
                     "wave": wave})
    recs.append({"id": "bad_dim", "audio": recs[1]["audio"], "teacher": str(tmp_path / "w.npy")})
    np.save(tmp_path / "w.npy", np.zeros((60, 7), np.float32))
    recs.append({"id": "missing", "audio": recs[1]["audio"], "teacher": str(tmp_path / "nope.npy")})
    recs.append({"id": "no_field", "audio": recs[1]["audio"]})
    it = iter(vae_batches(recs, batch_size=7, crop_seconds=0.51, seed=3, shard_index=0, shard_count=1,
                          teacher_key="teacher", teacher_dim=8))
    for _ in range(3):  # new random crops each epoch
        b = next(it)
        assert b["wave"].shape == (7, 8000)  # 0.51 s = 8160 samples, rounded down to 25 whole frames
        frames = 25
        assert b["teacher"].shape == (7, frames, 8)
        good = 0
        for k in range(7):
            n_rows = int(b["teacher_frames"][k])
            if not b["ok"][k]:
                assert b["lengths"][k] == 0 and n_rows == 0 and not b["teacher"][k].any()
                continue
            good += 1
            i = int(b["teacher"][k, 0, 1])
            start_frame = int(b["teacher"][k, 0, 0])
            src = recs[i]["wave"]
            n = int(b["lengths"][k])
            # the audio is the source from the start frame on; teacher rows are frames start, start + 1, ...
            np.testing.assert_array_equal(b["wave"][k, :n], src[start_frame * HOP : start_frame * HOP + n])
            assert n == min(frames * HOP, len(src) - start_frame * HOP)
            np.testing.assert_array_equal(b["teacher"][k, :n_rows, 0], start_frame + np.arange(n_rows))
            assert not b["teacher"][k, n_rows:].any()
        assert good == 4


def _train(workdir, *flags, timeout=600):
    cmd = [sys.executable, "train.py", "--config", "configs/vae.py:tiny", "--workdir", str(workdir),
           "--config.tensorboard=False", *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def s1_run(corpus):
    import jax

    from unitok_jax import vae
    from unitok_jax.convert import Checkpoint, save
    from configs import vae as vae_configs

    vcfg = vae.VAEConfig.from_reference(vae_configs.get_config("tiny").vae.to_dict())
    params = jax.device_get(vae.init_params(vcfg, jax.random.key(7)))
    save(Checkpoint({"vae": vcfg}, {"vae": params}), str(corpus / "init"))
    work = corpus / "run"
    proc = _train(work, "--config.train.objective=s1", f"--config.init.vae={corpus / 'init'}",
                  f"--config.data.manifest={corpus / 'train.jsonl'}",
                  f"--config.data.heldout_manifest={corpus / 'held.jsonl'}", "--config.data.heldout_size=1",
                  "--config.train.steps=40", "--config.train.lr=3e-3", "--config.log_every=1",
                  "--config.sample_every=20", "--config.data.batch_size=4", "--config.checkpoint.every_steps=1000")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    return params, work, rows, proc


def test_s1_distillation_loss_falls_on_real_speech(s1_run):
    _, _, rows, _ = s1_run
    mse = [r["distill_mse"] for r in rows if "distill_mse" in r]
    assert len(mse) == 40 and all(np.isfinite(mse))
    first, last = np.mean(mse[:4]), np.mean(mse[-4:])
    assert last < 0.7 * first, (first, last)
    held = [r for r in rows if "heldout/distill_mse" in r]
    assert [r["step"] for r in held] == [20, 40]
    assert held[-1]["heldout/distill_mse"] < held[0]["heldout/distill_mse"] * 1.05  # and it is computed at all
    assert all(r["bad_records"] == 0 for r in rows)
    assert "skipped" in rows[-1] and rows[-1]["skipped"] == 0


def test_s1_moves_only_the_semantic_path(s1_run):
    import jax

    from unitok_jax.convert import load

    init, work, _, _ = s1_run
    _, trained = load(str(work / "export")).vae()
    flat_a = jax.tree_util.tree_flatten_with_path(init)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(trained)[0])
    moved, frozen = set(), set()
    for path, a in flat_a:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        same = np.array_equal(np.asarray(a), np.asarray(flat_b[path]))
        (frozen if same else moved).add(name)
    assert moved and all(n.startswith(("decoder/fc2/", "decoder/semantic/")) for n in moved), sorted(moved)[:5]
    assert any(n.startswith("decoder/semantic/") for n in moved)
    assert any(n.startswith("encoder/") for n in frozen) and any(n.startswith("decoder/fc1/") for n in frozen)
    assert not any(n.startswith(("encoder/", "decoder/fc1/", "decoder/backbone/", "decoder/head/")) for n in moved)


def test_s1_setup_errors(corpus, tmp_path):
    no_teacher = tmp_path / "plain.jsonl"
    rows = [json.loads(x) for x in (corpus / "train.jsonl").read_text().splitlines()]
    no_teacher.write_text("".join(json.dumps({k: (str(corpus / v) if k == "audio" else v) for k, v in r.items()
                                              if k != "teacher"}) + "\n" for r in rows))
    wrong = tmp_path / "wrong.jsonl"
    np.save(tmp_path / "w.npy", np.zeros((100, DIM + 1), np.float32))
    wrong.write_text("".join(json.dumps(dict(r, audio=str(corpus / r["audio"]), teacher=str(tmp_path / "w.npy")))
                             + "\n" for r in rows))
    cases = [(["--config.train.objective=s3", f"--config.data.manifest={corpus / 'train.jsonl'}"],
              "train.objective='s3'"),
             (["--config.train.objective=s1", f"--config.data.manifest={no_teacher}"], "'teacher' field"),
             (["--config.train.objective=s1", f"--config.data.manifest={wrong}"], f"expected [frames, {DIM}]")]
    for i, (flags, msg) in enumerate(cases):
        proc = _train(tmp_path / f"w{i}", *flags, "--config.train.steps=1", timeout=300)
        assert proc.returncode == 2, (flags, proc.stderr[-2000:])
        assert msg in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
