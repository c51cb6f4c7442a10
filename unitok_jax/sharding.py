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


# Mesh sizes per preset (devices = chips as JAX sees them). Training pods and sampling machines.
MESH_PRESETS: dict = {
    # TPU v5p-256: 128 chips (megacore: one JAX device per chip). 64 experts over 8 expert groups, the rest FSDP.
    "v5p-256": {"data": 1, "fsdp": 16, "tensor": 1, "expert": 8},
    # One node of 8 NVIDIA H100 (NVLink): FSDP over 4, experts over 2.
    "8xH100": {"data": 1, "fsdp": 4, "tensor": 1, "expert": 2},
    # A 4-node H100 cluster (32 GPUs): data parallel across nodes, FSDP x expert inside a node.
    "32xH100": {"data": 4, "fsdp": 4, "tensor": 1, "expert": 2},
    # Sampling: one H100 (the model whole on one device, bf16), a TPU v5e-8 (8 chips of 16 GiB), a TPU v5p-8 (4 chips
    # of 95 GiB). The batch (KV and semantic caches) splits over data x fsdp only, so an experts-only mesh holds every
    # cache whole on each chip. bench/memory.py (TTS: 64 prompt + 512 output patches, bf16, 10 % margin): on v5e-8
    # expert=8 fits batch 2, fsdp=4 x expert=2 fits 16; on v5p-8 expert=4 fits 32, fsdp=2 x expert=2 fits 64.
    "1xH100": {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1},
    "v5e-8": {"data": 1, "fsdp": 4, "tensor": 1, "expert": 2},
    "v5p-8": {"data": 1, "fsdp": 2, "tensor": 1, "expert": 2},
}
PRESET_DEVICES = {"v5p-256": 128, "8xH100": 8, "32xH100": 32, "1xH100": 1, "v5e-8": 8, "v5p-8": 4}


def mesh_sizes(preset: str = "", sizes: Optional[Mapping[str, int]] = None) -> dict:
    """Mesh axis sizes: the ``preset`` (a key of :data:`MESH_PRESETS`) if given, else ``sizes``."""
    if preset:
        if preset not in MESH_PRESETS:
            raise ValueError(f"unknown mesh preset {preset!r}; choose from {sorted(MESH_PRESETS)}")
        return dict(MESH_PRESETS[preset])
    return dict(sizes or {})


def parse_mesh(spec: str) -> dict:
    """``"data=2,fsdp=2,expert=2"`` or a preset name -> mesh axis sizes (``ValueError`` with the reason)."""
    spec = spec.strip()
    if spec in MESH_PRESETS:
        return dict(MESH_PRESETS[spec])
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, val = part.partition("=")
        if not eq or name.strip() not in MESH_AXES:
            raise ValueError(f"mesh {spec!r}: expected a preset ({', '.join(sorted(MESH_PRESETS))}) or "
                             f"axis=size pairs over {MESH_AXES}, e.g. data=2,fsdp=2,expert=2")
        try:
            sizes[name.strip()] = int(val)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: size of {name.strip()!r} is not an integer: {val!r}") from None
    if not sizes:
        raise ValueError(f"mesh {spec!r} names no axis")
    return sizes


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


# ------------------------------------------------------------------------------------- the whole UniAudio tree

FSDP_MIN_SIZE = 1 << 16


def fsdp_spec(shape: Sequence[int], mesh: Mesh, stacked: bool = False, min_size: int = FSDP_MIN_SIZE,
              axis: Optional[str] = "fsdp") -> PartitionSpec:
    """Spec of a leaf without logical names: split over mesh ``axis`` on its largest dim divisible by that axis's
    size, if the leaf has at least ``min_size`` elements (never the leading ``layers`` dim of a scanned stack when
    ``stacked``); replicated otherwise."""
    n = int(mesh.shape.get(axis, 1)) if axis else 1
    if n == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    dims = [d for d in range(len(shape)) if not (stacked and d == 0 and len(shape) >= 3) and shape[d] % n == 0]
    if not dims:
        return PartitionSpec()
    d = max(dims, key=lambda i: shape[i])
    return PartitionSpec(*([None] * d + [axis]))


def divisible_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """``spec`` with the mesh axes dropped from any dim they do not divide (e.g. 1 KV head on a tensor axis of 2):
    that dim is replicated instead of failing."""
    out = []
    for d, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep, n = [], 1
        for a in names:
            if shape[d] % (n * int(mesh.shape.get(a, 1))) == 0:
                keep.append(a)
                n *= int(mesh.shape.get(a, 1))
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def rule_target(rules: Sequence, logical: str):
    """The mesh axis (or axes, or None) ``rules`` map the logical name ``logical`` to."""
    for name, target in rules:
        if name == logical:
            return target
    return None


def uniaudio_shardings(cfg, params_abstract: Mapping, mesh: Mesh, rules: Sequence) -> dict:
    """NamedShardings of a UniAudio params tree (``params_abstract``: arrays or ShapeDtypeStructs, any subset of the
    components). The LLM (``"model"``) follows its modules' logical axis names under ``rules`` (experts over the
    axis ``expert`` maps to, the rest over ``fsdp`` / ``tensor``); the other components carry no logical names and
    are split FSDP-style (:func:`fsdp_spec`) over the mesh axis the rules give ``embed`` (by default ``fsdp``)."""
    from unitok_jax import llm as llm_lib

    embed_axis = rule_target(rules, "embed")
    if isinstance(embed_axis, (tuple, list)):
        embed_axis = embed_axis[0] if embed_axis else None
    out = {}
    for name, sub in params_abstract.items():
        if name == "model":
            boxed = jax.eval_shape(lambda: llm_lib.init_params(cfg.llm, jax.random.key(0)))["params"]
            named = shardings_for(boxed, mesh, rules)
            if jax.tree.structure(named) != jax.tree.structure(sub):
                raise ValueError("params['model'] does not have the LLM config's structure")
            out[name] = jax.tree.map(lambda x, s: NamedSharding(mesh, divisible_spec(s.spec, x.shape, mesh)),
                                     sub, named)
        else:
            out[name] = jax.tree.map(
                lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh, stacked=True, axis=embed_axis)), sub)
    return out


@contextlib.contextmanager
def use_sharding(mesh: Mesh, rules: Sequence):
    """Context for tracing sharded computations: the mesh plus the logical-axis rules (activations constrained by
    ``nn.with_logical_constraint`` are sharded by the same rules as the params)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield
