"""Multi-head attention with GQA, rotary embeddings, masks and an explicit fixed-size KV cache.

Cache layout (one layer): ``{"k": [B, S, K, d], "v": [B, S, K, d]}``; the shared bookkeeping that all layers of a
stack use lives in :mod:`unitok_jax.nn.cache`. A token with absolute position ``p`` is written to slot ``p % S``:
for a full-length cache that is slot ``p``; with a sliding window the cache can be a ring of ``W + chunk - 1`` slots.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unitok_jax.nn.norms import RMSNorm
from unitok_jax.nn.rotary import apply_rotary


class Projection(nn.Module):
    """A DenseGeneral over the last ``n_in`` input axes whose kernel is created in its full shape.

    Same params and math as ``nn.DenseGeneral`` (kernel ``in_shape + features``, optional bias ``features``), but
    flax's DenseGeneral initialises a *flattened* 2-D kernel and unboxes it; under a mesh context that applies the
    kernel's N-D logical sharding constraint to the 2-D value and fails, and flax re-runs the initialiser (abstractly)
    at every ``apply`` to check shapes, so sharded *apply* fails too. This class avoids the flattening."""

    features: tuple
    n_in: int
    use_bias: bool
    kernel_axes: tuple
    bias_axes: tuple
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n_in, feats = self.n_in, tuple(self.features)
        in_shape = x.shape[x.ndim - n_in :]
        init = nn.initializers.lecun_normal(
            in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + len(feats)))
        )
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, self.kernel_axes), in_shape + feats, self.param_dtype
        )
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes), feats, self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y



def write_kv(cache_kv: dict, k: jax.Array, v: jax.Array, slots: jax.Array) -> dict:
    """Scatter k/v [B, T, K, d] into the cache at ``slots`` [B, T] (functional update)."""
    b = jnp.arange(k.shape[0])[:, None]
    return {
        "k": cache_kv["k"].at[b, slots].set(k.astype(cache_kv["k"].dtype)),
        "v": cache_kv["v"].at[b, slots].set(v.astype(cache_kv["v"].dtype)),
    }


class Attention(nn.Module):
    """Self-attention over ``x`` [B, T, D].

    Params: ``q`` [D, N, d], ``k``/``v`` [D, K, d], ``o`` [N, d, D] (:class:`Projection` kernels), biases optional per
    projection, optional per-head RMSNorm on q and k (``qk_norm``, applied before the rotary embedding).

    Call with a boolean ``mask`` [B, 1, T, S] (or None for "attend to everything"), rotary ``angles`` [B, T, d/2]
    (or None for no rotary), and optionally one layer's cache plus the ``slots`` [B, T] to write this chunk to; with
    a cache the queries attend to the whole cache after the write.

    Without a cache, and with queries and keys at positions ``0..T-1``, the mask can instead be given as what
    :func:`jax.nn.dot_product_attention` takes natively: ``is_causal``, a sliding ``window`` (keys a query sees,
    its own included) and ``key_valid`` [B, S] (keys that exist): no [B, 1, T, S] mask is built, and a fused
    implementation (``implementation="cudnn"``) can skip the masked blocks. cuDNN takes key validity as lengths,
    so with it ``key_valid`` must be right padding (true on a prefix of each row), as in the training batches.
    Attention over a cache (slots, ring buffers) keeps the explicit mask.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_bias: bool = True
    k_bias: bool = True
    v_bias: bool = True
    o_bias: bool = False
    rope: Optional[str] = "half"
    rope_heads: Optional[int] = None
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: Optional[str] = None  # jax.nn.dot_product_attention's: None (jax picks), "xla", "cudnn"

    @nn.compact
    def __call__(self, x, mask=None, angles=None, cache_kv=None, slots=None, *, is_causal: bool = False,
                 window: Optional[int] = None, key_valid=None):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        n, kh, d = self.num_heads, self.num_kv_heads, self.head_dim
        p = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Projection((n, d), 1, self.q_bias, ("embed", "heads", "kv"), ("heads", "kv"), name="q", **p)(x)
        k = Projection((kh, d), 1, self.k_bias, ("embed", "kv_heads", "kv"), ("kv_heads", "kv"), name="k", **p)(x)
        v = Projection((kh, d), 1, self.v_bias, ("embed", "kv_heads", "kv"), ("kv_heads", "kv"), name="v", **p)(x)
        if self.qk_norm:
            q = RMSNorm(self.qk_norm_eps, param_dtype=self.param_dtype, axis_name="kv", name="q_norm")(q)
            k = RMSNorm(self.qk_norm_eps, param_dtype=self.param_dtype, axis_name="kv", name="k_norm")(k)
        if self.rope is not None and angles is not None:
            q = apply_rotary(q, angles, self.rope, self.rope_heads)
            k = apply_rotary(k, angles, self.rope, self.rope_heads)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        new_cache = None
        if cache_kv is not None:
            if slots is None:
                raise ValueError("a KV cache needs the slots to write the new keys to")
            new_cache = write_kv(cache_kv, k, v, slots)
            k, v = new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype)
        kw = {}
        if is_causal or window is not None or key_valid is not None:
            if mask is not None or cache_kv is not None:
                raise ValueError("pass either a mask (or a cache) or is_causal / window / key_valid, not both")
            if window is not None:
                if not is_causal:
                    raise ValueError("a sliding window without is_causal needs an explicit mask")
                kw["local_window_size"] = (window - 1, 0)
            if key_valid is not None:
                if self.implementation == "cudnn":  # lengths: right padding (see the class docstring)
                    kw["key_value_seq_lengths"] = jnp.sum(key_valid, axis=1).astype(jnp.int32)
                else:
                    mask = key_valid[:, None, None, :]  # [B, 1, 1, S], broadcast over heads and queries
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=d**-0.5, is_causal=is_causal,
                                           implementation=self.implementation, **kw)
        out = Projection((x.shape[-1],), 2, self.o_bias, ("heads", "kv", "embed"), ("embed",), name="o", **p)(out)
        return out, new_cache
