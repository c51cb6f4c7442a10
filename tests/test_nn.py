"""Shared building blocks: checked against direct NumPy formulas and against each other (cache vs whole)."""
from __future__ import annotations

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitok_jax.nn import (Attention, LayerNorm, RMSNorm, Stack, TransformerConfig, apply_rotary, init_cache,
                           mrope_angles, position_mask, rope_angles)


def _np_rope(x, pos, theta, layout):
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos[..., None] * inv  # [B, T, d/2]
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    if layout == "half":
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x2 * c + x1 * s
    return out


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotary_layouts_match_formula_at_long_positions(layout):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
    pos = np.array([[0, 1, 2, 4095, 4096], [9000, 20000, 3, 7, 100000]])  # beyond any fixed table
    ours = apply_rotary(jnp.asarray(x), rope_angles(jnp.asarray(pos), 16, 10000.0), layout)
    ref = _np_rope(x.astype(np.float64), pos.astype(np.float64), 10000.0, layout)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-3)  # fp32 angles at 1e5 rad
    ours_small = apply_rotary(jnp.asarray(x[:, :3]), rope_angles(jnp.asarray(pos[:1, :3]), 16, 10000.0), layout)
    np.testing.assert_allclose(np.asarray(ours_small),
                               _np_rope(x[:, :3].astype(np.float64), pos[:1, :3].astype(np.float64), 1e4, layout),
                               atol=1e-5)


def test_rotary_partial_heads_and_mrope_reduction():
    x = jax.random.normal(jax.random.key(0), (1, 4, 3, 8))
    ang = rope_angles(jnp.arange(4)[None] + 3, 8, 100.0)
    part = apply_rotary(x, ang, "interleaved", num_heads=1)
    np.testing.assert_array_equal(np.asarray(part[..., 1:, :]), np.asarray(x[..., 1:, :]))
    np.testing.assert_allclose(np.asarray(part[..., :1, :]),
                               np.asarray(apply_rotary(x, ang, "interleaved")[..., :1, :]), atol=1e-6)
    pos = jnp.arange(10)[None].repeat(2, 0)
    same = mrope_angles(jnp.stack([pos] * 3), 128, 6e5)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(rope_angles(pos, 128, 6e5)))
    rows = jnp.stack([pos, pos * 2, pos * 3])
    mixed = np.asarray(mrope_angles(rows, 128, 6e5))
    inv = 6e5 ** (-np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(mixed[..., 20], 2 * np.asarray(pos) * inv[20], rtol=1e-5)
    np.testing.assert_allclose(mixed[..., 50], 3 * np.asarray(pos) * inv[50], rtol=1e-5)


def test_norms_match_formulas():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(2, 5, 12)).astype(np.float32)
    rms = RMSNorm(1e-6)
    p = rms.init(jax.random.key(0), x)
    ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(rms.apply(p, jnp.asarray(x))), ref, rtol=1e-5)
    ln = LayerNorm(1e-5)
    p = ln.init(jax.random.key(0), x)
    p = jax.tree.map(lambda a: a * 0 + 1.5, p)  # scale 1.5, bias 1.5
    xd = x.astype(np.float64)
    ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5) * 1.5 + 1.5
    np.testing.assert_allclose(np.asarray(ln.apply(p, jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)


def _np_attention(x, p, n, k, d, mask):
    q = np.einsum("btd,dnh->btnh", x, p["q"]["kernel"]) + p["q"]["bias"]
    kk = np.einsum("btd,dnh->btnh", x, p["k"]["kernel"]) + p["k"]["bias"]
    v = np.einsum("btd,dnh->btnh", x, p["v"]["kernel"]) + p["v"]["bias"]
    g = n // k
    kk = np.repeat(kk, g, axis=2)
    v = np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(d)
    s = np.where(mask, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s = s / s.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", s, v)
    return np.einsum("btnh,nhd->btd", o, p["o"]["kernel"])


@pytest.mark.parametrize("window", [None, 1, 3])
def test_gqa_attention_matches_numpy_with_window_key_count(window):
    b, t, D, n, k, d = 2, 7, 16, 4, 2, 4
    att = Attention(n, k, d, rope=None)
    x = jax.random.normal(jax.random.key(0), (b, t, D))
    params = jax.tree.map(np.asarray, flax.linen.unbox(att.init(jax.random.key(1), x)["params"]))
    params["q"]["bias"] = np.random.default_rng(0).normal(size=params["q"]["bias"].shape).astype(np.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = position_mask(pos, pos, causal=True, window=window)
    # the key count is exact: a query sees min(i + 1, window) keys, its own included
    counts = np.asarray(mask).sum(-1)[0, 0]
    want = np.minimum(np.arange(t) + 1, window if window else t)
    np.testing.assert_array_equal(counts, want)
    ours, _ = att.apply({"params": params}, x, mask=mask)
    ref = _np_attention(np.asarray(x, np.float64), params, n, k, d, np.asarray(mask))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


def _cfg(**kw):
    base = dict(width=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=6, mlp_dim=40)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(sliding_window=3), dict(sliding_window=4, window_from_layer=1),
     dict(norm="layer", rope="interleaved", mlp_kind="gelu", mlp_bias=True, k_bias=False, o_bias=True)],
)
def test_stack_cache_chunks_equal_whole(kw):
    cfg = _cfg(**kw)
    stack = Stack(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 11, cfg.width))
    params = stack.init(jax.random.key(1), x)
    whole, _, _ = stack.apply(params, x)
    cache = init_cache(cfg, 2, 11)
    outs, start = [], 0
    for size in (4, 1, 3, 3):
        y, cache, _ = stack.apply(params, x[:, start : start + size], cache=cache)
        outs.append(y)
        start += size
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(whole), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(cache["length"]), [11, 11])


def test_stack_ring_cache_with_window_equals_whole():
    cfg = _cfg(sliding_window=3)
    stack = Stack(cfg)
    x = jax.random.normal(jax.random.key(2), (1, 12, cfg.width))
    params = stack.init(jax.random.key(1), x)
    whole, _, _ = stack.apply(params, x)
    cache = init_cache(cfg, 1, 3 + 2 - 1)  # window + max_chunk - 1 slots
    outs = []
    for start in range(0, 12, 2):
        y, cache, _ = stack.apply(params, x[:, start : start + 2], cache=cache)
        outs.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(whole), atol=2e-5)


def test_window_changes_output_and_bidirectional_sees_future():
    x = jax.random.normal(jax.random.key(3), (1, 9, 24))
    full = Stack(_cfg())
    params = full.init(jax.random.key(1), x)
    y_full, _, _ = full.apply(params, x)
    y_win, _, _ = Stack(_cfg(sliding_window=3)).apply(params, x)
    np.testing.assert_allclose(np.asarray(y_win[:, :3]), np.asarray(y_full[:, :3]), atol=1e-6)
    assert np.abs(np.asarray(y_win[:, 3:] - y_full[:, 3:])).max() > 1e-3
    bi = Stack(_cfg(causal=False))
    x2 = x.at[:, -1].add(1.0)
    a, _, _ = bi.apply(params, x)
    b, _, _ = bi.apply(params, x2)
    assert np.abs(np.asarray(a[:, 0] - b[:, 0])).max() > 1e-4


def test_cache_works_inside_jit_while_loop_with_ragged_batch():
    """Per-sequence lengths: right-padded prefill (valid mask) then single steps inside lax.while_loop."""
    cfg = _cfg()
    stack = Stack(cfg)
    x = jax.random.normal(jax.random.key(4), (2, 8, cfg.width))
    params = stack.init(jax.random.key(1), x)
    lens = jnp.array([5, 3])
    valid = jnp.arange(5)[None] < lens[:, None]

    @jax.jit
    def run(params, x):
        cache = init_cache(cfg, 2, 8)
        _, cache, _ = stack.apply(params, x[:, :5], cache=cache, valid=valid)

        def body(state):
            i, cache, outs = state
            # sequence b feeds its own next token: x[b, lens[b] + i]
            tok = jnp.take_along_axis(x, (lens + i)[:, None, None], axis=1)
            y, cache, _ = stack.apply(params, tok, cache=cache)
            return i + 1, cache, outs.at[:, i].set(y[:, 0])

        init = (0, cache, jnp.zeros((2, 3, cfg.width)))
        return jax.lax.while_loop(lambda s: s[0] < 3, body, init)

    _, cache, outs = run(params, x)
    np.testing.assert_array_equal(np.asarray(cache["length"]), [8, 6])
    for b in range(2):
        n = int(lens[b]) + 3
        whole, _, _ = stack.apply(params, x[b : b + 1, :n])
        np.testing.assert_allclose(np.asarray(outs[b]), np.asarray(whole[0, int(lens[b]) : n]), atol=2e-5)
