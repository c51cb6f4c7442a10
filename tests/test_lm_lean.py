"""Issue 18 (items 3, 4): the LM step without per-step waste.

* text logits only at the labelled positions (``train.text_positions``) give the same loss, metrics and gradients
  as the full-vocabulary logits at every position; a row with more labels than slots is counted, not hidden;
* the non-finite guard is one ``lax.cond`` (no select over every leaf);
* batch shapes come from the plan: every example a row can become fits the planned sizes;
* ``model.remat``, ``model.attention`` and the logical-axis rules are config keys;
* attention with the causal flag / window / valid keys passed to ``jax.nn.dot_product_attention`` equals the
  explicit-mask path.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_uniaudio

from unitok_jax import sharding as shd
from unitok_jax import text
from unitok_jax.configs import lm as lm_configs
from unitok_jax.nn.transformer import Stack, TransformerConfig
from unitok_jax.training import lm_data, lm_step, lm_train

SENTENCES = ["he hoped there would be stew for dinner", "turnips and carrots and bruised potatoes",
             "fat mutton pieces to be ladled out", "please translate the text to speech"]
P = 5


@pytest.fixture(scope="module")
def setup():
    tok, cfg, params = tiny_uniaudio(SENTENCES * 4)
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((400, cfg.vae.latent_dim)).astype(np.float32)
    # give the LM head / embeddings some weight so that the gradients are not trivially small
    return tok, cfg, params, lat


def _batch(tok, lat):
    exs = [lm_data.tts_example(tok, SENTENCES[0], lat[:60]),
           lm_data.asr_example(tok, lat[60:140], SENTENCES[1]),
           lm_data.asr_example(tok, lat[140:200], SENTENCES[2] + " " + SENTENCES[3]),
           lm_data.edit_example(tok, lat[200:260], "Delete the word 'there'.", lat[260:330],
                                "he hoped <edit></edit> would be stew", P)]
    return lm_data.make_batch(exs, max_len=160, max_patches=32)


def _loss_and_grads(params, cfg, batch, positions):
    def f(p):
        return lm_step.lm_loss(p, cfg, batch, jax.random.key(1), deterministic=True, text_positions=positions)

    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_logits_at_labels_equal_full_logits(setup):
    tok, cfg, params, lat = setup
    batch = _batch(tok, lat)
    batch.pop("is_tts")
    most = int(np.max(np.sum(batch["text_labels"] != lm_data.IGNORE, axis=1)))
    assert 4 < most < 160
    (full, mf), gf = _loss_and_grads(params, cfg, batch, 0)
    (lean, ml), gl = _loss_and_grads(params, cfg, batch, most)
    assert int(ml["text_dropped"]) == 0 and int(ml["text_tokens"]) == int(mf["text_tokens"]) > 0
    for k in ("loss", "text_ce", "text_acc", "flow", "stop"):
        assert abs(float(ml[k]) - float(mf[k])) <= 1e-5 * max(1.0, abs(float(mf[k]))), (k, ml[k], mf[k])
    # the gradients of every param (LM head, embeddings, blocks, flow head, ...) agree
    worst = max(_rel(a, b) for a, b in zip(jax.tree.leaves(gl), jax.tree.leaves(gf)) if np.any(np.asarray(b)))
    assert worst <= 1e-4, worst
    assert float(np.linalg.norm(np.asarray(gl["model"]["lm_head"]))) > 0


def test_too_few_label_slots_are_counted(setup):
    tok, cfg, params, lat = setup
    batch = _batch(tok, lat)
    batch.pop("is_tts")
    counts = np.sum(batch["text_labels"] != lm_data.IGNORE, axis=1)
    (_, mf), _ = _loss_and_grads(params, cfg, batch, 0)
    (_, ms), _ = _loss_and_grads(params, cfg, batch, 4)
    assert int(ms["text_dropped"]) == int(np.sum(np.maximum(counts - 4, 0))) > 0
    assert int(ms["text_tokens"]) == int(np.sum(np.minimum(counts, 4)))
    assert abs(float(ms["text_ce"]) - float(mf["text_ce"])) > 1e-4  # not the full loss: it must show


def test_labelled_positions_keep_sequence_order():
    labels = jnp.array([[-100, 5, -100, 7, 8], [-100] * 5, [1, 2, 3, 4, 5]])
    valid = jnp.array([[True] * 5, [True] * 5, [True, True, True, True, False]])
    idx, taken, dropped = lm_step.labelled_positions(labels, valid, 3)
    np.testing.assert_array_equal(np.asarray(idx)[0], [1, 3, 4])
    np.testing.assert_array_equal(np.asarray(taken), [[1, 1, 1], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(idx)[2], [0, 1, 2])
    assert int(dropped) == 1  # row 2 has 4 valid labels for 3 slots


def test_non_finite_guard_is_one_cond(setup):
    tok, cfg, params, lat = setup
    tx = lm_step.masked_optimizer(params, lm_step.adamw(1e-3, warmup_steps=0))
    state = lm_step.init_lm_state(params, tx, jax.random.key(0))
    batch = _batch(tok, lat)
    batch.pop("is_tts")
    jaxpr = jax.make_jaxpr(lm_step.make_lm_train_step(cfg, tx, text_positions=64))(state, batch)
    top = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert top.count("cond") == 1
    n_leaves = len(jax.tree.leaves((state["params"], state["opt_state"])))
    assert top.count("select_n") < n_leaves // 2, top.count("select_n")  # no per-leaf select


def test_planned_sizes_hold_every_example(setup):
    """Whatever task a record becomes, its example fits the sizes planned from the plan alone."""
    tok, _, _, lat = setup
    records = [{"text": t} for t in SENTENCES] + [{"text": ""}]
    sizes = lm_train.row_sizes(records, tok, P)
    assert sizes[-1] == 0
    frames = 73
    max_len, max_patches = lm_train.planned_sizes(max(sizes), frames // P)
    for r, t in enumerate(SENTENCES):
        # as the loop builds them (lm_train.examples_from_rows: the language detected from the text)
        asr = lm_data.asr_example(tok, lat[:frames], t, text.detect_lang(t), P)
        for ex in (lm_data.tts_example(tok, t, lat[:frames], P), asr):
            assert len(ex["input_ids"]) <= sizes[r] + frames // P <= max_len
            assert ex["num_patches"] <= max_patches
    edits = [{"text": "a", "instruction": "Delete the word 'there'.", "target_markup": "he <edit></edit> hoped"},
             {"text": "b", "instruction": "Speak faster.", "target_markup": None}]
    es = lm_train.row_sizes(edits, tok, P, edit=True)
    max_len, max_patches = lm_train.planned_sizes(max(es), 2 * (frames // P))
    for r, e in enumerate(edits):
        ex = lm_data.edit_example(tok, lat[:frames], e["instruction"], lat[100:100 + frames], e["target_markup"], P)
        assert len(ex["input_ids"]) <= max_len and ex["num_patches"] <= max_patches
    assert lm_train.planned_sizes(10, 3, seq_len=256, max_patches=32) == (256, 32)


def test_config_keys_remat_attention_dispatch_rules():
    config = lm_configs.get_config("tiny")
    assert lm_configs.sharding_rules(config) == shd.DEFAULT_RULES
    config.rules.vocab = ""
    config.rules.batch = "data"
    rules = dict(lm_configs.sharding_rules(config))
    assert rules["vocab"] is None and rules["batch"] == "data" and rules["embed"] == "fsdp"
    config.rules.mlp = "tensr"
    with pytest.raises(ValueError, match="tensr"):
        lm_configs.sharding_rules(config)

    config = lm_configs.get_config("tiny")
    base = lm_train.with_training_options(config, lm_train.model_config(config))
    assert not base.llm.remat and base.llm.attention_impl is None
    assert base.llm.moe_dispatch == "psum"
    config.model.remat = True
    config.model.attention = "xla"
    config.model.moe_dispatch = "a2a"
    cfg = lm_train.with_training_options(config, lm_train.model_config(config))
    assert cfg.llm.remat and cfg.llm.attention_impl == "xla" and cfg.llm.moe_dispatch == "a2a"
    exported = lm_train.with_training_options(config, cfg, export=True)
    assert not exported.llm.remat and exported.llm.attention_impl is None and exported.llm.moe_dispatch == "psum"
    config.model.attention = "flash"
    with pytest.raises(lm_train.SetupError, match="flash"):
        lm_train.with_training_options(config, cfg)
    config.model.attention = "xla"
    config.model.moe_dispatch = "ring"
    with pytest.raises(lm_train.SetupError, match="ring"):
        lm_train.with_training_options(config, cfg)


def test_remat_and_xla_attention_give_the_same_loss(setup):
    tok, cfg, params, lat = setup
    batch = _batch(tok, lat)
    batch.pop("is_tts")
    (a, _), ga = _loss_and_grads(params, cfg, batch, 64)
    other = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, remat=True, attention_impl="xla"))
    (b, _), gb = _loss_and_grads(params, other, batch, 64)
    assert abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)))
    assert max(_rel(x, y) for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)) if np.any(np.asarray(y))) <= 1e-5


# (a window without causality keeps the explicit mask on both paths, so that combination is not a case here)
@pytest.mark.parametrize("window,causal", [(None, True), (None, False), (3, True)])
def test_flags_and_lengths_equal_explicit_masks(window, causal):
    """The stack at default positions (causal flag, window, valid keys to jax.nn.dot_product_attention) == the same
    stack given the positions explicitly (the [B, 1, T, S] mask path)."""
    cfg = TransformerConfig(width=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                            causal=causal, sliding_window=window)
    stack = Stack(cfg)
    x = jax.random.normal(jax.random.key(0), (3, 11, 32))
    valid = jnp.arange(11)[None, :] < jnp.array([11, 7, 1])[:, None]
    params = stack.init(jax.random.key(1), x, valid=valid)
    pos = jnp.broadcast_to(jnp.arange(11), (3, 11))
    fused = stack.apply(params, x, valid=valid)[0]
    masked = stack.apply(params, x, positions=pos, valid=valid)[0]
    np.testing.assert_allclose(np.asarray(fused), np.asarray(masked), rtol=1e-6, atol=1e-6)
    # and the fused path really takes no [B, 1, T, S] mask: its jaxpr has no [3, 1, 11, 11] bool
    jaxpr = str(jax.make_jaxpr(lambda v: stack.apply(params, x, valid=v))(valid))
    assert "bool[3,1,11,11]" not in jaxpr
    if causal:  # (a bidirectional mask is [B, 1, 1, S] on both paths)
        explicit = str(jax.make_jaxpr(lambda v: stack.apply(params, x, positions=pos, valid=v))(valid))
        assert "bool[3,1,11,11]" in explicit
