"""Fixed-size KV caches and the attention masks built from token positions.

A stack's cache is a plain dict (a pytree, so it can live in a ``lax.while_loop`` state):

* ``k``, ``v``: [L, B, S, K, d] keys (after rotary) and values per layer;
* ``pos``: [B, S] int32 absolute position held by each slot, ``-1`` for an empty slot;
* ``length``: [B] int32 tokens written so far per sequence (= the next token's position).

Masks are derived from positions only: a query at position ``i`` may see a key at position ``j`` iff the key slot is
filled (``j >= 0``), ``j <= i`` when causal, and ``i - j < window`` when a window of ``window`` keys (the query's own
key included) is active.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


def init_cache(
    num_layers: int, batch: int, size: int, num_kv_heads: int, head_dim: int, dtype: Any = jnp.float32
) -> dict:
    """An empty cache with ``size`` slots per sequence."""
    shape = (num_layers, batch, size, num_kv_heads, head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.full((batch, size), -1, jnp.int32),
        "length": jnp.zeros((batch,), jnp.int32),
    }


def cache_size_for(max_len: int, window: Optional[int], max_chunk: int) -> int:
    """Slots needed: the whole sequence, or with a window only ``window + max_chunk - 1`` (a ring buffer)."""
    if window is None:
        return max_len
    return min(max_len, window + max_chunk - 1)


def default_positions(batch: int, length: int, cache: Optional[dict]) -> jax.Array:
    """[B, T] positions: ``0..T-1``, or continuing at the cache length."""
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if cache is not None:
        pos = pos + cache["length"][:, None]
    return pos


def position_mask(q_pos: jax.Array, k_pos: jax.Array, causal: bool, window: Optional[int] = None) -> jax.Array:
    """Boolean mask [B, 1, T, S] from query positions [B, T] and key positions [B, S] (-1 = no key)."""
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    m = kp >= 0
    if causal:
        m = m & (kp <= qp)
    if window is not None:
        m = m & (qp - kp < window)
    return m[:, None]


def advance(cache: dict, positions: jax.Array, valid: Optional[jax.Array]) -> tuple[dict, jax.Array]:
    """Record a new chunk's positions [B, T] in the cache bookkeeping.

    Returns the cache with updated ``pos``/``length`` (``k``/``v`` untouched) and the slots [B, T] the chunk's keys
    go to. Invalid tokens (``valid`` false, e.g. right padding) are written with position -1 so they are never seen.
    """
    size = cache["pos"].shape[1]
    if positions.shape[1] > size:
        raise ValueError(f"a chunk of {positions.shape[1]} tokens does not fit a cache of {size} slots")
    slots = positions % size
    stored = positions if valid is None else jnp.where(valid, positions, -1)
    b = jnp.arange(positions.shape[0])[:, None]
    new_pos = cache["pos"].at[b, slots].set(stored.astype(jnp.int32))
    count = positions.shape[1] if valid is None else jnp.sum(valid, axis=1).astype(jnp.int32)
    return {**cache, "pos": new_pos, "length": cache["length"] + count}, slots
