"""Dropless MoE: grouped matmul (ragged_dot / tiled) == dense reference (values and gradients), routing rules,
auxiliary losses, and compiled cost that scales with top-k rather than with the number of experts."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitok_jax import moe
from unitok_jax.moe import MoE, dense_moe_ffn, sorted_moe_ffn


def _weights(rng, e, d, f):
    return (
        jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), jnp.float32),
        jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), jnp.float32),
        jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), jnp.float32),
    )


def _case(seed, n, e, k, d=16, f=24, used=None):
    """Random tokens and choices; only experts in ``used`` receive tokens (the rest get none)."""
    rng = np.random.default_rng(seed)
    used = np.arange(e) if used is None else np.asarray(used)
    idx = np.stack([rng.choice(used, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    w = rng.random((n, k)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    return x, jnp.asarray(idx), jnp.asarray(w), _weights(rng, e, d, f)


@pytest.mark.parametrize("impl", ["ragged", "tiled", "loop"])
@pytest.mark.parametrize(
    "n,e,k,used",
    [(13, 8, 2, [0, 2, 3, 6]), (11, 6, 1, [1, 4]), (9, 4, 4, None)],
    ids=["top2-empty-experts", "top1-empty-experts", "top-k=E"],
)
def test_moe_grouped_equals_dense_values_and_grads(impl, n, e, k, used):
    x, idx, w, (wg, wu, wd) = _case(n * 7 + e, n, e, k, used=used)
    if used is not None:
        counts = np.bincount(np.asarray(idx).ravel(), minlength=e)
        assert (counts == 0).any()  # some expert really receives nothing

    def loss(fn, x, w, wg, wu, wd):
        y = fn(x, idx, w, wg, wu, wd)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))), y

    grouped = lambda *a: sorted_moe_ffn(*a, impl=impl)  # noqa: E731
    g_fn = jax.jit(jax.value_and_grad(lambda *a: loss(grouped, *a), argnums=(0, 1, 2, 3, 4), has_aux=True))
    d_fn = jax.jit(jax.value_and_grad(lambda *a: loss(dense_moe_ffn, *a), argnums=(0, 1, 2, 3, 4), has_aux=True))
    (_, yg), gg = g_fn(x, w, wg, wu, wd)
    (_, yd), gd = d_fn(x, w, wg, wu, wd)
    np.testing.assert_allclose(yg, yd, rtol=1e-5, atol=1e-5)
    for a, b in zip(gg, gd):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["tiled", "loop"])
@pytest.mark.parametrize("tile", [1, 3, 8, 128])
def test_moe_tiled_any_tile_size(impl, tile):
    x, idx, w, (wg, wu, wd) = _case(5, 21, 5, 2, used=[0, 1, 4])
    y = jax.jit(lambda *a: moe.sorted_moe_ffn(*a, impl=impl, tile=tile))(x, idx, w, wg, wu, wd)
    np.testing.assert_allclose(y, dense_moe_ffn(x, idx, w, wg, wu, wd), rtol=1e-5, atol=1e-5)


def test_moe_sort_slots_and_tiled_layout():
    idx = jnp.array([[2, 0], [2, 1], [0, 2]])
    order, token, gs = moe.sort_slots(idx, 4)
    np.testing.assert_array_equal(np.asarray(gs), [2, 1, 3, 0])
    np.testing.assert_array_equal(np.asarray(idx).ravel()[np.asarray(order)], [0, 0, 1, 2, 2, 2])
    np.testing.assert_array_equal(np.asarray(token), np.asarray(order) // 2)
    dest, tile_group, n_tiles = moe._tiled_layout(gs, 6, 2)
    assert n_tiles == (6 + 4 * 1) // 2
    # expert 0 -> tile 0, expert 1 -> tile 1 (one row + padding), expert 2 -> tiles 2, 3
    np.testing.assert_array_equal(np.asarray(dest), [0, 1, 2, 4, 5, 6])
    np.testing.assert_array_equal(np.asarray(tile_group)[:4], [0, 1, 2, 2])


def test_moe_routing_rules():
    logits = jnp.array([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 3.0 - 1e-3, 1.0]])
    probs, idx, w = moe.route(logits, 2, True)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits, -1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(idx), [[0, 1], [1, 2]])  # descending score
    np.testing.assert_allclose(np.sum(w, -1), 1.0, rtol=1e-6)
    _, _, w_raw = moe.route(logits, 2, False)
    np.testing.assert_allclose(w_raw, np.take_along_axis(np.asarray(probs), np.asarray(idx), -1), rtol=1e-6)
    _, idx1, w1 = moe.route(logits, 1, True)  # top-1 is never renormalised
    np.testing.assert_allclose(w1[:, 0], np.max(np.asarray(probs), -1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(idx1)[:, 0], [0, 1])


def test_moe_aux_losses_and_counts():
    e = 4
    uniform = jnp.full((8, e), 1.0 / e)
    balanced = jnp.asarray(np.arange(8)[:, None] % e, jnp.int32)
    np.testing.assert_allclose(moe.load_balance_loss(uniform, balanced), 1.0, rtol=1e-6)
    peaked = jax.nn.one_hot(jnp.zeros(8, jnp.int32), e)
    np.testing.assert_allclose(moe.load_balance_loss(peaked, jnp.zeros((8, 1), jnp.int32)), float(e), rtol=1e-6)
    valid = jnp.arange(8) < 6
    counts = moe.expert_counts(balanced, e, valid)
    np.testing.assert_array_equal(np.asarray(counts), [2, 2, 1, 1])
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((8, e)), jnp.float32)
    lse = np.log(np.sum(np.exp(np.asarray(logits, np.float64)), -1))
    np.testing.assert_allclose(moe.router_z_loss(logits), np.mean(lse**2), rtol=1e-5)
    np.testing.assert_allclose(moe.router_z_loss(logits, valid), np.mean(lse[:6] ** 2), rtol=1e-5)


def _module(impl, e=6, k=2, multi_gate=True):
    return MoE(num_experts=e, top_k=k, expert_dim=24, shared_dim=16, multi_gate=multi_gate, impl=impl)


def test_moe_module_impls_agree_including_param_grads():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 16)), jnp.float32)
    audio = jnp.asarray(np.random.default_rng(2).random((2, 9)) < 0.4)
    valid = jnp.ones((2, 9), bool).at[1, 7:].set(False)
    params = jax.jit(lambda r: nn.unbox(_module("dense").init(r, x)))(jax.random.PRNGKey(0))
    assert params["params"]["wi_gate"].shape == (6, 16, 24) and "audio_gate" in params["params"]
    results = {}
    for impl in ("dense", "ragged", "tiled", "loop"):
        m = _module(impl)

        def loss(p, x, m=m):
            y, info = m.apply(p, x, audio_mask=audio, valid=valid)
            return jnp.sum(jnp.sin(y)) + info["aux_loss"] + info["z_loss"], (y, info)

        results[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    (_, (y0, i0)), g0 = results["dense"]
    assert float(jnp.abs(g0[0]["params"]["gate"]).sum()) > 0  # the router learns through the combine weights
    for impl in ("ragged", "tiled", "loop"):
        (_, (y, info)), g = results[impl]
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(info["topk_idx"]), np.asarray(i0["topk_idx"]))
        np.testing.assert_array_equal(np.asarray(info["counts"]), np.asarray(i0["counts"]))
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert int(np.sum(i0["counts"])) == int(valid.sum()) * 2


@pytest.mark.parametrize("tile", [None, 1, 4])
def test_moe_loop_reads_its_layer_out_of_the_stacked_weights(tile):
    # three layers' experts stacked [L, E, ...]; the loop with layer=1 must use exactly layer 1's experts
    x, idx, w, layer1 = _case(11, 9, 5, 2, used=[0, 2, 3])
    rng = np.random.default_rng(3)
    others = [_weights(rng, 5, 16, 24) for _ in range(2)]
    stacked = [jnp.stack([others[0][i], layer1[i], others[1][i]]) for i in range(3)]
    f = jax.jit(lambda x, idx, w, layer: sorted_moe_ffn(x, idx, w, *stacked, impl="loop", tile=tile, layer=layer))
    want = dense_moe_ffn(x, idx, w, *layer1)
    np.testing.assert_allclose(f(x, idx, w, jnp.int32(1)), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(f(x, idx, w, jnp.int32(0)), want, atol=1e-3)  # another layer gives another answer
    with pytest.raises(ValueError, match="'loop' form only"):
        sorted_moe_ffn(x, idx, w, *stacked, impl="tiled", layer=jnp.int32(1))


def test_moe_module_stacked_read_equals_its_own_params():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 16)), jnp.float32)
    m = _module("auto")
    params = jax.jit(lambda r: nn.unbox(m.init(r, x)))(jax.random.PRNGKey(1))
    p = params["params"]
    y0, _ = m.apply(params, x)
    # the stack holds this layer at index 2 of 3; the module's own expert params are then ignored
    junk = jax.tree.map(jnp.zeros_like, p)
    stacked = tuple(jnp.stack([p[n] * 0.5, p[n] * 2.0, p[n]]) for n in ("wi_gate", "wi_up", "wo"))
    y1, _ = m.apply({"params": {**p, **{n: junk[n] for n in ("wi_gate", "wi_up", "wo")}}}, x,
                    stacked=(*stacked, jnp.int32(2)))
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    # an explicit non-loop implementation keeps reading its own params (the stack is ignored)
    y2, _ = _module("dense").apply(params, x, stacked=(*stacked, jnp.int32(0)))
    np.testing.assert_allclose(y2, y0, rtol=1e-5, atol=1e-5)


def _moe_flops(impl, e, k, n_tokens=1024, d=64, f=128):
    m = MoE(num_experts=e, top_k=k, expert_dim=f, impl=impl)
    x = jax.ShapeDtypeStruct((4, n_tokens // 4, d), jnp.float32)
    params = jax.eval_shape(lambda: nn.unbox(m.init(jax.random.PRNGKey(0), jnp.zeros(x.shape))))
    compiled = jax.jit(lambda p, x: m.apply(p, x)[0]).lower(params, x).compile()
    return float(compiled.cost_analysis()["flops"])


def test_moe_compiled_flops_scale_with_top_k_not_num_experts():
    """On the batched tile layout, whose compiled cost XLA can see (the "loop" form runs the same tiles but XLA's
    cost analysis counts a loop body once; "ragged" lowers to a dense masked product on CPU)."""
    useful = 2 * 1024 * 2 * 3 * 64 * 128  # tokens * k * three matmuls * 2 D F
    f8, f32 = _moe_flops("tiled", 8, 2), _moe_flops("tiled", 32, 2)
    assert abs(f32 / f8 - 1.0) < 0.10, (f8, f32)
    assert f8 < 1.6 * useful, (f8, useful)  # near the useful work (tile padding + router + sort)
    assert _moe_flops("tiled", 8, 4) / f8 > 1.6  # twice the top-k: about twice the cost
    d8, d32 = _moe_flops("dense", 8, 2), _moe_flops("dense", 32, 2)
    assert d32 / d8 > 3.0, (d8, d32)  # the measurement does see compute over all experts
