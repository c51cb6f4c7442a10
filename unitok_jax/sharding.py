"""Device meshes and logical-axis sharding rules.

Every param carries logical axis names (``embed``, ``heads``, ``kv_heads``, ``kv``, ``mlp``, ``expert``, ``vocab``,
``norm``, and ``layers`` for scanned stacks); key activations carry ``batch``, ``length``, ``embed``, ... A
:class:`ShardingConfig` names the mesh axes and their sizes (``data``, ``fsdp``, ``tensor``, ``expert``; one size
may be -1 for "the rest of the devices") and the rules mapping logical names to mesh axes, in priority order. A
logical axis whose rule is absent (or whose mesh axis is already used by another dimension of the same array) is
replicated. Changing a parallelism strategy is a config change.

Under :func:`use_sharding` with a mesh whose rules put ``expert`` on a mesh axis of size > 1, the MoE layers run
with expert parallelism (:func:`unitok_jax.moe.expert_parallel_ffn`, a ``shard_map``): each device computes only
its own experts, FSDP slices are all-gathered, partial outputs are summed over the expert and tensor axes.

Typical use::

    sc = ShardingConfig.from_dict({"mesh": {"data": 2, "fsdp": -1, "expert": 2}})
    mesh, rules = make_mesh(sc), sc.rules
    params = init_sharded(model, jax.random.PRNGKey(0), ids, mesh=mesh, rules=rules)   # born sharded
    with use_sharding(mesh, rules):
        out = jax.jit(model.apply)(params, ids)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical name -> mesh axis (or axes, or None). Order matters: earlier rules win a mesh axis first.
DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("expert", "expert"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """``mesh``: ((axis name, size), ...), sizes may be -1 once ("the rest"); ``rules``: ((logical, mesh), ...)."""

    mesh: tuple = (("data", 1), ("fsdp", -1), ("tensor", 1), ("expert", 1))
    rules: tuple = DEFAULT_RULES

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ShardingConfig":
        """From ``{"mesh": {"data": 2, "fsdp": -1, ...}, "rules": [[logical, mesh_axis_or_list_or_null], ...]}``
        (a ConfigDict works too). Mesh axes not named get size 1; ``rules`` defaults to :data:`DEFAULT_RULES`."""
        d = dict(d)
        unknown = sorted(set(d) - {"mesh", "rules"})
        if unknown:
            raise ValueError(f"sharding config has unknown keys {unknown}; expected 'mesh' and 'rules'")
        sizes = dict(d.get("mesh", {}))
        bad = sorted(set(sizes) - set(MESH_AXES))
        if bad:
            raise ValueError(f"unknown mesh axes {bad}; expected a subset of {MESH_AXES}")
        if not sizes:
            sizes = {"fsdp": -1}
        mesh = tuple((a, int(sizes.get(a, 1))) for a in MESH_AXES)
        rules = d.get("rules")
        rules = DEFAULT_RULES if rules is None else tuple(_rule(r) for r in rules)
        return cls(mesh=mesh, rules=rules)


def _rule(r) -> tuple:
    name, target = r
    if isinstance(target, (list, tuple)):
        target = tuple(target) if len(target) != 1 else target[0]
    return (name, target)


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> tuple[int, ...]:
    """Resolve the sizes of ``axes`` (one may be -1) for ``num_devices`` devices."""
    sizes = [s for _, s in axes]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"at most one mesh axis may have size -1, got {dict(axes)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(axes)}: {num_devices} devices are not divisible by {known}")
        sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(axes)} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(config: ShardingConfig | Mapping, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh over ``devices`` (default all) with the config's axes (GSPMD "auto" axes)."""
    if not isinstance(config, ShardingConfig):
        config = ShardingConfig.from_dict(config)
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(a for a, _ in config.mesh)
    shape = mesh_shape(config.mesh, len(devices))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def logical_specs(abstract_boxed) -> Any:
    """Logical PartitionSpecs (tuples of names) of a boxed param tree (as returned by ``init`` / ``eval_shape``)."""
    return nn.get_partition_spec(abstract_boxed)


def mesh_specs(abstract_boxed, rules: Sequence) -> Any:
    """Mesh PartitionSpecs of a boxed param tree under ``rules``."""
    return nn.logical_to_mesh(logical_specs(abstract_boxed), tuple(rules))


def shardings_for(abstract_boxed, mesh: Mesh, rules: Sequence) -> Any:
    """NamedShardings of a boxed param tree under ``rules``."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        mesh_specs(abstract_boxed, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def abstract_init(module: nn.Module, *args, **kwargs):
    """Boxed ShapeDtypeStructs of ``module.init(PRNGKey(0), *args, **kwargs)`` (nothing is allocated)."""
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))


def init_sharded(module: nn.Module, rng: jax.Array, *args, mesh: Mesh, rules: Sequence, **kwargs):
    """Initialise ``module`` with every param created directly in its sharding (``jax.jit`` of init with
    ``out_shardings``): no param is ever whole on one device. Returns the unboxed variables."""
    boxed = abstract_init(module, *args, **kwargs)
    shardings = shardings_for(boxed, mesh, rules)

    def init(rng):
        return nn.unbox(module.init(rng, *args, **kwargs))

    # Traced without the mesh in context on purpose: flax's DenseGeneral initialises a flattened kernel and unboxes
    # it, which under a global mesh applies the (3-axis) logical constraint to a 2-D value and fails. The output
    # shardings alone make XLA compute every param shard on its own device.
    return jax.jit(init, out_shardings=shardings)(rng)


def put_sharded(tree, abstract_boxed, mesh: Mesh, rules: Sequence):
    """Place a host (numpy) param tree on ``mesh`` following the logical names of ``abstract_boxed``."""
    shardings = shardings_for(abstract_boxed, mesh, rules)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)


@contextlib.contextmanager
def use_sharding(mesh: Mesh, rules: Sequence):
    """Context for tracing sharded computations: the mesh plus the logical-axis rules (activations constrained by
    ``nn.with_logical_constraint`` are sharded by the same rules as the params)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield
