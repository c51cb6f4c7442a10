"""LM stage: sequence builders (lm_data), the loss (lm_step.lm_loss) and a short jitted training run on a tiny model
fed with real speech encoded by the tiny (random) VAE."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from conftest import SHARED_DATA, tiny_uniaudio

from unitok_jax import model, text, vae
from unitok_jax.training import lm_data, lm_step

SENTENCES = ["he hoped there would be stew for dinner", "turnips and carrots and bruised potatoes",
             "fat mutton pieces to be ladled out", "please translate the text to speech",
             "English\tlet us go home now"]
P = 5  # patch size of the tiny model


@pytest.fixture(scope="module")
def setup():
    tok, cfg, params = tiny_uniaudio(SENTENCES * 4)
    wav, sr = sf.read(str(SHARED_DATA / "librispeech-1089-134686-0000.flac"), frames=2 * 16000, dtype="float32")
    assert sr == 16000
    enc = vae.encode(params["audio"], cfg.vae, jnp.asarray(wav)[None], key=jax.random.key(1))
    latents = np.asarray(enc.latent[0])  # [800, 8]: 2 s at the tiny VAE's 40-sample hop
    return tok, cfg, params, latents


@pytest.fixture(scope="module")
def loss_fn():
    return jax.jit(lm_step.lm_loss, static_argnums=1, static_argnames=("deterministic", "freeze_semantic"))


def _examples(tok, lat, tts_text=SENTENCES[0], transcript=SENTENCES[1]):
    return [lm_data.tts_example(tok, tts_text, lat[:200]), lm_data.asr_example(tok, lat[200:390], transcript)]


# ------------------------------------------------------------------------------------------------ builders


def test_tts_example_layout(setup):
    tok, _, _, lat = setup
    ex = lm_data.tts_example(tok, SENTENCES[0], lat[:23])  # 23 frames -> 4 patches, 3 frames dropped
    ids = ex["input_ids"]
    n = ex["num_patches"]
    assert n == 4 and ex["gen_patches"] == 4 and ex["latents"].shape == (20, lat.shape[1])
    np.testing.assert_array_equal(ex["latents"], lat[:20])
    audio_pos = int(np.flatnonzero(ids == tok.id("audio"))[0])
    assert audio_pos == len(ids) - n - 1 and ex["patch_start"] == audio_pos + 1
    np.testing.assert_array_equal(np.flatnonzero(ex["audio_patch_mask"]), audio_pos + 1 + np.arange(n))
    np.testing.assert_array_equal(np.flatnonzero(ids == tok.id("audio_patch")), audio_pos + 1 + np.arange(n))
    # patch 0 is conditioned on <audio>, patch j on the position of patch j - 1
    np.testing.assert_array_equal(ex["patch_cond_index"], [audio_pos, audio_pos + 1, audio_pos + 2, audio_pos + 3])
    assert (ex["text_labels"] == lm_data.IGNORE).all() and not ex["audio_gate"].any()
    assert list(ids) == text.tts_training_sequence(tok, SENTENCES[0], n)
    with pytest.raises(ValueError, match="less than one patch"):
        lm_data.tts_example(tok, SENTENCES[0], lat[:4])


def test_asr_example_labels_on_target_only(setup):
    tok, _, _, lat = setup
    ex = lm_data.asr_example(tok, lat[:17], "let us go home now", "English")
    ids, labels = ex["input_ids"], ex["text_labels"]
    prompt, start = text.asr_prompt(tok, 3)
    target = text.asr_target(tok, "let us go home now", "English")
    assert list(ids) == prompt + target and ex["patch_start"] == start and ex["gen_patches"] == 0
    np.testing.assert_array_equal(np.flatnonzero(ex["audio_patch_mask"]), start + np.arange(3))
    np.testing.assert_array_equal(ex["audio_gate"], ex["audio_patch_mask"])
    # shifted next-token labels: logits at i predict ids[i + 1], exactly for the target tokens (eos included)
    labelled = np.flatnonzero(labels != lm_data.IGNORE)
    np.testing.assert_array_equal(labelled, len(prompt) - 1 + np.arange(len(target)))
    np.testing.assert_array_equal(labels[labelled], ids[labelled + 1])
    assert list(labels[labelled]) == target and labels[labelled][-1] == tok.id("eos")


def test_make_batch_pads_and_masks(setup):
    tok, _, _, lat = setup
    exs = [lm_data.tts_example(tok, SENTENCES[2], lat[:30]), lm_data.asr_example(tok, lat[:12], SENTENCES[3])]
    b = lm_data.make_batch(exs, max_len=160, max_patches=8, batch_size=3)
    assert b["input_ids"].shape == (3, 160) and b["latents"].shape == (3, 40, lat.shape[1])
    for i, e in enumerate(exs):
        s = len(e["input_ids"])
        assert b["valid"][i].sum() == s and b["valid"][i, :s].all()
        np.testing.assert_array_equal(b["input_ids"][i, :s], e["input_ids"])
        np.testing.assert_array_equal(b["text_labels"][i, :s], e["text_labels"])
        assert (b["text_labels"][i, s:] == lm_data.IGNORE).all()
        assert not b["audio_patch_mask"][i, s:].any() and not b["audio_gate"][i, s:].any()
        n = e["num_patches"]
        assert b["latent_valid"][i].sum() == n * P and not b["latents"][i, n * P:].any()
        np.testing.assert_array_equal(b["patch_cond_index"][i, :n], e["patch_cond_index"])
    np.testing.assert_array_equal(b["flow_mask"][0], np.arange(8) < 6)  # TTS: its 6 patches
    assert not b["flow_mask"][1].any() and not b["flow_mask"][2].any()  # ASR and the padded row: none
    assert not b["valid"][2].any() and list(b["is_tts"]) == [True, False, False]
    auto = lm_data.make_batch(exs)  # buckets
    assert auto["input_ids"].shape == (2, 128) and auto["flow_mask"].shape == (2, 8)
    with pytest.raises(ValueError, match="max_patches"):
        lm_data.make_batch(exs, max_len=160, max_patches=4)
    with pytest.raises(ValueError, match="max_len"):
        lm_data.make_batch(exs, max_len=16, max_patches=8)


def test_mix_examples_ratio(setup):
    tts, asr = [{"task": "tts", "i": i} for i in range(3)], [{"task": "asr", "i": i} for i in range(2)]
    a = lm_data.mix_examples(tts, asr, 400, 0.75, np.random.default_rng(0))
    b = lm_data.mix_examples(tts, asr, 400, 0.75, np.random.default_rng(0))
    assert a == b
    frac = np.mean([e["task"] == "tts" for e in a])
    assert 0.68 < frac < 0.82
    assert all(e["task"] == "asr" for e in lm_data.mix_examples([], asr, 10, 0.0, np.random.default_rng(1)))
    with pytest.raises(ValueError):
        lm_data.mix_examples([], asr, 10, 0.5, np.random.default_rng(1))


# ------------------------------------------------------------------------------------------------ loss


def test_loss_components_respond_to_their_inputs(setup, loss_fn):
    tok, cfg, params, lat = setup
    key = jax.random.key(3)
    # fresh pooling is zero-initialised (audio would not reach the LLM): give it a random kernel
    pool = params["linear_proj_audio"]
    kernel = jax.random.normal(jax.random.key(5), pool["linear"]["kernel"].shape)
    params = {**params, "linear_proj_audio": {**pool, "linear": {**pool["linear"], "kernel": kernel}}}
    kw = {"max_len": 256, "max_patches": 64}

    def run(exs, **mods):
        b = lm_data.make_batch(exs, **kw)
        for k, v in mods.items():
            b[k] = v(b[k])
        return {k: float(v) for k, v in loss_fn(params, cfg, b, key, deterministic=True)[1].items()}

    base = run(_examples(tok, lat))
    for k in ("loss", "text_ce", "flow", "stop"):
        assert np.isfinite(base[k]) and base[k] > 0, (k, base)
    assert base["text_tokens"] == len(text.asr_target(tok, SENTENCES[1]))
    assert base["flow_patches"] == 40
    np.testing.assert_allclose(base["loss"], base["text_ce"] + base["flow"] + 0.01 * base["stop"], rtol=1e-5)

    # a different transcript changes the text CE only
    other = run(_examples(tok, lat, transcript=SENTENCES[2]))
    assert abs(other["text_ce"] - base["text_ce"]) > 1e-3
    for k in ("flow", "stop"):
        np.testing.assert_allclose(other[k], base[k], rtol=1e-6, err_msg=k)

    # a changed last target patch: flow and stop (its hidden is the positive) change, text CE does not
    def bump_last(x):
        x = x.copy()
        x[0, 195:200] += 1.0
        return x
    moved = run(_examples(tok, lat), latents=bump_last)
    assert abs(moved["flow"] - base["flow"]) > 1e-4 and abs(moved["stop"] - base["stop"]) > 1e-6
    np.testing.assert_allclose(moved["text_ce"], base["text_ce"], rtol=1e-6)

    # causality of the conditions: with only patches 0..6 as targets, changing patch 7 changes nothing
    def only_first7(m):
        m = m.copy()
        m[0, 7:] = False
        return m

    def bump7(x):
        x = x.copy()
        x[0, 35:40] += 1.0
        return x
    a = run(_examples(tok, lat), flow_mask=only_first7)
    c = run(_examples(tok, lat), flow_mask=only_first7, latents=bump7)
    np.testing.assert_allclose(c["flow"], a["flow"], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trainer(setup):
    _, cfg, params, _ = setup
    tx = lm_step.masked_optimizer(params, lm_step.adamw(3e-3, warmup_steps=0))
    state = lm_step.init_lm_state(params, tx, jax.random.key(4))
    step = jax.jit(lm_step.make_lm_train_step(cfg, tx))
    return state, step


def test_trainable_labels(setup):
    _, _, params, _ = setup
    labels = lm_step.trainable_labels(params)
    assert set(jax.tree.leaves(labels["audio"])) == {"frozen"}
    for k in lm_step.TRAINABLE:
        assert set(jax.tree.leaves(labels[k])) == {"train"}
    sem = lm_step.trainable_labels(params, train_semantic=True)["audio"]
    assert set(jax.tree.leaves(sem["decoder"]["semantic"])) == {"semantic"}
    assert set(jax.tree.leaves(sem["encoder"])) == {"frozen"}
    assert set(jax.tree.leaves(sem["decoder"]["fc1"])) == {"frozen"}


def _mixed_batch(tok, lat, rng):
    tts = [lm_data.tts_example(tok, SENTENCES[i], lat[200 * i: 200 * i + 180]) for i in range(3)]
    asr = [lm_data.asr_example(tok, lat[200 * i + 20: 200 * i + 200], SENTENCES[i]) for i in range(3)]
    return lm_data.make_batch(lm_data.mix_examples(tts, asr, 4, 0.5, rng), max_len=256, max_patches=64)


EDIT_ROWS = (("Delete the word 'there'.", "he hoped <edit></edit> would be stew"), ("Make it louder.", None),
             ("Insert 'hot' before 'stew'.", "there would be <edit><framePatch></edit> stew"), ("Speak faster.", None))


def _edit_batch(tok, lat, step):
    """An edit step as the lm stage builds it (whole steps of edit pairs): rows of (source, target) latents of the
    real utterance through lm_train.edit_examples_from_rows; two semantic pairs with the <cot_text> chain, two
    acoustic ones."""
    from unitok_jax.training import lm_train

    n = len(EDIT_ROWS)
    src = np.stack([lat[150 * i: 150 * i + 140] for i in range(n)])  # 28 source patches
    tgt = np.stack([lat[150 * i + 60: 150 * i + 200] for i in range(n)])  # 28 target patches
    frames = np.full(n, 140)
    rows = {"row": np.arange(n), "ok": np.ones(n, bool), "instruction": [r[0] for r in EDIT_ROWS],
            "target_markup": [r[1] for r in EDIT_ROWS]}
    exs, where, skipped = lm_train.edit_examples_from_rows(rows, (src, 0.1 * np.ones_like(src), frames),
                                                           (tgt, 0.1 * np.ones_like(tgt), frames), tok, P,
                                                           seed=0, step=step)
    assert skipped == 0 and where == list(range(n)) and all(e["task"] == "edit" for e in exs)
    return lm_data.make_batch(exs, max_len=256, max_patches=64)


def test_short_training_run_reduces_loss(setup, trainer):
    tok, _, params, lat = setup
    state, step = trainer
    rng = np.random.default_rng(0)
    # mixed TTS / ASR / edit training: TTS and ASR rows mixed within a step, every third step an edit step
    batches = [_mixed_batch(tok, lat, rng), _mixed_batch(tok, lat, rng), _edit_batch(tok, lat, 0)]
    assert any(b["is_tts"].any() and (~b["is_tts"]).any() for b in batches)
    assert batches[2]["flow_mask"].sum() == 4 * 28 and (batches[2]["text_labels"] != lm_data.IGNORE).any()
    losses, edit_metrics = [], []
    for i in range(40):
        state, m = step(state, batches[i % 3])
        losses.append(float(m["loss"]))
        if i % 3 == 2:
            edit_metrics.append({k: float(m[k]) for k in ("text_ce", "flow")})
        assert int(m["skipped_step"]) == 0
    first, last = np.mean(losses[:6]), np.mean(losses[-6:])
    print(f"LM loss first-6 {first:.3f} last-6 {last:.3f}; edit steps {edit_metrics[0]} -> {edit_metrics[-1]}")
    assert np.isfinite(losses).all() and last < 0.7 * first, losses
    # the edit steps learn too: their text CE (the <cot_text> chain and <gen_audio>) and flow loss (noisier: fresh
    # times and noise every step) fall, first two edit steps against the last two
    def mean(k, steps):
        return np.mean([m[k] for m in steps])

    assert mean("text_ce", edit_metrics[-2:]) < 0.7 * mean("text_ce", edit_metrics[:2]), edit_metrics
    assert mean("flow", edit_metrics[-2:]) < 0.85 * mean("flow", edit_metrics[:2]), edit_metrics
    assert int(state["step"]) == 40 and int(state["skipped"]) == 0
    # only the trainable parts moved
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state["params"]["audio"], params["audio"])
    assert all(jax.tree.leaves(same))
    for k in lm_step.TRAINABLE:
        moved = jax.tree.map(lambda a, b: not bool(jnp.array_equal(a, b)), state["params"][k], params[k])
        assert any(jax.tree.leaves(moved)), k


def test_non_finite_batch_is_skipped(setup, trainer):
    tok, _, _, lat = setup
    state, step = trainer
    good = _mixed_batch(tok, lat, np.random.default_rng(1))
    bad = {**good, "latents": good["latents"].copy()}
    bad["latents"][0, 3] = np.nan
    state, m = step(state, good)
    before = state
    state, m = step(state, bad)
    assert int(m["skipped_step"]) == 1 and int(state["skipped"]) == 1 and int(state["step"]) == 2
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), (state["params"], state["opt_state"]),
                        (before["params"], before["opt_state"]))
    assert all(jax.tree.leaves(same))
    state, m = step(state, good)
    assert int(m["skipped_step"]) == 0 and np.isfinite(float(m["loss"])) and int(state["skipped"]) == 1


# ------------------------------------------------------------------------------------------------ edit sequences


@pytest.mark.parametrize("semantic", [True, False])
def test_edit_example_labels_and_targets(setup, semantic):
    tok, _, _, lat = setup
    markup = "he hoped <edit><framePatch></edit> stew" if semantic else None
    ex = lm_data.edit_example(tok, lat[:17], "delete the word there", lat[20:42], markup)  # 3 source, 4 target
    ids, labels = ex["input_ids"], ex["text_labels"]
    prompt, src = text.edit_prompt(tok, 3, "delete the word there", semantic=semantic)
    sp = text.SPECIAL_TOKENS
    assist = tok.encode((sp["cot_text"] + markup + sp["cot_text_end"] if semantic else "") + sp["gen_audio"])
    assert list(ids) == prompt + assist + [tok.id("audio_patch")] * 4
    assert (ids[-5] == tok.id("gen_audio")) and (tok.id("answer") in prompt) == semantic
    # labels: exactly the assistant text (shifted by one), <gen_audio> included, nothing on the audio
    labelled = np.flatnonzero(labels != lm_data.IGNORE)
    np.testing.assert_array_equal(labelled, len(prompt) - 1 + np.arange(len(assist)))
    np.testing.assert_array_equal(labels[labelled], ids[labelled + 1])
    # audio inputs: source patches in the prompt, then the target patches
    tgt = len(ids) - 4
    np.testing.assert_array_equal(np.flatnonzero(ex["audio_patch_mask"]), list(src + np.arange(3)) + list(tgt + np.arange(4)))
    np.testing.assert_array_equal(ex["latents"], np.concatenate([lat[:15], lat[20:40]]))
    assert ex["gen_start"] == 3 and ex["gen_patches"] == 4 and ex["patch_start"] == tgt and not ex["audio_gate"].any()
    np.testing.assert_array_equal(ex["patch_cond_index"][3:], tgt - 1 + np.arange(4))  # <gen_audio>, then patches
    b = lm_data.make_batch([ex, lm_data.tts_example(tok, SENTENCES[0], lat[:30])])
    np.testing.assert_array_equal(b["flow_mask"][0, :8], [False] * 3 + [True] * 4 + [False])
    np.testing.assert_array_equal(b["flow_mask"][1, :8], [True] * 6 + [False] * 2)


def test_edit_rows_train_the_target_with_zero_history(setup, loss_fn):
    tok, cfg, params, lat = setup
    ex = lm_data.edit_example(tok, lat[:50], "make it louder", lat[100:150])
    batch = {k: jnp.asarray(v) for k, v in lm_data.make_batch([ex]).items()}
    key = jax.random.key(0)
    loss, m = loss_fn(params, cfg, batch, key, deterministic=True)
    assert np.isfinite(float(loss)) and int(m["flow_patches"]) == 10 and int(m["text_tokens"]) == 1
    # With LinearPooling zero-initialised (as init_params does), latents reach the loss only as flow targets and
    # flow history. The source is no target, and the first target patch's history is zeros, not the last source
    # patch: changing the source leaves the loss unchanged; changing target patch 0 does not.
    u = jax.random.normal(jax.random.key(1), (2, 5, cfg.heads.semantic_dim))
    pooled = model.pool(params, cfg, u)
    np.testing.assert_array_equal(pooled[0], pooled[1])  # the premise: pooling ignores its input at init
    src_moved = dict(batch, latents=batch["latents"].at[0, :50].add(1.0))
    tgt_moved = dict(batch, latents=batch["latents"].at[0, 50:55].add(1.0))
    assert float(loss_fn(params, cfg, src_moved, key, deterministic=True)[0]) == pytest.approx(float(loss), abs=1e-6)
    assert float(loss_fn(params, cfg, tgt_moved, key, deterministic=True)[0]) != pytest.approx(float(loss), abs=1e-3)
