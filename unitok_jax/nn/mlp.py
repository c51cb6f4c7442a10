"""Feed-forward blocks: gated (SwiGLU) and plain (GELU) MLPs."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def dense(features: int, use_bias: bool, axes: tuple[str, str], name: str, dtype: Any, param_dtype: Any) -> nn.Dense:
    """A Dense layer whose kernel [in, out] carries logical axis names."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


class MLP(nn.Module):
    """``kind="swiglu"``: down(silu(gate(x)) * up(x)) (params gate/up/down).
    ``kind`` in ("gelu", "gelu_tanh", "silu"): fc2(act(fc1(x))) (params fc1/fc2).

    ``dropout``: rate applied to the hidden activation (before the output projection) when called with
    ``deterministic=False``; needs a ``"dropout"`` rng then."""

    hidden_dim: int
    kind: str = "swiglu"
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        d = x.shape[-1]
        mk = lambda f, axes, name: dense(f, self.use_bias, axes, name, self.dtype, self.param_dtype)  # noqa: E731
        if self.kind == "swiglu":
            h = jax.nn.silu(mk(self.hidden_dim, ("embed", "mlp"), "gate")(x)) * mk(
                self.hidden_dim, ("embed", "mlp"), "up"
            )(x)
            h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
            if not deterministic and self.dropout > 0.0:
                h = nn.Dropout(self.dropout)(h, deterministic=False)
            return mk(d, ("mlp", "embed"), "down")(h)
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"unknown MLP kind {self.kind!r}; expected 'swiglu' or one of {sorted(ACTIVATIONS)}")
        h = ACTIVATIONS[self.kind](mk(self.hidden_dim, ("embed", "mlp"), "fc1")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        if not deterministic and self.dropout > 0.0:
            h = nn.Dropout(self.dropout)(h, deterministic=False)
        return mk(d, ("mlp", "embed"), "fc2")(h)
