"""Pytree helpers shared by the train steps: which params train (label trees for ``optax.multi_transform``),
whether a step's loss and gradients are finite, and applying an update only then (a step that is not changes
nothing: :mod:`unitok_jax.training.guard`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp


def path_str(path) -> str:
    """A pytree key path as ``"a/b/c"``."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def label_tree(params, rules: Mapping[str, str], default: str):
    """Pytree of labels like ``params``: a leaf gets the label of the longest prefix in ``rules`` that its
    '/'-joined path equals or lies below (``"audio/decoder"`` covers ``"audio/decoder/fc2/kernel"``), else
    ``default``."""
    order = sorted(rules, key=len, reverse=True)

    def label(path, _):
        s = path_str(path)
        return next((rules[p] for p in order if s == p or s.startswith(p + "/")), default)

    return jax.tree_util.tree_map_with_path(label, params)


def all_finite(*trees) -> jax.Array:
    """Scalar bool: every element of every array leaf of ``trees`` is finite (True when there are no leaves)."""
    leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree_util.tree_leaves(t)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def update_if(ok: jax.Array, update: Callable[[], Any], old: Any) -> Any:
    """``update()`` when the scalar ``ok`` holds, else ``old`` (a pytree of the same structure, shapes and dtypes):
    one ``lax.cond``, so a skipped step neither runs the update nor selects over every param and optimizer leaf."""
    return jax.lax.cond(ok, lambda _: update(), lambda _: old, None)
