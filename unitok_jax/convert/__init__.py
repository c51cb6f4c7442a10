"""Official PyTorch checkpoints -> unitok_jax checkpoints (orbax params in bounded groups plus our own config JSON).

``python -m unitok_jax.convert SRC_DIR DST_DIR [--dtype bfloat16|float32]`` converts, streaming: tensors go from
the memory-mapped safetensors to the checkpoint a bounded group at a time (:func:`convert`). :func:`load` restores,
with a mesh straight into each param's sharding. Only this package knows the reference parameter names;
conversion reads safetensors with numpy (no torch). The on-disk layout is described in
:mod:`unitok_jax.convert.store`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Callable, Optional

import numpy as np

from unitok_jax.convert.common import ConversionError, read_json
from unitok_jax.convert.plan import FULL_PREFIXES, Plan, materialize_plan, plan_reference  # noqa: F401
from unitok_jax.io import atomic_dir
from unitok_jax.vae import VAEConfig

FORMAT = "unitok_jax"
VERSION = 2  # 2: params in groups (convert/store.py); 1: one orbax tree at params/ (still loaded)
VERSIONS = (1, 2)
CONFIG_NAME = "unitok_config.json"
PARAMS_DIR = "params"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _uniaudio_from_dict(d: dict):
    from unitok_jax.model import UniAudioConfig

    return UniAudioConfig.from_dict(d)


# component name -> how to rebuild its config object from the saved dict
CONFIG_LOADERS: dict[str, Callable[[dict], Any]] = {"vae": VAEConfig.from_dict, "uniaudio": _uniaudio_from_dict}


@dataclasses.dataclass
class Checkpoint:
    """Configs and params per component; params are plain pytrees of arrays.

    Two kinds: a tokenizer-only checkpoint (``"vae"``: VAEConfig + VAE params) and a full model (``"uniaudio"``:
    UniAudioConfig + params keyed like the official prefixes: audio / model / flowloss / linear_proj_audio /
    stop_head)."""

    configs: dict[str, Any]
    params: dict[str, Any]
    source: str = ""
    path: str = ""  # where it was loaded from (holds tokenizer files for a full model)

    def num_params(self, component: str) -> int:
        import jax

        return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(self.params[component])))

    def vae(self) -> tuple[VAEConfig, Any]:
        """(VAEConfig, VAE params) of either kind."""
        if "vae" in self.configs:
            return self.configs["vae"], self.params["vae"]
        if "uniaudio" in self.configs:
            return self.configs["uniaudio"].vae, self.params["uniaudio"]["audio"]
        raise ConversionError(f"{self.path or self.source}: the checkpoint holds no AudioVAE")


def _dtype(dtype) -> np.dtype:
    """A numpy dtype from a name ("bfloat16", "float32"), a numpy / jax dtype or scalar type."""
    import jax.numpy as jnp

    try:
        return np.dtype(jnp.dtype(dtype))
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}") from e


def with_param_dtype(component: str, cfg, dtype, compute: bool = True) -> Any:
    """``cfg`` describing params held in ``dtype``: the LLM's ``param_dtype`` becomes ``dtype`` and, with
    ``compute``, so does its compute ``dtype`` (a model loaded or converted for bfloat16 computes in bfloat16, one
    for float32 in float32)."""
    if component != "uniaudio":
        return cfg
    dt = _dtype(dtype)
    kw = {"param_dtype": dt.name, **({"dtype": dt.name} if compute else {})}
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **kw))


def convert_full(src: str, config: dict, dtype=np.float32) -> Checkpoint:
    """A full Ming-UniAudio folder -> one UniAudio checkpoint in memory (every component, cross-checked)."""
    from unitok_jax.convert.plan import check_plan, plan_full

    plan = plan_full(src, config)
    check_plan(plan)
    return _in_memory(plan, dtype)


def _in_memory(plan: Plan, dtype) -> Checkpoint:
    params = materialize_plan(plan, _dtype(dtype))
    cfg = with_param_dtype(plan.component, plan.config, dtype)
    return Checkpoint({plan.component: cfg}, {plan.component: params}, source=plan.source, path=plan.path)


def convert_reference(src: str, dtype=np.float32) -> Checkpoint:
    """Read a reference checkpoint folder (``config.json`` + ``model.safetensors`` or a sharded set with
    ``model.safetensors.index.json``) and convert it in memory (numpy, ``dtype`` float32 by default; norms and
    router float32 whatever ``dtype``): a full Ming-UniAudio folder (``llm_config`` + ``audio_tokenizer_config`` +
    ``ditar_config``) gives a ``"uniaudio"`` checkpoint, a MingTok-Audio folder a ``"vae"`` one. For a model too
    large for host memory use :func:`convert` (streams to disk)."""
    return _in_memory(plan_reference(src), dtype)


def _check_dst(dst: str, overwrite: bool) -> str:
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    return dst


def _write(dst: str, overwrite: bool, configs: dict, source: str, tokenizer_from: str,
           fill: Callable, max_group_bytes: int) -> None:
    """Assemble a checkpoint under a temporary name beside ``dst`` (``fill(writer)`` writes the params through a
    :class:`~unitok_jax.convert.store.GroupWriter`) and rename it into place, so a failed or interrupted write
    never leaves a half-written checkpoint at ``dst``."""
    from unitok_jax.convert.store import GroupWriter

    with atomic_dir(_check_dst(dst, overwrite)) as tmp:
        writer = GroupWriter(os.path.join(tmp, PARAMS_DIR), max_group_bytes)
        fill(writer)
        writer.close()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "source": source,
            "components": {k: dataclasses.asdict(v) for k, v in configs.items()},
        }
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        for name in TOKENIZER_FILES:  # the text tokenizer travels with a full model
            if tokenizer_from and os.path.isfile(os.path.join(tokenizer_from, name)):
                shutil.copy2(os.path.join(tokenizer_from, name), os.path.join(tmp, name))


def save(ckpt: Checkpoint, dst: str, *, overwrite: bool = False, max_group_bytes: Optional[int] = None) -> None:
    """Write ``dst/unitok_config.json`` and ``dst/params`` (orbax, in groups: :mod:`unitok_jax.convert.store`).
    The folder is assembled under a temporary name and renamed into place, so an interrupted save never leaves a
    half-written checkpoint at ``dst``."""
    from unitok_jax.convert.common import flat_items
    from unitok_jax.convert.store import DEFAULT_GROUP_BYTES

    def fill(writer):
        for name, tree in ckpt.params.items():
            for path, x in flat_items(tree):
                writer.add((name,) + path, None, np.asarray(x))

    _write(dst, overwrite, ckpt.configs, ckpt.source, ckpt.path, fill, max_group_bytes or DEFAULT_GROUP_BYTES)


def convert(src: str, dst: str, *, dtype=None, overwrite: bool = False, max_group_bytes: Optional[int] = None,
            progress: bool = True) -> Plan:
    """Convert a reference checkpoint folder to a unitok_jax checkpoint at ``dst``, streaming: every key and shape
    is checked first (nothing read), then the params are read from the memory-mapped safetensors, converted and
    written a bounded group at a time (``max_group_bytes``, default 256 MiB, or one tensor if larger; a stacked
    param larger than that, one layer at a time), so host memory stays near two groups, not the model. ``dtype``
    (default: the checkpoint's own, bfloat16 for the release) is the dtype the params are written in, norms and
    router float32 (:func:`unitok_jax.model.param_dtypes`). Nothing is written at ``dst`` on failure. Returns the
    plan (its ``config`` as saved, ``num_params()``)."""
    from unitok_jax.convert.plan import iter_units, target_dtypes
    from unitok_jax.convert.store import DEFAULT_GROUP_BYTES

    _check_dst(dst, overwrite)
    plan = plan_reference(src)
    dt = _dtype(dtype) if dtype is not None else (plan.source_dtype or np.dtype(np.float32))
    dtypes = target_dtypes(plan, dt)
    plan.config = with_param_dtype(plan.component, plan.config, dt)
    max_group_bytes = max_group_bytes or DEFAULT_GROUP_BYTES
    pieces = plan.pieces(dtypes, max_group_bytes)
    total = sum(int(np.prod(plan.unit_shape(u), dtype=np.int64)) * dtypes[u[0]].itemsize
                for piece in pieces for u in piece.units)

    def fill(writer):
        from tqdm import tqdm

        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                  desc=f"{plan.component} -> {dt.name}") as bar:
            for (path, layer), a in iter_units(plan, dtypes, pieces):
                writer.add((plan.component,) + path, layer, a, full_shape=plan.shapes[path],
                           layers=None if layer is None else plan.stacked[path])
                bar.update(a.nbytes)
                del a

    _write(dst, overwrite, {plan.component: plan.config}, plan.source, plan.path, fill, max_group_bytes)
    return plan


def abstract_params(component: str, cfg):
    """ShapeDtypeStructs of a component's params as its config implies (``jax.eval_shape`` of the model's init:
    nothing allocated; remembered per config, tracing the full model takes seconds)."""
    try:
        return _abstract_params(component, cfg)
    except TypeError:  # an unhashable config
        return _abstract_params.__wrapped__(component, cfg)


@functools.lru_cache(maxsize=8)
def _abstract_params(component: str, cfg):
    import jax

    from unitok_jax import model, vae

    init = {"vae": vae.init_params, "uniaudio": model.init_params}[component]
    return jax.eval_shape(lambda k: init(cfg, k), jax.random.key(0))


def check_params(component: str, cfg, params, where: str) -> None:
    """Raise :class:`ConversionError` (prefixed by ``where``) unless every parameter the config implies is present
    with the shape it implies (shapes from ``jax.eval_shape`` of the model's init: no allocation). ``params`` may
    hold arrays or ``jax.ShapeDtypeStruct``s."""
    import jax

    want = abstract_params(component, cfg)
    have = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    missing, wrong = [], []
    for k, v in jax.tree_util.tree_leaves_with_path(want):
        name = jax.tree_util.keystr(k)
        if name not in have:
            missing.append(name)
        elif tuple(have[name]) != tuple(v.shape):
            wrong.append(f"{name} has shape {tuple(have[name])}, the config implies {tuple(v.shape)}")
    if wrong or missing:
        more = len(wrong) + len(missing) - 3
        raise ConversionError(f"{where}: " + "; ".join((wrong + [f"missing {m}" for m in missing])[:3])
                              + (f" (and {more} more)" if more > 0 else ""))


def component_shardings(component: str, cfg, abstract, mesh, rules=None):
    """NamedShardings of one component's params (``abstract``: arrays or ShapeDtypeStructs) on ``mesh``: the LLM by
    its logical axis names under ``rules`` (default :data:`unitok_jax.sharding.DEFAULT_RULES`), the rest FSDP-style
    (:func:`unitok_jax.sharding.uniaudio_shardings`)."""
    import jax

    from unitok_jax import sharding as shd

    rules = shd.DEFAULT_RULES if rules is None else tuple(tuple(r) for r in rules)
    shapes = tuple((tuple(k.key for k in p), tuple(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(abstract))
    try:
        hash((cfg, mesh, rules))
    except TypeError:  # unhashable config or rules (lists from JSON): nothing remembered
        return _component_shardings.__wrapped__(component, cfg, mesh, rules, shapes)
    return _component_shardings(component, cfg, mesh, rules, shapes)


@functools.lru_cache(maxsize=8)
def _component_shardings(component, cfg, mesh, rules, shapes):
    # remembered: the LLM's shardings come from tracing its init, which takes seconds
    import jax

    from unitok_jax import sharding as shd
    from unitok_jax.convert.plan import nest

    abstract = nest({p: jax.ShapeDtypeStruct(s, np.float32) for p, s in shapes})
    if component == "uniaudio":
        return shd.uniaudio_shardings(cfg, abstract, mesh, rules)
    return shd.uniaudio_shardings(None, {"audio": abstract}, mesh, rules)["audio"]


def _read_meta(path: str) -> tuple[dict, dict]:
    """(the checkpoint's config.json, its config per component); ConversionError when it is not a checkpoint."""
    path = os.path.abspath(path)
    meta_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(meta_path):
        raise ConversionError(f"{path} is not a unitok_jax checkpoint (no {CONFIG_NAME}; convert it first with "
                              f"`python -m unitok_jax.convert SRC {path}`)")
    meta = read_json(meta_path)
    version = meta.get("version")
    if meta.get("format") != FORMAT or version not in VERSIONS:
        raise ConversionError(f"{meta_path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"version {version!r} (expected {FORMAT!r} {' or '.join(map(str, VERSIONS))})")
    configs = {}
    components = meta.get("components")
    if not isinstance(components, dict) or not components:
        raise ConversionError(f"{meta_path}: no 'components' object (damaged config?)")
    for name, d in components.items():
        if name not in CONFIG_LOADERS:
            raise ConversionError(f"{meta_path}: unknown component {name!r}")
        try:
            configs[name] = CONFIG_LOADERS[name](d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConversionError(f"{meta_path}: invalid {name} config ({type(e).__name__}: {e})") from None
    return meta, configs


def read_configs(path: str) -> dict:
    """The config of each component of a checkpoint (``{"vae": VAEConfig}`` or ``{"uniaudio": UniAudioConfig}``),
    without reading its params."""
    return _read_meta(os.path.abspath(path))[1]


def read_vae_config(path: str) -> VAEConfig:
    """The VAEConfig of either kind of checkpoint (as :meth:`Checkpoint.vae`), without reading its params."""
    configs = read_configs(path)
    if "vae" in configs:
        return configs["vae"]
    if "uniaudio" in configs:
        return configs["uniaudio"].vae
    raise ConversionError(f"{path}: the checkpoint holds no AudioVAE")


def load(path: str, *, mesh=None, rules=None, dtype=None) -> Checkpoint:
    """Restore a checkpoint written by :func:`save` / :func:`convert` (or the CLI), VERSION 1 or 2.

    ``mesh``: every param is restored straight into its ``NamedSharding`` (:func:`component_shardings` under
    ``rules``): orbax reads, per device, only that device's slice, so no host or device holds the whole model.
    Without a mesh, params land on the default (first local) device. ``dtype`` (None: as stored) casts while
    reading: compute params become ``dtype``, norms and MoE router weights float32
    (:func:`unitok_jax.model.param_dtypes`); the returned config follows (:func:`with_param_dtype`: the LLM's
    ``param_dtype`` and compute ``dtype`` become ``dtype``; with ``dtype=None`` its ``param_dtype`` is the stored
    one and the compute dtype is the saved config's). Shapes are checked against the config before anything is
    allocated."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from unitok_jax.convert import store
    from unitok_jax.convert.plan import nest
    from unitok_jax.model import param_dtypes

    path = os.path.abspath(path)
    meta, configs = _read_meta(path)
    version = meta["version"]
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise ConversionError(f"{path}: the params folder {PARAMS_DIR}/ is missing")
    if version == 1:
        index, stored = None, store.stored_shapes_v1(params_dir)
    else:
        index = store.read_index(params_dir)
        stored = store.stored_shapes_v2(index)
    missing = sorted(set(configs) - {p[0] for p in stored})
    if missing:
        raise ConversionError(f"{params_dir}: no params for component(s) {missing}")
    unknown = sorted({p[0] for p in stored} - set(configs))
    if unknown:
        raise ConversionError(f"{params_dir}: params of component(s) {unknown} that {CONFIG_NAME} does not list")
    device = None if mesh is not None else SingleDeviceSharding(jax.local_devices()[0])
    targets = {}
    for name, cfg in configs.items():
        abstract = nest({p[1:]: jax.ShapeDtypeStruct(s, d) for p, (s, d) in stored.items() if p[0] == name})
        check_params(name, cfg, abstract, f"{path}: {CONFIG_NAME} does not match the weights in {PARAMS_DIR}/")
        dtypes = param_dtypes(abstract, dtype)
        shardings = (component_shardings(name, cfg, abstract, mesh, rules) if mesh is not None
                     else jax.tree.map(lambda _: device, abstract))
        for (p, a), d, s in zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(dtypes),
                                jax.tree.leaves(shardings)):
            targets[(name,) + tuple(k.key for k in p)] = jax.ShapeDtypeStruct(a.shape, d, sharding=s)
        if name == "uniaudio":  # requested: params and compute in it; as stored: the params' dtype
            own = dtype if dtype is not None else stored[("uniaudio", "model", "embed", "embedding")][1]
            configs[name] = with_param_dtype(name, cfg, own, compute=dtype is not None)
    if version == 1:
        flat = store.restore_v1(params_dir, targets, stored)
    else:
        flat = store.restore_v2(params_dir, index, targets)
    params = nest(flat)
    return Checkpoint(configs, {k: params[k] for k in configs}, source=meta.get("source", ""), path=path)


__all__ = ["Checkpoint", "ConversionError", "check_params", "convert", "convert_reference", "load", "read_configs", "read_vae_config", "save"]
