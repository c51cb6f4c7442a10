"""BailingMoE LLM: parity against the reference fixtures (llm.*, llm_rope3d.*) and decoding properties."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, load_fixture, rel_err
from unitok_jax.convert.llm import convert_llm
from unitok_jax.configs.llm import TINY_LLM_CONFIG
from unitok_jax.llm import (
    BailingMoeLM,
    LLMConfig,
    decode_step,
    generate,
    get_rope_index,
    init_cache,
    prefill,
    random_params,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def llm():
    cfg_json, arrays = load_fixture("llm")
    cfg, params = convert_llm(FIXTURES / "llm.safetensors", cfg_json)
    model = BailingMoeLM(cfg)
    fwd = jax.jit(
        lambda p, ids, emb, am: model.apply(
            p, ids, emb, audio_mask=am, output_router=True, output_hidden_states=True
        )
    )
    return cfg, params, model, arrays, fwd


@pytest.fixture(scope="module")
def llm3d():
    cfg_json, arrays = load_fixture("llm_rope3d")
    cfg, params = convert_llm(FIXTURES / "llm_rope3d.safetensors", cfg_json)
    return cfg, params, BailingMoeLM(cfg), arrays


def _check_router(out, d, prefix=""):
    r = out["router"]
    assert rel_err(r["router_logits"], d[prefix + "router_logits"]) <= TOL
    np.testing.assert_array_equal(np.asarray(r["topk_idx"]), d[prefix + "router_topk_idx"])
    assert rel_err(r["topk_weight"], d[prefix + "router_topk_weight"]) <= TOL


# ------------------------------------------------------------------------------------------------- parity


@pytest.mark.parity
def test_llm_parity_from_ids(llm):
    cfg, params, _, d, fwd = llm
    out = fwd(params, d["input_ids"], None, None)
    assert rel_err(out["logits"], d["logits"]) <= TOL
    assert out["logits"].dtype == jnp.float32
    assert rel_err(out["hidden"], d["last_hidden_state"]) <= TOL
    assert rel_err(out["hidden_states"], d["hidden_states"]) <= TOL
    _check_router(out, d)


@pytest.mark.parity
def test_llm_parity_from_embeds(llm):
    _, params, model, d, fwd = llm
    emb = model.apply(params, d["input_ids"], method="embed_tokens")
    assert rel_err(emb, d["embeds_inputs_embeds"]) <= TOL
    out = fwd(params, None, d["embeds_inputs_embeds"], None)
    assert rel_err(out["logits"], d["embeds_logits"]) <= TOL
    assert rel_err(out["hidden"], d["embeds_last_hidden_state"]) <= TOL


@pytest.mark.parity
def test_llm_parity_audio_gate(llm):
    cfg, params, _, d, fwd = llm
    out = fwd(params, None, d["am_inputs_embeds"], d["am_audio_mask"])
    assert rel_err(out["logits"], d["am_logits"]) <= TOL
    assert rel_err(out["hidden"], d["am_last_hidden_state"]) <= TOL
    _check_router(out, d, "am_")
    if cfg.multi_gate and d["am_audio_mask"].any():
        # The mask matters: without it the audio positions are routed by the text gate.
        plain = fwd(params, None, d["am_inputs_embeds"], None)
        assert rel_err(plain["router"]["router_logits"], d["am_router_logits"]) > 1e-3


@pytest.mark.parity
def test_llm_parity_cached_prefill_and_steps(llm):
    cfg, params, model, d, _ = llm
    ids = d["input_ids"]
    t_pre, n_steps = d["inc_prefill_logits"].shape[1], d["inc_step_logits"].shape[0]
    cache = init_cache(cfg, ids.shape[0], t_pre + n_steps)
    out = jax.jit(lambda p, x, c: model.apply(p, x, cache=c))(params, ids[:, :t_pre], cache)
    assert rel_err(out["logits"], d["inc_prefill_logits"]) <= TOL
    cache = out["cache"]
    step = jax.jit(lambda p, c, tok: decode_step(model, p, c, input_ids=tok))
    for s in range(n_steps):
        logits, hidden, cache = step(params, cache, ids[:, t_pre + s])
        assert rel_err(logits, d["inc_step_logits"][s]) <= TOL, s
        assert rel_err(hidden, d["inc_step_last_hidden"][s]) <= TOL, s
    # Our cache is [L, B, S, K, d]; the reference's [L, B, K, S, d].
    assert rel_err(np.transpose(cache["k"], (0, 1, 3, 2, 4)), d["inc_cache_keys"]) <= TOL
    assert rel_err(np.transpose(cache["v"], (0, 1, 3, 2, 4)), d["inc_cache_values"]) <= TOL
    np.testing.assert_array_equal(np.asarray(cache["length"]), [t_pre + n_steps] * ids.shape[0])


@pytest.mark.parity
def test_llm_parity_rope3d(llm3d):
    cfg, params, model, d = llm3d
    assert cfg.rope_3d and cfg.sections == (16, 24, 24)  # the reference hard-codes head_dim 128
    ids = d["r3_input_ids"]
    b, t_pre = d["r3_position_ids"].shape[1:]
    pos, deltas = get_rope_index(jnp.ones((b, t_pre), jnp.int32))
    np.testing.assert_array_equal(np.asarray(pos), d["r3_position_ids"])
    np.testing.assert_array_equal(np.asarray(deltas), d["r3_rope_deltas"])
    fwd = jax.jit(lambda p, x, rp, c: model.apply(p, x, rope_positions=rp, cache=c))
    out = fwd(params, ids[:, :t_pre], pos, init_cache(cfg, b, ids.shape[1]))
    assert rel_err(out["logits"], d["r3_logits"]) <= TOL
    assert rel_err(out["hidden"], d["r3_last_hidden_state"]) <= TOL
    cache = out["cache"]
    for s in range(d["r3_step_logits"].shape[0]):
        o = fwd(params, ids[:, t_pre + s : t_pre + s + 1], d["r3_step_position_ids"][s], cache)
        cache = o["cache"]
        assert rel_err(o["logits"][:, 0], d["r3_step_logits"][s]) <= TOL, s
    # Rows that differ pin the section layout (t/h/w); no cache.
    o = jax.jit(lambda p, x, rp: model.apply(p, x, rope_positions=rp))(params, ids[:, :t_pre],
                                                                      d["r3_mrope_position_ids"])
    assert rel_err(o["logits"], d["r3_mrope_logits"]) <= TOL
    assert rel_err(o["logits"], d["r3_logits"]) > 1e-3  # the synthetic positions really change the result


# --------------------------------------------------------------------------------------- decoding properties


def _tiny(**kw) -> LLMConfig:
    return LLMConfig.from_hf({**TINY_LLM_CONFIG, "vocab_size": 97, "multi_gate": True}, **kw)


def _init(model, seed):
    return random_params(model.cfg, seed)


@pytest.fixture(scope="module")
def tiny():
    cfg = _tiny()
    model = BailingMoeLM(cfg)
    params = _init(model, 1)
    fwd = jax.jit(lambda p, x, v: model.apply(p, x, valid=v))
    return cfg, model, params, fwd


def test_llm_right_padded_batch_prefill_then_steps_equals_full_forward(tiny):
    cfg, model, params, fwd = tiny
    rng = np.random.default_rng(0)
    lengths = np.array([5, 9, 1])
    t, steps = int(lengths.max()), 3
    full_ids = rng.integers(1, cfg.vocab_size, size=(3, t + steps)).astype(np.int32)
    prompts = full_ids[:, :t].copy()
    for i, n in enumerate(lengths):
        prompts[i, n:] = rng.integers(1, cfg.vocab_size, size=t - n)  # garbage padding must not matter
    cache = init_cache(cfg, 3, t + steps)
    logits, hidden, cache = jax.jit(lambda p, c, x, n: prefill(model, p, c, input_ids=x, lengths=n))(
        params, cache, prompts, jnp.asarray(lengths)
    )
    step = jax.jit(lambda p, c, tok: decode_step(model, p, c, input_ids=tok))
    got = [np.asarray(logits)]
    for s in range(steps):
        lg, _, cache = step(params, cache, full_ids[np.arange(3), lengths + s])
        got.append(np.asarray(lg))
    np.testing.assert_array_equal(np.asarray(cache["length"]), lengths + steps)
    # Reference: no cache, no padding inside the sequence (the causal mask makes later columns irrelevant).
    full = np.asarray(fwd(params, full_ids, None)["logits"])
    for i, n in enumerate(lengths):
        for s in range(steps + 1):
            np.testing.assert_allclose(got[s][i], full[i, n - 1 + s], rtol=1e-4, atol=1e-4)


def test_llm_causal_and_padding_invariance(tiny):
    cfg, model, params, fwd = tiny
    x = np.random.default_rng(1).integers(1, cfg.vocab_size, size=(3, 12)).astype(np.int32)
    y = x.copy()
    y[:, 5:] = (y[:, 5:] + 7) % cfg.vocab_size
    a = np.asarray(fwd(params, x, None)["logits"])
    b = np.asarray(fwd(params, y, None)["logits"])
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(a[:, 5:] - b[:, 5:])) > 1e-3
    # Invalid (valid=False) tokens are invisible even when they come first.
    valid = np.ones_like(x, bool)
    valid[:, :3] = False
    c = np.asarray(fwd(params, x, valid)["logits"])
    z = x.copy()
    z[:, :3] = 1
    d = np.asarray(fwd(params, z, valid)["logits"])
    np.testing.assert_allclose(c[:, 3:], d[:, 3:], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gen(tiny):
    cfg, model, params, _ = tiny
    return jax.jit(lambda p, x, n, eos: generate(model, p, x, n, 5, eos_id=eos))


def test_llm_generate_while_loop_matches_uncached_greedy(tiny, gen):
    cfg, model, params, fwd = tiny
    rng = np.random.default_rng(2)
    lengths = np.array([3, 6, 5])
    prompts = rng.integers(1, cfg.vocab_size, size=(3, 6)).astype(np.int32)
    tokens, num = gen(params, prompts, jnp.asarray(lengths), -1)  # -1: no end token
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(np.asarray(num), [5, 5, 5])
    seqs = np.zeros((3, 12), np.int32)
    for i, n in enumerate(lengths):
        seqs[i, :n], seqs[i, n : n + 5] = prompts[i, :n], tokens[i]
    greedy = np.asarray(jnp.argmax(fwd(params, seqs, None)["logits"], -1))
    for i, n in enumerate(lengths):  # teacher-forced greedy choice at every generated position
        np.testing.assert_array_equal(greedy[i, n - 1 : n + 4], tokens[i])


def test_llm_generate_stops_at_eos(tiny, gen):
    cfg, model, params, _ = tiny
    prompts = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0], [3, 3, 0, 0, 0, 0]], np.int32)
    lengths = jnp.array([6, 3, 2])
    free, _ = gen(params, prompts, lengths, -1)
    free = np.asarray(free)
    # The first token of row 0 that it has not produced before (at j >= 1) becomes the end token.
    j = next(j for j in range(1, 5) if free[0, j] not in free[0, :j])
    eos = int(free[0, j])
    tokens, num = gen(params, prompts, lengths, eos)
    assert int(num[0]) == j + 1
    np.testing.assert_array_equal(np.asarray(tokens[0]), list(free[0, : j + 1]) + [eos] * (4 - j))
    for i in (1, 2):  # other rows are unaffected until they produce it themselves
        row, ref = np.asarray(tokens[i]), np.asarray(free[i])
        stop = int(np.argmax(ref == eos)) if np.any(ref == eos) else 5
        np.testing.assert_array_equal(row[: stop + 1], ref[: stop + 1])


def test_llm_dense_first_layers_and_cache():
    cfg = _tiny(first_k_dense_replace=1, num_layers=3)
    model = BailingMoeLM(cfg)
    params = _init(model, 3)
    p = params["params"]
    assert p["dense"]["layers"]["mlp"]["gate"]["kernel"].shape == (1, cfg.width, cfg.mlp_dim)
    assert p["moe"]["layers"]["moe"]["wi_gate"].shape[:2] == (2, cfg.num_experts)
    x = np.random.default_rng(3).integers(1, cfg.vocab_size, size=(2, 7)).astype(np.int32)
    full = jax.jit(lambda p, x: model.apply(p, x, output_hidden_states=True))(params, x)
    assert full["hidden_states"].shape == (4, 2, 7, cfg.width)
    assert full["moe"]["counts"].shape == (2, cfg.num_experts)
    cache = init_cache(cfg, 2, 7)
    _, _, cache = jax.jit(lambda p, c, x: prefill(model, p, c, input_ids=x))(params, cache, x[:, :4])
    assert cache["k"].shape[0] == 3
    step = jax.jit(lambda p, c, tok: decode_step(model, p, c, input_ids=tok))
    for s in range(4, 7):
        lg, _, cache = step(params, cache, x[:, s])
        np.testing.assert_allclose(lg, full["logits"][:, s], rtol=1e-4, atol=1e-4)


def test_llm_inference_reads_experts_out_of_the_stack():
    # prefill / decode_step on CPU read each routed expert with one (layer, expert) slice of the stacked weights
    # [L, E, D, F] (moe.MoE's `stacked`); a training forward keeps the per-layer params. Equality of the two paths
    # is what test_llm_dense_first_layers_and_cache and the cached parity test check.
    cfg = _tiny(first_k_dense_replace=1, num_layers=3)
    model = BailingMoeLM(cfg)
    params = _init(model, 3)
    f = params["params"]["moe"]["layers"]["moe"]["wi_gate"].shape[-1]
    stacked_read = f"slice_sizes=(1, 1, {cfg.width}, {f})"
    x = np.ones((3, 4), np.int32)  # decode of 3 rows: one or two tokens keep the fused gather of their experts
    cache = init_cache(cfg, 3, 6)
    pre = str(jax.make_jaxpr(lambda p, c: prefill(model, p, c, input_ids=x))(params, cache))
    dec = str(jax.make_jaxpr(lambda p, c: decode_step(model, p, c, input_ids=x[:, 0]))(params, cache))
    train = str(jax.make_jaxpr(lambda p: model.apply(p, x))(params))
    assert stacked_read in pre and stacked_read in dec
    assert stacked_read not in train


def test_llm_moe_metrics_and_aux_loss_off_by_default(tiny):
    cfg, model, params, fwd = tiny
    x = np.random.default_rng(4).integers(1, cfg.vocab_size, size=(3, 12)).astype(np.int32)
    valid = np.ones((3, 12), bool)
    valid[1, 4:] = False
    out = fwd(params, x, valid)
    counts = np.asarray(out["moe"]["counts"])
    assert counts.shape == (cfg.num_moe_layers, cfg.num_experts)
    np.testing.assert_array_equal(counts.sum(-1), [valid.sum() * cfg.num_experts_per_tok] * cfg.num_moe_layers)
    assert float(out["aux_loss"]) == 0.0
    assert np.all(np.asarray(out["moe"]["aux_loss"]) >= 1.0 - 1e-5)  # E * sum f P >= 1 (equality iff uniform)
    on_model = BailingMoeLM(dataclasses.replace(cfg, aux_loss_coef=0.01, z_loss_coef=0.001))
    loss = jax.jit(lambda p: on_model.apply(p, x, valid=valid, return_logits=False)["aux_loss"])(params)
    expect = 0.01 * np.mean(out["moe"]["aux_loss"]) + 0.001 * np.mean(out["moe"]["z_loss"])
    np.testing.assert_allclose(float(loss), expect, rtol=1e-6)


def test_llm_config_from_hf_rules():
    base = dict(TINY_LLM_CONFIG)
    assert LLMConfig.from_hf({k: v for k, v in base.items() if k != "use_bias"}).o_bias  # class default True
    assert LLMConfig.from_hf({**base, "num_shared_experts": 0}).shared_dim is None
    assert LLMConfig.from_hf({**base, "num_shared_experts": 2}).shared_dim == 2 * base["moe_intermediate_size"]
    c = LLMConfig.from_hf({**base, "rope_scaling": {"type": "3D", "factor": None}, "head_dim": 128,
                           "hidden_size": 64})
    assert c.rope_3d and c.sections == (16, 24, 24)
    with pytest.raises(ValueError, match="rope_scaling"):
        LLMConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.warns(UserWarning, match="mystery_knob"):
        LLMConfig.from_hf({**base, "mystery_knob": 1})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        LLMConfig.from_hf({**base, "num_experts_per_tok": 99})


def test_llm_get_rope_index_right_padding():
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pos, deltas = get_rope_index(mask)
    np.testing.assert_array_equal(np.asarray(pos[0]), [[0, 1, 2, 1, 1], [0, 1, 2, 3, 4]])
    assert pos.shape == (3, 2, 5) and np.all(np.asarray(pos[0]) == np.asarray(pos[2]))
    np.testing.assert_array_equal(np.asarray(deltas), [[-2], [0]])
