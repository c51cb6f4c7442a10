"""Sharded training state for the LM stage: one mesh, params and optimizer state created in their shardings, a
jitted step with in/out shardings and donated state, batches sharded along ``data`` x ``fsdp`` (multi-host aware).

Shardings of the params:

* the LLM (``params["model"]``) follows the logical axis names of its modules under the config's rules
  (:mod:`unitok_jax.sharding`);
* everything else (VAE, flow head, pooling, stop head) carries no logical names; a leaf of at least
  :data:`FSDP_MIN_SIZE` elements is sharded FSDP-style on its largest dimension divisible by the ``fsdp`` axis
  (never the leading ``layers`` axis of a scanned stack), the rest is replicated.

Both rules live in :func:`unitok_jax.sharding.uniaudio_shardings` (inference loads by the same shardings).

Optimizer-state leaves that mirror a param (Adam moments) take that param's sharding
(``optax.tree_map_params``); scalars (counts) are replicated.

Multi-host: :func:`maybe_initialize_distributed` calls ``jax.distributed.initialize`` when the environment
describes several processes; each process then feeds its own rows of every global batch, and
:func:`global_batch` assembles them into one global array (``jax.make_array_from_process_local_data``).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unitok_jax import sharding as shd

BATCH_AXES = ("data", "fsdp")


# ------------------------------------------------------------------------------------------------ multi-host


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """``jax.distributed.initialize`` when several processes are described; returns whether it ran.

    ``mode``: ``"off"`` never; ``"on"`` always (the cluster must be auto-detectable: TPU pods, SLURM, Open MPI);
    ``"auto"`` when ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` are set (explicit, e.g.
    several processes on one machine), or a multi-task SLURM / Open MPI job, or a multi-host TPU slice. On CPU the
    cross-process collectives use gloo."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed={mode!r}: choose auto, on or off")
    if mode == "off":
        return False
    env = os.environ
    explicit = all(k in env for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    cluster = (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
               or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)
    if mode == "auto" and not (explicit or cluster):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    return True


# ------------------------------------------------------------------------------------------------ shardings


def _axis_size(mesh: Mesh, name: str) -> int:
    return int(mesh.shape.get(name, 1))


# one home: the param shardings of the whole model live in unitok_jax.sharding (training and inference share them)
fsdp_spec = shd.fsdp_spec
param_shardings = shd.uniaudio_shardings
FSDP_MIN_SIZE = shd.FSDP_MIN_SIZE


def state_shardings(state_abstract: dict, optimizer: optax.GradientTransformation, param_sh: dict,
                    mesh: Mesh) -> dict:
    """Shardings of a train state ``{step, params, opt_state, rng, skipped}``."""
    rep = NamedSharding(mesh, P())
    # masked-out (frozen) subtrees hold optax.MaskedNode (no state): they stay MaskedNode
    opt_sh = optax.tree_map_params(optimizer, lambda x, s: x if isinstance(x, optax.MaskedNode) else s,
                                   state_abstract["opt_state"], param_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, (optax.MaskedNode,)))
    opt_sh = jax.tree.map(lambda x: rep if x is None else x, opt_sh,
                          is_leaf=lambda x: x is None or isinstance(x, NamedSharding))
    return {"step": rep, "params": param_sh, "opt_state": opt_sh, "rng": rep, "skipped": rep}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over ``data`` x ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    return _axis_size(mesh, "data") * _axis_size(mesh, "fsdp")


def global_batch(local: dict, mesh: Mesh) -> dict:
    """This process's rows of a batch (numpy, leading dim = global batch / process count) -> global jax arrays
    sharded along the batch. Single-process: a plain ``device_put``."""
    sh = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), sh) for k, v in local.items()}
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local.items()}


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """The inverse of :func:`global_batch`: this process's rows of a batch-sharded global array, as host numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P(BATCH_AXES)))


# ------------------------------------------------------------------------------------------------ state / step


def create_state(init_fn: Callable[[jax.Array], dict], key: jax.Array, state_sh: dict) -> dict:
    """``init_fn(key) -> state`` run under jit with the state's out_shardings: every leaf is born sharded."""
    return jax.jit(init_fn, out_shardings=state_sh)(key)


def place_state(state: dict, state_sh: dict) -> dict:
    """Put an existing (host or device) state into ``state_sh``."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), state, state_sh)


def jit_step(step_fn: Callable, state_sh: dict, mesh: Mesh, rules: Sequence, *, donate: bool = True):
    """The train step as one ``jax.jit`` with in/out shardings (state in ``state_sh``, batch along the batch axes,
    metrics replicated), state donated; traced under the mesh and logical rules (activations are constrained by
    the same rules, MoE layers use expert parallelism when the ``expert`` axis is > 1)."""
    rep = NamedSharding(mesh, P())
    bsh = batch_sharding(mesh)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, bsh), out_shardings=(state_sh, rep),
                     donate_argnums=(0,) if donate else ())

    class _Step:
        """Calls (and lowers) the jitted step inside the mesh / rules context; ``raw`` is the jitted function."""

        def __init__(self):
            self.raw = jitted

        def __call__(self, state, batch):
            with shd.use_sharding(mesh, rules):
                return jitted(state, batch)

        def lower(self, state, batch):
            with shd.use_sharding(mesh, rules):
                return jitted.lower(state, batch)

    return _Step()


def to_host(tree: Any) -> Any:
    """A (sharded) tree as host numpy arrays on every process: gathered across processes when there are several
    (every process must call it), else fetched from its devices. For the export at the end of a run."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def abstract_batch(batch_shapes: dict, mesh: Mesh) -> dict:
    """ShapeDtypeStructs (with the batch sharding) for ``{name: (shape, dtype)}``: lowering without data."""
    sh = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d), sharding=sh) for k, (s, d) in batch_shapes.items()}


def abstract_state(state_abstract: Any, state_sh: dict) -> Any:
    """Attach shardings to an abstract state (e.g. from ``jax.eval_shape``)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_abstract, state_sh)


def describe(tree, prefix: str = "") -> dict:
    """``{path: mesh spec}`` of a tree of sharded arrays (tests, logs)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        key = prefix + jax.tree_util.keystr(path)
        sh = getattr(leaf, "sharding", None)
        out[key] = tuple(sh.spec) if isinstance(sh, NamedSharding) else None
    return out
