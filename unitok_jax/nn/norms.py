"""Normalisation layers. Statistics are always computed in float32 (the reference does the same)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale, over the last axis.

    The normalised value is cast back to the input dtype before the scale is applied (Qwen2 / BailingMoE order).
    """

    eps: float = 1e-6
    use_scale: bool = True
    param_dtype: Any = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_dtype = x.dtype
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(in_dtype)
        if not self.use_scale:
            return y
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return y * scale.astype(in_dtype)


class LayerNorm(nn.Module):
    """Affine LayerNorm with two-pass float32 statistics (torch semantics; flax's fast variance is avoided on
    purpose because E[x^2] - E[x]^2 loses precision on wide activations)."""

    eps: float = 1e-5
    use_bias: bool = True
    param_dtype: Any = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_dtype = x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centred = xf - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        d = x.shape[-1]
        init = nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,))
        y = y * self.param("scale", init, (d,), self.param_dtype)
        if self.use_bias:
            binit = nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,))
            y = y + self.param("bias", binit, (d,), self.param_dtype)
        return y.astype(in_dtype)


def make_norm(kind: str, eps: float, name: str | None = None, param_dtype: Any = jnp.float32) -> nn.Module:
    """'rms' -> RMSNorm with a scale; 'layer' -> LayerNorm with scale and bias."""
    if kind == "rms":
        return RMSNorm(eps=eps, param_dtype=param_dtype, name=name)
    if kind == "layer":
        return LayerNorm(eps=eps, param_dtype=param_dtype, name=name)
    raise ValueError(f"unknown norm kind {kind!r}; expected 'rms' or 'layer'")
