"""Token routing and dropless expert compute for the BailingMoE LLM.

Routing (spec §3.5): router logits in float32, softmax in float32, top-k, weights renormalised to sum 1 when
``norm_topk_prob`` and k > 1; optional per-modality gates (``multi_gate``): tokens flagged by ``audio_mask`` /
``image_mask`` take their logits from ``audio_gate`` / ``image_gate``.

Expert compute is dropless (no capacity factor): the N*k token-slots are sorted by expert and each expert's
contiguous group goes through a grouped matmul. Implementations (``impl``):

* ``"ragged"``: :func:`jax.lax.ragged_dot` (one grouped matmul per projection). On TPU/GPU this lowers to a real
  grouped GEMM. On CPU, XLA lowers it to a masked dense product over *all* groups (cost ~ E x the useful work).
* ``"tiled"``: a portable grouped matmul: every expert group is padded to a multiple of a row tile, each tile
  gathers its expert's weights and one batched matmul runs over the tiles. Cost ~ (N*k + E*(tile-1)) rows, i.e.
  it scales with top-k, not with the number of experts, on any backend.
* ``"loop"``: the same tile layout, but a loop over the tiles that are actually occupied (each reads its expert's
  weights in place instead of a materialised gather): the fastest form on CPU (about 4x ``"tiled"`` at the small
  config). XLA's cost analysis counts a loop body once, so its compiled FLOP count is not meaningful; ``"tiled"``
  is the form whose cost analysis shows the work.
* ``"auto"`` (default): ``"ragged"`` on TPU/GPU; on CPU ``"tiled"`` when there are no more tiles than experts
  (decoding: only the chosen experts' weights are read) and ``"loop"`` otherwise (prefill). At inference
  (:func:`unitok_jax.llm.prefill` / :func:`~unitok_jax.llm.decode_step`, ``stacked`` below) ``"auto"`` on CPU is
  ``"loop"`` reading each tile's expert straight out of the layer-stacked weights.
* ``"dense"``: the reference path (every expert on every token, combined with a masked weight matrix). Only for
  tests and benchmarks.

Training aids (off by default, the release used none): the Switch-style load-balancing loss
``E * sum_e f_e * P_e`` and the router z-loss ``mean(logsumexp(logits)^2)``, plus per-expert slot counts. They are
returned as metrics; the model weighs them with its config coefficients (0 by default).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unitok_jax.nn.mlp import MLP

IMPLS = ("auto", "ragged", "tiled", "loop", "dense")


def resolve_impl(impl: str, rows: Optional[int] = None, num_experts: Optional[int] = None) -> str:
    """The implementation ``impl`` stands for, given the number of token-slots and experts (static shapes)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown MoE impl {impl!r}; expected one of {IMPLS}")
    if impl != "auto":
        return impl
    if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm"):
        return "ragged"
    if rows is None or num_experts is None:
        return "loop"
    # CPU: few tiles (decoding) -> gather just the experts used; many tiles (prefill) -> loop over the tiles.
    t = default_tile(rows, num_experts)
    return "tiled" if (rows + num_experts * (t - 1)) // t <= num_experts else "loop"


# ----------------------------------------------------------------------------------------------------- routing


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [..., E] -> (probs [..., E] fp32, idx [..., k] int32 by descending score, weights [..., k] fp32)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, idx = jax.lax.top_k(probs, top_k)
    if top_k > 1 and norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return probs, idx.astype(jnp.int32), weights


def expert_counts(idx: jax.Array, num_experts: int, valid: Optional[jax.Array] = None) -> jax.Array:
    """Token-slots per expert [E] int32 from idx [..., k] (invalid tokens, ``valid`` [...] false, not counted)."""
    onehot = jax.nn.one_hot(idx, num_experts, dtype=jnp.int32)  # [..., k, E]
    if valid is not None:
        onehot = onehot * valid[..., None, None].astype(jnp.int32)
    return jnp.sum(onehot.reshape(-1, num_experts), axis=0)


def load_balance_loss(
    probs: jax.Array, idx: jax.Array, valid: Optional[jax.Array] = None
) -> jax.Array:
    """Switch-Transformer auxiliary loss E * sum_e f_e * P_e over valid tokens.

    f_e = fraction of token-slots routed to e, P_e = mean router probability of e. Equals 1 for perfectly uniform
    routing. probs [..., E] fp32, idx [..., k]."""
    e = probs.shape[-1]
    k = idx.shape[-1]
    probs = probs.reshape(-1, e)
    vf = jnp.ones((probs.shape[0],), jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(vf), 1.0)
    counts = expert_counts(idx.reshape(-1, k), e, vf > 0).astype(jnp.float32)
    f = counts / (n * k)
    p = jnp.sum(probs * vf[:, None], axis=0) / n
    return e * jnp.sum(f * p)


def router_z_loss(logits: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """mean over valid tokens of logsumexp(logits)^2 (ST-MoE)."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    if valid is None:
        return jnp.mean(z * z)
    vf = valid.astype(jnp.float32)
    return jnp.sum(z * z * vf) / jnp.maximum(jnp.sum(vf), 1.0)


# ------------------------------------------------------------------------------------------ sorting by expert


def sort_slots(idx: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sort the N*k token-slots of idx [N, k] by expert (stable).

    Returns ``order`` [N*k] (slot ids in sorted order; slot s = token s // k, choice s % k), ``token`` [N*k] (the
    token each sorted row reads) and ``group_sizes`` [E] int32. Experts ``>= num_experts`` (a sentinel for slots
    that must not be computed) sort last and belong to no group.
    """
    n, k = idx.shape
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.sum(jax.nn.one_hot(flat, num_experts, dtype=jnp.int32), axis=0)
    return order, token, group_sizes


def default_tile(rows: int, num_experts: int) -> int:
    """Row tile for the tiled grouped matmul: a power of two near rows / (4 E), in [1, 128].

    Padding costs at most E * (tile - 1) rows, i.e. about a quarter of the useful rows."""
    t = max(1, rows // (4 * num_experts))
    t = 1 << (t.bit_length() - 1)
    return int(min(t, 128))


def _tiled_layout(group_sizes: jax.Array, rows: int, tile: int):
    """Where each sorted row goes in the tile-padded buffer and which expert each tile belongs to."""
    e = group_sizes.shape[0]
    n_tiles = (rows + e * (tile - 1)) // tile  # >= sum_e ceil(n_e / tile) for any split of `rows`
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    tiles_per = (group_sizes + tile - 1) // tile
    tile_ends = jnp.cumsum(tiles_per)
    tile_starts = tile_ends - tiles_per
    row = jnp.arange(rows, dtype=jnp.int32)
    g = jnp.searchsorted(ends, row, side="right")  # == e for rows past every group
    in_group = g < e
    gc = jnp.minimum(g, e - 1)
    dest = jnp.where(in_group, tile_starts[gc] * tile + row - starts[gc], n_tiles * tile)
    tile_group = jnp.minimum(jnp.searchsorted(tile_ends, jnp.arange(n_tiles), side="right"), e - 1)
    return dest, tile_group, n_tiles


def _swiglu(g, u):
    return jax.nn.silu(g) * u


def grouped_ffn_ragged(xs, group_sizes, w_gate, w_up, w_down):
    """SwiGLU experts on rows xs [M, D] sorted by expert; w_gate/w_up [E, D, F], w_down [E, F, D] -> [M, D].
    Rows past sum(group_sizes) come out as zeros."""
    g = jax.lax.ragged_dot(xs, w_gate, group_sizes)
    u = jax.lax.ragged_dot(xs, w_up, group_sizes)
    return jax.lax.ragged_dot(_swiglu(g, u), w_down, group_sizes)


def grouped_ffn_tiled(xs, group_sizes, w_gate, w_up, w_down, tile: Optional[int] = None):
    """Same contract as :func:`grouped_ffn_ragged`, computed as a batched matmul over row tiles (each tile gathers
    its expert's weights); cost scales with the number of rows, not with the number of experts."""
    rows, d = xs.shape
    e = w_gate.shape[0]
    tile = tile or default_tile(rows, e)
    dest, tile_group, n_tiles = _tiled_layout(group_sizes, rows, tile)
    xp = jnp.zeros((n_tiles * tile, d), xs.dtype).at[dest].set(xs, mode="drop").reshape(n_tiles, tile, d)
    g = jnp.einsum("tmd,tdf->tmf", xp, w_gate[tile_group])
    u = jnp.einsum("tmd,tdf->tmf", xp, w_up[tile_group])
    o = jnp.einsum("tmf,tfd->tmd", _swiglu(g, u), w_down[tile_group]).reshape(n_tiles * tile, d)
    return o.at[dest].get(mode="fill", fill_value=0)


def loop_tile(rows: int, num_experts: int) -> int:
    """Row tile for the looped grouped matmul: about the mean group size, a power of two in [2, 64] (at decode
    sizes a tile of 2 reads an expert chosen twice once: 1.25x faster than 1 at batch 8 of the small config)."""
    t = max(2, -(-rows // num_experts))
    return int(min(1 << (t - 1).bit_length(), 64))


def _expert(w, g, layer=None):
    """Expert ``g``'s weights out of ``w`` [E, ...], or with ``layer`` out of the layer-stacked ``w`` [L, E, ...]
    (one dynamic slice by (layer, expert): only that expert is read)."""
    if layer is None:
        return w[g]
    return jax.lax.dynamic_slice(w, (layer, g) + (0,) * (w.ndim - 2), (1, 1) + w.shape[2:])[0, 0]


def grouped_ffn_loop(xs, group_sizes, w_gate, w_up, w_down, tile: Optional[int] = None, layer=None):
    """Same contract as :func:`grouped_ffn_ragged`: rows padded per expert to whole tiles, then a loop over the
    tiles (a static worst-case count; unoccupied tiles are skipped by ``lax.cond``). Differentiable.

    ``layer`` (int32 scalar): the weights are the whole stack's [L, E, ...] and each tile reads its expert of that
    layer in place. Inside a layer scan this is what keeps the loop cheap on CPU: a loop over the scan's own
    per-layer slice makes XLA materialise the slice (every expert of the layer, each layer) before the loop, which
    costs more than the experts' matmuls (`bench/llm.py`, "stacked vs sliced")."""
    rows, d = xs.shape
    e = w_gate.shape[0 if layer is None else 1]
    tile = tile or loop_tile(rows, e)
    dest, tile_group, n_tiles = _tiled_layout(group_sizes, rows, tile)
    xp = jnp.zeros((n_tiles * tile, d), xs.dtype).at[dest].set(xs, mode="drop")
    occupied = jnp.sum((group_sizes + tile - 1) // tile)

    def body(i, out):
        def work(out):
            g = tile_group[i]
            x = jax.lax.dynamic_slice_in_dim(xp, i * tile, tile)
            y = _swiglu(x @ _expert(w_gate, g, layer), x @ _expert(w_up, g, layer)) @ _expert(w_down, g, layer)
            return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), i * tile, 0)

        return jax.lax.cond(i < occupied, work, lambda o: o, out)

    out = jax.lax.fori_loop(0, n_tiles, body, jnp.zeros_like(xp))
    return out.at[dest].get(mode="fill", fill_value=0)


def sorted_moe_ffn(x, idx, weights, w_gate, w_up, w_down, impl: str = "auto", tile: Optional[int] = None,
                   layer=None):
    """Dropless MoE over tokens x [N, D] with choices idx [N, k] and weights [N, k]: sum_j w_j E_{idx_j}(x),
    returned in float32 [N, D]. A choice outside ``[0, E)`` (an expert held by another device:
    :func:`expert_parallel_ffn`) contributes nothing and costs no expert compute.

    ``layer``: the weights are a whole stack's [L, E, ...] and this is the layer's index; only the ``"loop"`` form
    reads them (see :func:`grouped_ffn_loop`)."""
    n, k = idx.shape
    e = w_gate.shape[0 if layer is None else 1]
    mine = (idx >= 0) & (idx < e)
    idx = jnp.where(mine, idx, e)  # sentinel: sorted last, in no group (and a zero one_hot on the dense path)
    impl = resolve_impl(impl, n * k, e)
    if layer is not None and impl != "loop":
        raise ValueError(f"layer-stacked expert weights are read by the 'loop' form only, not {impl!r}")
    if impl == "dense":
        return dense_moe_ffn(x, idx, weights, w_gate, w_up, w_down)
    order, token, group_sizes = sort_slots(idx, e)
    xs = x[token]
    if impl == "ragged":
        ys = grouped_ffn_ragged(xs, group_sizes, w_gate, w_up, w_down)
    elif impl == "loop":
        ys = grouped_ffn_loop(xs, group_sizes, w_gate, w_up, w_down, tile, layer)
    else:
        ys = grouped_ffn_tiled(xs, group_sizes, w_gate, w_up, w_down, tile)
    y_slots = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1).astype(jnp.float32)
    y_slots = jnp.where(mine[..., None], y_slots, 0.0)
    return jnp.einsum("nkd,nk->nd", y_slots, weights.astype(jnp.float32))


def dense_moe_ffn(x, idx, weights, w_gate, w_up, w_down):
    """Reference path: every expert on every token [E, N, ...], combined with a [N, E] weight matrix that is zero
    for the experts not chosen. float32 [N, D]."""
    e = w_gate.shape[0]
    g = jnp.einsum("nd,edf->enf", x, w_gate)
    u = jnp.einsum("nd,edf->enf", x, w_up)
    y = jnp.einsum("enf,efd->end", _swiglu(g, u), w_down)
    combine = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32) * weights[..., None].astype(jnp.float32), axis=1)
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), combine)


# ------------------------------------------------------------------------------------------ expert parallelism


def _mesh_axes(logical: str, rules, mesh) -> tuple:
    """Mesh axes (of size > 1) that the logical axis ``logical`` maps to under ``rules``."""
    spec = nn.logical_to_mesh_axes((logical,), rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def expert_parallel_active(num_experts: int) -> bool:
    """True when tracing under a mesh whose rules put the ``expert`` logical axis on mesh axes of size > 1 that
    divide ``num_experts``."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return False
    axes = _mesh_axes("expert", rules, mesh)
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return bool(axes) and num_experts % size == 0


def ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis: str):
    """``jax.lax.ragged_all_to_all`` over the mesh axis ``axis`` (same arguments; ``output_offsets`` are the
    sender's: where each chunk lands in its receiver's ``output``). XLA:CPU has no kernel for the op, so on CPU
    the same exchange is built from an all-gather (every device receives every device's buffer and keeps its chunks:
    the same values and gradients, ``ep`` times the bytes): what the tests on simulated CPU devices run."""
    if jax.default_backend() != "cpu":
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                         axis_name=axis)
    me = jax.lax.axis_index(axis)
    ops = jax.lax.all_gather(operand, axis)  # [ep, M, D]
    src, size, dst = (jax.lax.all_gather(a, axis)[:, me] for a in (input_offsets, send_sizes, output_offsets))
    pos = jnp.arange(output.shape[0])
    inside = (pos[None, :] >= dst[:, None]) & (pos[None, :] < (dst + size)[:, None])  # [ep, P]: from source s
    row = jnp.clip(src[:, None] + pos[None, :] - dst[:, None], 0, operand.shape[0] - 1)
    got = jnp.take_along_axis(ops, row[:, :, None], axis=1)  # [ep, P, D]
    got = jnp.sum(jnp.where(inside[..., None], got, jnp.zeros((), got.dtype)), axis=0)
    return jnp.where(jnp.any(inside, axis=0)[:, None], got, output)


def _gather_expert_weights(wg, wu, wd, emb: tuple, bat: tuple):
    """Inside the expert-parallel shard_map: all-gather the FSDP (``embed``) slices of this device's experts, and
    mark the weights device-varying over the batch axes ``bat``, so that the sum of their gradients over the batch
    shards (the transpose of this cast) happens once, outside the grouped matmul. Left implicit, it lands inside the
    loop implementation's lax.cond, where devices whose tiles differ take different branches and the collective
    deadlocks."""
    for a in emb:
        wg = jax.lax.all_gather(wg, a, axis=1, tiled=True)
        wu = jax.lax.all_gather(wu, a, axis=1, tiled=True)
        wd = jax.lax.all_gather(wd, a, axis=2, tiled=True)
    if bat:
        def vary(w):
            axes = tuple(a for a in bat if a not in jax.typeof(w).mat.varying)
            return jax.lax.pcast(w, axes, to="varying") if axes else w

        wg, wu, wd = vary(wg), vary(wu), vary(wd)
    return wg, wu, wd


def _ep_layout():
    """(expert, embed, mlp, batch) mesh axes of the context mesh and rules for expert parallelism."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    ex, emb, mlp = (_mesh_axes(n, rules, mesh) for n in ("expert", "embed", "mlp"))
    return mesh, ex, emb, mlp, tuple(a for a in _mesh_axes("batch", rules, mesh) if a not in ex + mlp)


def _axes_size(mesh, axes) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def expert_parallel_a2a_ffn(x, idx, weights, w_gate, w_up, w_down, impl: str = "auto",
                            tile: Optional[int] = None):
    """Dropless MoE with expert parallelism by exchange (:func:`expert_parallel_ffn`'s contract): tokens are split
    over the batch axes *and* the ``expert`` axis; each device sorts its token-slots by expert and sends each
    expert's rows, in the compute dtype, to the device holding it (:func:`ragged_exchange`, a ragged all-to-all),
    which runs its experts over what it received and sends the results back the same way. Only the routed rows
    travel (about k / E of each token's experts per device), not every token to every expert device. One ``expert``
    mesh axis; otherwise (or when the tokens do not split evenly) :func:`expert_parallel_ffn`."""
    from jax.sharding import PartitionSpec as P

    mesh, ex, emb, mlp, bat = _ep_layout()
    if len(ex) != 1 or x.shape[0] % (_axes_size(mesh, bat) * _axes_size(mesh, ex)):
        return expert_parallel_ffn(x, idx, weights, w_gate, w_up, w_down, impl, tile)
    axis = ex[0]
    ep = mesh.shape[axis]
    tok = P(bat + ex, None)
    ax = lambda axes: (axes if len(axes) > 1 else axes[0]) if axes else None  # noqa: E731
    w_in = P(ax(ex), ax(emb), ax(mlp))
    w_out = P(ax(ex), ax(mlp), ax(emb))

    def body(x, idx, weights, wg, wu, wd):
        wg, wu, wd = _gather_expert_weights(wg, wu, wd, emb, bat)
        n, k = idx.shape
        e_loc = wg.shape[0]
        e = e_loc * ep
        order, token, counts = sort_slots(idx, e)  # this device's slots by expert; counts [E]
        sent = x[token]  # [n k, D]: the routed rows, grouped by destination device
        per_dest = counts.reshape(ep, e_loc)
        send_sizes = jnp.sum(per_dest, axis=1)
        in_off = jnp.cumsum(send_sizes) - send_sizes
        all_sizes = jax.lax.all_gather(send_sizes, axis)  # [source, destination]
        me = jax.lax.axis_index(axis)
        out_off = jnp.sum(jnp.where(jnp.arange(ep)[:, None] < me, all_sizes, 0), axis=0)  # in each receiver
        recv_sizes = all_sizes[:, me]
        cap = n * k * ep  # worst case: every slot of every device routed here (static, dropless)
        got = ragged_exchange(sent, jnp.zeros((cap, x.shape[1]), x.dtype), in_off, send_sizes, out_off,
                              recv_sizes, axis)
        # the local expert of each received row: sources in order, each source's rows sorted by expert
        recv_counts = jax.lax.all_to_all(per_dest, axis, 0, 0, tiled=True)  # [source, local expert]
        local = jnp.repeat(jnp.tile(jnp.arange(e_loc), ep), recv_counts.reshape(-1), total_repeat_length=cap)
        local = jnp.where(jnp.arange(cap) < jnp.sum(recv_counts), local, e_loc)  # empty rows: no expert
        y = sorted_moe_ffn(got, local[:, None], jnp.ones((cap, 1), jnp.float32), wg, wu, wd, impl, tile)
        if mlp:
            y = jax.lax.psum(y, mlp)
        # back to the sources, each row to where it was sent from
        back_off = jax.lax.all_to_all(in_off[:, None], axis, 0, 0, tiled=True)[:, 0]
        recv_off = jnp.cumsum(recv_sizes) - recv_sizes
        ys = ragged_exchange(y.astype(x.dtype), jnp.zeros((n * k, x.shape[1]), x.dtype), recv_off, recv_sizes,
                             back_off, send_sizes, axis)
        y_slots = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1).astype(jnp.float32)
        return jnp.einsum("nkd,nk->nd", y_slots, weights.astype(jnp.float32))

    return jax.shard_map(body, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok)(
        x, idx, weights, w_gate, w_up, w_down)


def expert_parallel_ffn(x, idx, weights, w_gate, w_up, w_down, impl: str = "auto", tile: Optional[int] = None):
    """Dropless MoE with expert parallelism (``shard_map`` over the context mesh and logical-axis rules).

    Each device holds ``E / ep`` experts (the ``expert`` axis), a slice of their width (``mlp`` -> ``tensor``) and,
    at rest, a slice of ``embed`` (FSDP, all-gathered here). Tokens keep their batch sharding and are replicated
    over the expert axis; every device runs the grouped matmul for its own experts only (slots routed elsewhere
    are excluded from the groups) and the partial outputs are summed over the expert and tensor axes. No capacity
    factor, no dropped tokens. Same contract as :func:`sorted_moe_ffn`."""
    from jax.sharding import PartitionSpec as P

    # Tokens may be split over the batch axes, but must be whole over the axes the partial sums run over.
    mesh, ex, emb, mlp, bat = _ep_layout()
    if x.shape[0] % _axes_size(mesh, bat):
        bat = ()  # e.g. one decoding sequence on a data-parallel mesh: every replica computes it
    tok = P(bat or None, None)
    ax = lambda axes: (axes if len(axes) > 1 else axes[0]) if axes else None  # noqa: E731
    w_in = P(ax(ex), ax(emb), ax(mlp))
    w_out = P(ax(ex), ax(mlp), ax(emb))

    def body(x, idx, weights, wg, wu, wd):
        wg, wu, wd = _gather_expert_weights(wg, wu, wd, emb, bat)
        e_loc = wg.shape[0]
        shard = 0
        for a in ex:
            shard = shard * jax.lax.axis_size(a) + jax.lax.axis_index(a)
        local = idx - shard * e_loc  # choices of other devices' experts fall outside [0, e_loc): no compute
        if ex + mlp:
            # Mark the (replicated) tokens as device-varying before the data-dependent gather in sorted_moe_ffn: its
            # transpose then scatters locally and the cast's transpose sums over the devices. Gathering the
            # replicated value with device-varying indices gives wrong input gradients (jax 0.10).
            x = jax.lax.pcast(x, ex + mlp, to="varying")
            weights = jax.lax.pcast(weights, ex + mlp, to="varying")
        y = sorted_moe_ffn(x, local, weights, wg, wu, wd, impl, tile)
        return jax.lax.psum(y, ex + mlp) if ex + mlp else y

    return jax.shard_map(
        body,
        in_specs=(tok, tok, tok, w_in, w_in, w_out),
        out_specs=tok,
    )(x, idx, weights, w_gate, w_up, w_down)


# ---------------------------------------------------------------------------------------------------- module


class MoE(nn.Module):
    """BailingMoE sparse MLP over x [B, T, D].

    Params: ``gate`` (and ``audio_gate``/``image_gate`` when ``multi_gate``) kernels [D, E]; expert weights
    ``wi_gate``/``wi_up`` [E, D, F] and ``wo`` [E, F, D]; ``shared`` (an :class:`~unitok_jax.nn.MLP` of width
    ``shared_dim``) when ``shared_dim``.

    ``audio_mask`` / ``image_mask`` [B, T] are ignored without ``multi_gate`` (one gate routes every token, as in
    the reference).

    Returns ``(y [B, T, D], info)`` with ``info``: ``router_logits`` [B, T, E] (the effective ones, after the
    modality selection), ``topk_idx`` [B, T, k] int32, ``topk_weight`` [B, T, k] fp32, ``counts`` [E] int32 (valid
    token-slots per expert), ``aux_loss`` and ``z_loss`` (float32 scalars over valid tokens).
    """

    num_experts: int
    top_k: int
    expert_dim: int
    shared_dim: Optional[int] = None
    norm_topk_prob: bool = True
    multi_gate: bool = False
    impl: str = "auto"
    tile: Optional[int] = None
    expert_parallel: bool = True  # under a mesh with an expert axis: shard_map expert parallelism
    dispatch: str = "psum"  # expert parallelism: "psum" (expert_parallel_ffn) or "a2a" (expert_parallel_a2a_ffn)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _router(self, name, d):
        return self.param(
            name,
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
            (d, self.num_experts),
            self.param_dtype,
        )

    @nn.compact
    def __call__(self, x, audio_mask=None, image_mask=None, valid=None, stacked=None):
        """``stacked``: optional ``(wi_gate, wi_up, wo, layer)``, the whole stack's expert weights [L, E, ...] (the
        same arrays as this layer's params, unsliced) and this layer's index. On CPU with ``impl`` "auto" or "loop",
        more than two tokens, no expert parallelism and ``dtype == param_dtype``, the experts are read from them in
        place (:func:`grouped_ffn_loop`); otherwise they are ignored. For inference only: under a gradient, reading
        the broadcast stack in a layer scan would accumulate a whole-stack gradient in every layer."""
        b, t, d = x.shape
        e, k, f = self.num_experts, self.top_k, self.expert_dim
        if k > e:
            raise ValueError(f"top_k={k} exceeds num_experts={e}")
        xf = x.astype(jnp.float32)
        logits = xf @ self._router("gate", d).astype(jnp.float32)
        if self.multi_gate:
            # Both extra gates always exist (so the param tree matches the checkpoint); they are only computed
            # when a mask asks for them.
            w_img, w_aud = self._router("image_gate", d), self._router("audio_gate", d)
            if image_mask is not None:
                logits = jnp.where(image_mask[..., None], xf @ w_img.astype(jnp.float32), logits)
            if audio_mask is not None:
                logits = jnp.where(audio_mask[..., None], xf @ w_aud.astype(jnp.float32), logits)
        probs, idx, weights = route(logits, k, self.norm_topk_prob)

        init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        w_gate = self.param("wi_gate", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")), (e, d, f),
                            self.param_dtype)
        w_up = self.param("wi_up", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")), (e, d, f),
                          self.param_dtype)
        w_down = self.param("wo", nn.with_logical_partitioning(init, ("expert", "mlp", "embed")), (e, f, d),
                            self.param_dtype)
        cast = lambda w: w.astype(self.dtype)  # noqa: E731
        if self.dispatch not in ("psum", "a2a"):
            raise ValueError(f"MoE dispatch={self.dispatch!r}: choose 'psum' or 'a2a'")
        ffn = sorted_moe_ffn
        parallel = self.expert_parallel and expert_parallel_active(e)
        if parallel:
            ffn = expert_parallel_a2a_ffn if self.dispatch == "a2a" else expert_parallel_ffn
        tokens = (x.reshape(b * t, d).astype(self.dtype), idx.reshape(b * t, k), weights.reshape(b * t, k))
        # one or two tokens (batch-1/2 decode): gathering the k or 2k experts in one fused read is as fast
        if (stacked is not None and not parallel and self.impl in ("auto", "loop") and b * t > 2
                and resolve_impl(self.impl, b * t * k, e) in ("tiled", "loop")
                and jnp.dtype(self.dtype) == jnp.dtype(self.param_dtype)):
            y = sorted_moe_ffn(*tokens, *stacked[:3], "loop", self.tile, layer=stacked[3])
        else:
            y = ffn(*tokens, cast(w_gate), cast(w_up), cast(w_down), self.impl, self.tile)
        y = y.reshape(b, t, d).astype(x.dtype)
        if self.shared_dim:
            y = y + MLP(self.shared_dim, "swiglu", False, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="shared")(x)
        info = {
            "router_logits": logits,
            "topk_idx": idx,
            "topk_weight": weights,
            "counts": expert_counts(idx, e, valid),
            "aux_loss": load_balance_loss(probs, idx, valid),
            "z_loss": router_z_loss(logits, valid),
        }
        return y, info
