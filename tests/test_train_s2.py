"""Tokenizer stage S2 (unified, spec §7.1): ``align_weight * ASR CE through a frozen LLM + mel_weight * log-mel L1 of
the full decoder path (head(stack(fc3(Z_uni))))``, only the semantic path (decoder fc2 + semantic module + fc3)
trainable.

* in-process, a tiny model on real speech: both losses fall over a short run and nothing outside the semantic path
  moves (the LLM, flow head, pooling, stop head, encoder and low-level decoder stay bitwise equal);
* ``row_waves`` cuts each row's audio to the whole patches its example kept;
* train.py with ``--config.train.objective=s2``: a short run logs the mel and alignment losses; with cached latents
  it refuses to start (exit 2, a message, no traceback).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, SHARED_DATA, tiny_uniaudio

SENTENCES = ["he hoped there would be stew for dinner", "turnips and carrots and bruised potatoes",
             "fat mutton pieces to be ladled out", "please translate the text to speech"]


@pytest.fixture(scope="module")
def setup():
    tok, cfg, params = tiny_uniaudio(SENTENCES * 4, 300)
    # a fresh pooling is zero-initialised (audio would not reach the LLM): a random kernel stands in for a trained one
    pool = params["linear_proj_audio"]
    kernel = jax.random.normal(jax.random.key(5), pool["linear"]["kernel"].shape)
    params = {**params, "linear_proj_audio": {**pool, "linear": {**pool["linear"], "kernel": kernel}}}
    wav, _ = sf.read(str(SHARED_DATA / "librispeech-1089-134686-0000.flac"), frames=4 * 16000, dtype="float32")
    return tok, cfg, params, wav


def _batch(tok, cfg, params, wav):
    import jax.numpy as jnp

    from unitok_jax import vae
    from unitok_jax.training import lm_data, lm_train

    hop, p = cfg.vae.hop, cfg.patch_size
    pieces = [wav[i * 12000 : i * 12000 + n] for i, n in enumerate((3000, 4321, 2600, 3800))]
    rows = {"wave": np.zeros((4, 4321), np.float32), "lengths": np.array([len(x) for x in pieces], np.int32)}
    examples = []
    for k, x in enumerate(pieces):
        rows["wave"][k, : len(x)] = x
        lat = vae.encode(params["audio"], cfg.vae, jnp.asarray(x)[None], sample=False).latent[0]
        examples.append(lm_data.asr_example(tok, np.asarray(lat), SENTENCES[k], "English", p))
    max_patches = max(e["num_patches"] for e in examples)
    batch = lm_data.make_batch(examples, None, max_patches, batch_size=4, pad_id=tok.id("eos"))
    batch.pop("is_tts")
    batch.update(lm_train.row_waves(rows, [0, 1, 2, 3], batch["latent_valid"], max_patches * p * hop, hop))
    return batch, rows, examples


def test_row_waves_cut_to_whole_patches(setup):
    tok, cfg, params, wav = setup
    batch, rows, examples = _batch(tok, cfg, params, wav)
    hop, p = cfg.vae.hop, cfg.patch_size
    for k, e in enumerate(examples):
        n = int(batch["wave_lengths"][k])
        assert n == min(int(rows["lengths"][k]), e["num_patches"] * p * hop)
        np.testing.assert_array_equal(batch["wave"][k, :n], rows["wave"][k, :n])
        assert not batch["wave"][k, n:].any()
    assert batch["wave_lengths"][1] < rows["lengths"][1]  # 4321 samples: the partial patch is cut


def test_s2_short_run_trains_only_the_semantic_path(setup):
    from unitok_jax.training import lm_step

    tok, cfg, params, wav = setup
    batch, _, _ = _batch(tok, cfg, params, wav)
    opt = lm_step.masked_optimizer(params, lm_step.adamw(3e-3, warmup_steps=0), unified_stage=True)
    step = jax.jit(lm_step.make_lm_train_step(cfg, opt, unified_stage=True, text_weight=2.0, flow_weight=0.0,
                                              stop_weight=0.0, mel_weight=1.0), donate_argnums=0)
    state = lm_step.init_lm_state(jax.tree.map(np.array, params), opt, jax.random.key(1))
    hist = []
    for _ in range(25):
        state, m = step(state, batch)
        hist.append({k: float(v) for k, v in m.items()})
    assert all(h["skipped_step"] == 0 for h in hist)
    for k, ratio in (("mel", 0.9), ("text_ce", 0.98)):  # the frozen LLM only sees the audio through Z_uni
        first, last = np.mean([h[k] for h in hist[:3]]), np.mean([h[k] for h in hist[-3:]])
        assert last < ratio * first, (k, first, last)
    assert hist[-1]["loss"] == pytest.approx(2 * hist[-1]["text_ce"] + hist[-1]["mel"], rel=1e-5)
    moved = []
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        b = np.asarray(_get(state["params"], path))
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if not np.array_equal(np.asarray(a), b):
            moved.append(name)
    prefixes = tuple(f"audio/decoder/{k}/" for k in ("fc2", "semantic", "fc3"))
    assert moved and all(n.startswith(prefixes) for n in moved), [n for n in moved if not n.startswith(prefixes)]
    for pre in prefixes:
        assert any(n.startswith(pre) for n in moved), pre


def _get(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", getattr(k, "idx", k))]
    return tree


def _train(workdir, manifest, *flags):
    cmd = [sys.executable, "train.py", "--config", "configs/lm.py:tiny", "--workdir", str(workdir),
           f"--config.data.manifest={manifest}", "--config.tensorboard=False", "--config.train.objective=s2",
           "--config.data.batch_size=2", "--config.data.buckets_seconds=(2.0,)", "--config.data.max_seconds=2.0",
           "--config.tokenizer.vocab_size=300", *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_s2_cli_run_and_setup_error(tmp_path):
    wav, sr = sf.read(SHARED_DATA / "librispeech-1089-134686-0000.flac", dtype="float32")
    recs = []
    for i, t in enumerate(SENTENCES):
        sf.write(tmp_path / f"u{i}.wav", wav[i * 24000 : i * 24000 + 28000], sr)
        recs.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": t, "speaker": "1089"})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = _train(tmp_path / "bad", manifest, "--config.data.source=latents")
    assert proc.returncode == 2 and "needs data.source=audio" in proc.stderr and "Traceback" not in proc.stderr
    proc = _train(tmp_path / "run", manifest, "--config.train.steps=4", "--config.log_every=1",
                  "--config.checkpoint.every_steps=100")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "without init.checkpoint" in proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        assert np.isfinite(r["mel"]) and r["mel"] > 0 and r["text_tokens"] > 0
        assert r["flow_patches"] == 0  # ASR rows only
        assert r["loss"] == pytest.approx(2 * r["text_ce"] + r["mel"], rel=1e-5)
