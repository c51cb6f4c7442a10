"""Rotary position embeddings, computed on the fly for any length.

Two pairings exist in the reference:
  * ``"half"`` (NeoX / rotate-half): dim ``i`` is rotated together with dim ``i + d/2`` (LLM, VAE Qwen2 backbones).
  * ``"interleaved"``: dims ``(2i, 2i+1)`` are rotated together (semantic module, DiT).
Both use frequencies ``theta ** (-2i/d)`` for ``i < d/2``. Angles are ``position * freq`` in float32.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("half", "interleaved")


def inv_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies theta^(-2i/head_dim)."""
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """positions [..., T] (int) -> angles [..., T, head_dim // 2] float32."""
    inv = jnp.asarray(inv_frequencies(head_dim, theta))
    return positions.astype(jnp.float32)[..., None] * inv


def mrope_angles(
    positions: jax.Array, head_dim: int, theta: float, sections: Sequence[int] = (16, 24, 24)
) -> jax.Array:
    """Multi-component ("3D") rotary angles.

    positions [n, B, T] (one row per component, e.g. t/h/w) -> angles [B, T, head_dim // 2]; frequency index ``i``
    takes its position from component ``j mod n`` where ``j`` is the section containing ``i``. With all rows equal
    this is exactly :func:`rope_angles`.
    """
    half = head_dim // 2
    if sum(sections) != half:
        raise ValueError(f"rotary sections {tuple(sections)} must sum to head_dim/2 = {half}")
    n = positions.shape[0]
    comp = np.concatenate([np.full((s,), j % n, dtype=np.int32) for j, s in enumerate(sections)])
    all_angles = rope_angles(positions, head_dim, theta)  # [n, B, T, half]
    # Selection with `where` is exact on every backend (a one-hot matmul would run in bfloat16 on TPU by default).
    out = all_angles[0]
    for c in range(1, n):
        out = jnp.where(jnp.asarray(comp == c), all_angles[c], out)
    return out


def apply_rotary(x: jax.Array, angles: jax.Array, layout: str, num_heads: int | None = None) -> jax.Array:
    """Rotate ``x`` [B, T, H, d] by ``angles`` [B, T, d/2] (broadcast over heads).

    ``num_heads``: rotate only the first ``num_heads`` heads (the rest pass through), as some DiT configs do.
    The rotation is computed in float32 and cast back to ``x.dtype``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown rotary layout {layout!r}; expected one of {LAYOUTS}")
    if num_heads is not None and num_heads < x.shape[-2]:
        head = apply_rotary(x[..., :num_heads, :], angles, layout)
        return jnp.concatenate([head, x[..., num_heads:, :]], axis=-2)
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    cos = jnp.cos(angles)[..., None, :]
    sin = jnp.sin(angles)[..., None, :]
    if layout == "half":
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        pairs = xf.reshape(*xf.shape[:-1], -1, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    return out.astype(dtype)
