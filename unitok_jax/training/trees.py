"""Pytree helpers shared by the train steps: which params train (label trees for ``optax.multi_transform``) and
whether a step's loss and gradients are finite (a step that is not changes nothing: :mod:`unitok_jax.training.guard`).
"""
from __future__ import annotations

from typing import Mapping

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
