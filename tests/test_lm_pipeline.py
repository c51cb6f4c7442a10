"""LM-stage data: the latent cache command and the per-process rows of global batches."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from conftest import SHARED_DATA
from unitok_jax import vae
from unitok_jax.convert import Checkpoint, save
from unitok_jax.data import latent_cache
from unitok_jax.data.lm_pipeline import lm_batches
from unitok_jax.data.manifest import read_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_pipe")
    wave, sr = sf.read(SHARED_DATA / "librispeech-1089-134686-0000.flac", dtype="float32")
    lines = []
    for i in range(6):  # 0.5 .. 1.75 s pieces
        n = 8000 + 4000 * i
        sf.write(root / f"u{i}.wav", wave[i * 8000 : i * 8000 + n], sr)
        lines.append(json.dumps({"id": f"u{i}", "audio": f"u{i}.wav", "text": f"words {i}", "speaker": "s"}))
    lines.append(json.dumps({"id": "bad", "audio": "missing.wav", "text": "x", "speaker": "s"}))
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    from configs import vae as vae_configs

    cfg = vae.VAEConfig.from_reference(vae_configs.get_config("tiny").vae.to_dict())
    params = vae.init_params(cfg, jax.random.key(0))
    save(Checkpoint({"vae": cfg}, {"vae": params}), str(root / "vae"))
    return root, cfg, params


@pytest.fixture(scope="module")
def cache(corpus):
    root = corpus[0]
    latent_cache.build_cache(str(root / "vae"), str(root / "m.jsonl"), str(root / "cache"), progress=False)
    return read_manifest(str(root / "cache" / "manifest.jsonl")).records


def test_latent_cache_matches_the_encoder_and_resumes(corpus, capsys):
    root, cfg, params = corpus
    out = root / "cache_cli"
    rc = latent_cache.main(["--vae", str(root / "vae"), "--manifest", str(root / "m.jsonl"), "--out", str(out),
                            "--batch-size", "4"])
    assert rc == 1  # one unreadable file: reported, left out, the rest cached
    assert "missing.wav" in capsys.readouterr().err
    m = read_manifest(str(out / "manifest.jsonl"))
    assert [r["id"] for r in m.records] == [f"u{i}" for i in range(6)] and not m.errors
    for r in m.records[:3:2]:
        post = np.load(r["latents"])
        wave, _ = sf.read(r["audio"], dtype="float32")
        enc = vae.encode(params, cfg, jnp.asarray(wave)[None], sample=False)
        assert post.shape == (int(enc.frame_num[0]), 2, cfg.latent_dim) == (r["frames"], 2, cfg.latent_dim)
        np.testing.assert_allclose(post[:, 0], np.asarray(enc.mean[0]), atol=1e-5)
        np.testing.assert_allclose(post[:, 1], np.asarray(enc.std[0]), atol=1e-5)
        assert r["duration"] == pytest.approx(len(wave) / 16000)
    # a second run keeps what is there
    res = latent_cache.build_cache(str(root / "vae"), str(root / "m.jsonl"), str(out), progress=False)
    assert res["written"] == 0 and res["kept"] == 6


def test_per_process_rows_assemble_the_global_batch(corpus):
    root, cfg, _ = corpus
    recs = read_manifest(str(root / "m.jsonl"), add_durations=True).records  # "bad" dropped (no duration)
    kw = dict(batch_size=4, seed=3, hop=cfg.hop, buckets_seconds=(1.0, 2.0))
    whole = iter(lm_batches(recs, process_index=0, process_count=1, **kw))
    parts = [iter(lm_batches(recs, process_index=i, process_count=2, **kw)) for i in range(2)]
    for _ in range(4):  # more than one epoch of 1 batch
        w = next(whole)
        a, b = next(parts[0]), next(parts[1])
        assert len(a["row"]) == 2 and list(a["row"]) + list(b["row"]) == list(w["row"]) == [0, 1, 2, 3]
        np.testing.assert_array_equal(np.concatenate([a["wave"], b["wave"]]), w["wave"])
        assert list(a["id"]) + list(b["id"]) == list(w["id"])
        assert a["wave"].shape[1] == b["wave"].shape[1] in (16000, 32000)  # one bucket for the global batch
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        lm_batches(recs, process_index=0, process_count=3, **kw)


def test_latent_source_needs_the_cache(corpus, cache):
    root, cfg, _ = corpus
    recs = read_manifest(str(root / "m.jsonl"), add_durations=True).records
    with pytest.raises(ValueError, match="latent_cache"):
        lm_batches(recs, batch_size=2, seed=0, source="latents", process_index=0, process_count=1)
    batch = next(iter(lm_batches(cache, batch_size=2, seed=0, source="latents", hop=cfg.hop,
                                 buckets_seconds=(2.0,), process_index=0, process_count=1)))
    assert batch["mean"].shape == (2, 100, cfg.latent_dim) and batch["ok"].all()
    for k in range(2):
        n = int(batch["lengths"][k])
        rec = next(r for r in cache if r["id"] == batch["id"][k])
        np.testing.assert_array_equal(batch["mean"][k, :n], np.load(rec["latents"])[:, 0])
        assert not batch["mean"][k, n:].any()


def test_edit_pairs_load_source_and_target_and_become_edit_sequences(corpus):
    from unitok_jax import text
    from unitok_jax.training import lm_train

    root, cfg, params = corpus
    lines = [json.dumps({"id": f"e{i}", "audio": f"u{i}.wav", "text": f"words {i}", "speaker": "s",
                         "target_audio": f"u{i + 1}.wav", "target_duration": 0.75 + 0.25 * i,
                         "instruction": f"please edit {i}", "edit_type": "delete" if i % 2 else "faster",
                         "target_markup": f"words <edit></edit> {i}" if i % 2 else None}) for i in range(4)]
    (root / "edits.jsonl").write_text("\n".join(lines) + "\n")
    recs = read_manifest(str(root / "edits.jsonl"), add_durations=True).records
    assert recs[0]["target_audio"] == str(root / "u1.wav")  # made absolute like audio
    rows = next(iter(lm_batches(recs, batch_size=2, seed=0, hop=cfg.hop, buckets_seconds=(2.0,),
                                process_index=0, process_count=1)))
    for k in range(2):
        i = int(rows["id"][k][1:])
        want, _ = sf.read(root / f"u{i + 1}.wav", dtype="float32")
        np.testing.assert_array_equal(rows["target_wave"][k, : len(want)], want)
        assert rows["target_lengths"][k] == len(want) and rows["instruction"][k] == f"please edit {i}"
    tok = text.train_tokenizer(["words please edit faster"] * 4, vocab_size=300)
    post = lambda w, n: (np.asarray(vae.encode(params, cfg, jnp.asarray(w), jnp.asarray(n), sample=False).mean),) * 2
    src = (*post(rows["wave"], rows["lengths"]), rows["lengths"] // cfg.hop)
    tgt = (*post(rows["target_wave"], rows["target_lengths"]), rows["target_lengths"] // cfg.hop)
    ex, where, skipped = lm_train.edit_examples_from_rows(rows, src, tgt, tok, 5, seed=0, step=0)
    assert where == [0, 1] and skipped == 0
    for e, k in zip(ex, where):
        semantic = rows["target_markup"][k] is not None
        assert e["task"] == "edit" and (tok.id("answer") in e["input_ids"]) == semantic
        assert e["gen_start"] == int(src[2][k]) // 5 and e["gen_patches"] == int(tgt[2][k]) // 5


def test_edit_pairs_through_the_latent_cache(corpus):
    """The cache encodes an edit pair's target too, and the latent source loads source and target posteriors that
    match the encoder (what the edit steps then sample from)."""
    root, cfg, params = corpus
    lines = [json.dumps({"id": f"c{i}", "audio": f"u{i}.wav", "text": f"words {i}", "speaker": "s",
                         "target_audio": f"u{5 - i}.wav", "instruction": f"edit {i}", "edit_type": "faster",
                         "target_markup": None}) for i in range(4)]
    lines.append(json.dumps({"id": "broken", "audio": "u0.wav", "text": "w", "speaker": "s",
                             "target_audio": "missing.wav", "instruction": "x", "edit_type": "faster"}))
    (root / "edits_c.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "edit_cache"
    res = latent_cache.build_cache(str(root / "vae"), str(root / "edits_c.jsonl"), str(out), batch_size=3,
                                   progress=False)
    assert res["written"] == 4 and len(res["failed"]) == 1 and "missing.wav" in res["failed"][0]
    recs = read_manifest(str(out / "manifest.jsonl"), add_durations=True).records
    assert [r["id"] for r in recs] == [f"c{i}" for i in range(4)]
    for r in recs:
        i = int(r["id"][1:])
        for key, wav in (("latents", f"u{i}.wav"), ("target_latents", f"u{5 - i}.wav")):
            wave, _ = sf.read(root / wav, dtype="float32")
            enc = vae.encode(params, cfg, jnp.asarray(wave)[None], sample=False)
            post = np.load(r[key])
            assert post.shape[0] == int(enc.frame_num[0])
            np.testing.assert_allclose(post[:, 0], np.asarray(enc.mean[0]), atol=1e-5)
        assert r["target_frames"] == np.load(r["target_latents"]).shape[0]
        assert r["target_duration"] == pytest.approx(sf.info(str(root / f"u{5 - i}.wav")).duration)
    res = latent_cache.build_cache(str(root / "vae"), str(root / "edits_c.jsonl"), str(out), progress=False)
    assert res["written"] == 0 and res["kept"] == 4  # resumed: both files of each pair are there

    rows = next(iter(lm_batches(recs, batch_size=4, seed=0, source="latents", hop=cfg.hop, buckets_seconds=(2.0,),
                                process_index=0, process_count=1)))
    assert rows["ok"].all() and rows["target_mean"].shape == rows["mean"].shape == (4, 100, cfg.latent_dim)
    for k in range(4):
        rec = next(r for r in recs if r["id"] == rows["id"][k])
        tgt = np.load(rec["target_latents"])
        n = int(rows["target_lengths"][k])
        assert n == len(tgt) and rows["instruction"][k] == rec["instruction"]
        np.testing.assert_array_equal(rows["target_std"][k, :n], tgt[:, 1])
    no_target = [{k: v for k, v in r.items() if k != "target_latents"} for r in recs]
    with pytest.raises(ValueError, match="target_latents"):
        lm_batches(no_target, batch_size=2, seed=0, source="latents", process_index=0, process_count=1)


def test_packed_plans_fill_rows_and_split_over_processes(corpus, cache):
    """Packed batches (issue 18, item 2): each batch is the records the plan placed in its rows (none over a row's
    tokens), the processes' pieces make the one-process batch, every record comes once per epoch, and a restored
    iterator continues exactly."""
    from unitok_jax.data.pipeline import plan_packed

    root, cfg, _ = corpus
    sizes = [10 + r["frames"] // 5 for r in cache]  # 6 records of 15 .. 45 tokens
    kw = dict(batch_size=2, seed=1, source="latents", hop=cfg.hop, row_sizes=[10] * len(cache), pack_len=60,
              pack_patches=60)
    plan = plan_packed(sizes, rows=2, seq_len=60, seed=1, epoch=0)
    assert sorted(i for b in plan for i, _ in b) == list(range(6))  # once per epoch
    for b in plan:
        for row in range(2):
            assert sum(sizes[i] for i, r in b if r == row) <= 60
    longer = plan_packed(sizes + [61], rows=2, seq_len=60, seed=1, epoch=0)  # the 61-token record is left out
    assert sorted(i for b in longer for i, _ in b) == list(range(6))
    # a patch budget per row too: no row holds more than 12 patches, and records of more are left out
    frames = [r["frames"] // 5 for r in cache]
    capped = plan_packed(sizes, rows=2, seq_len=60, seed=1, epoch=0, patches=frames, max_patches=12)
    assert sorted(i for b in capped for i, _ in b) == [i for i in range(6) if frames[i] <= 12]
    for b in capped:
        for row in range(2):
            assert sum(frames[i] for i, r in b if r == row) <= 12
    whole = iter(lm_batches(cache, process_index=0, process_count=1, **kw))
    parts = [iter(lm_batches(cache, process_index=i, process_count=2, **kw)) for i in range(2)]
    seen = []
    for j in range(len(plan)):
        w, a, b = next(whole), next(parts[0]), next(parts[1])
        assert [cache[i]["id"] for i, _ in plan[j]] == list(w["id"])
        for part, row in ((a, 0), (b, 1)):  # process i loads the records of its row only
            assert list(part["id"]) == [cache[i]["id"] for i, r in plan[j] if r == row]
        assert set(a["pack_row"]) <= {0} and set(b["pack_row"]) <= {0}  # one row each, local index 0
        for k in range(len(w["id"])):
            rec = next(r for r in cache if r["id"] == w["id"][k])
            assert int(w["lengths"][k]) == rec["frames"]
            np.testing.assert_array_equal(w["mean"][k, :rec["frames"]], np.load(rec["latents"])[:, 0])
        seen += list(w["id"])
    assert sorted(seen) == sorted(r["id"] for r in cache)
    state = whole.get_state()
    after = [next(whole)["id"].tolist() for _ in range(3)]
    again = iter(lm_batches(cache, process_index=0, process_count=1, **kw))
    again.set_state(state)
    assert [next(again)["id"].tolist() for _ in range(3)] == after
    with pytest.raises(ValueError, match="latent cache"):
        lm_batches(cache, batch_size=2, seed=1, hop=cfg.hop, row_sizes=[10] * len(cache), pack_len=60,
                   process_index=0, process_count=1)
    with pytest.raises(ValueError, match="0 of 6 records fit 12 tokens / 60 patches"):
        lm_batches(cache, **{**kw, "pack_len": 12}, process_index=0, process_count=1)


def test_packed_lm_run_compiles_one_step_program(corpus, cache, tmp_path):
    """A whole LM run on packed rows (data.pack): one batch shape, so one compiled step program; the rows are mostly
    sequences, not padding; every record fits (none skipped)."""
    from unitok_jax.configs import lm as lm_configs
    from unitok_jax.training import loop

    root = corpus[0]
    config = lm_configs.get_config("tiny")
    config.data.manifest = str(root / "cache" / "manifest.jsonl")
    config.init.vae = str(root / "vae")
    config.data.update(source="latents", pack=True, seq_len=256, max_patches=64, batch_size=2)
    config.train.update(steps=4, warmup_steps=0)
    config.update(log_every=1)
    stage = loop.build_stage(config, str(tmp_path))
    assert loop.run(stage, config, str(tmp_path)) == 0
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {r["compiled_programs"] for r in rows} == {1}
    assert all(np.isfinite(r["loss"]) for r in rows) and stage.bad_records == 0
    assert min(r["padding"] for r in rows) < 0.4  # 2 rows of 256 tokens: the sequences share them
    config.data.source = "audio"
    with pytest.raises(Exception, match="data.source=latents"):
        loop.build_stage(config, str(tmp_path / "audio"))
