"""Conversion plans: every param of a reference checkpoint as small pieces that are read, converted and written one
at a time (the streaming conversion), with every key and shape checked before anything large is read.

A :class:`Plan` holds a component's config, the full shape of each of its params, which params are layer stacks
(our scanned layout) and how to read them as :class:`Piece` s. A piece reads a bounded amount of the source: one
LLM param, or one layer of a stacked LLM param larger than the group size (the experts: one layer's 64 experts are
~0.4 GB in bfloat16 in the release), one layer of a VAE / DiT stack (its params smaller than a group together are
gathered over the layers and come out whole with the last layer), or a component's small unstacked params. For the
official size at bfloat16 and groups of 256 MiB: ~260 pieces, the largest the 0.5 GB word embeddings, 16 params
written layer by layer. :func:`materialize_plan` assembles the whole tree in memory instead
(``convert_reference``: small models, tests).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Callable, Optional

import numpy as np

from unitok_jax.convert.common import (ConversionError, Stacked, TensorSource, WeightReader, detect_prefix,
                                       flat_items, lazy_items, read_json, read_weights)

# Top-level key prefixes of a full Ming-UniAudio checkpoint (spec 6.2); anything else is unexpected.
FULL_PREFIXES = ("audio.", "model.", "flowloss.", "linear_proj_audio.", "stop_head.")

Path = tuple  # param path inside a component, e.g. ("model", "moe", "layers", "moe", "wi_gate")
Unit = tuple  # (path, layer index or None): a whole param, or one layer of a stacked param


@dataclasses.dataclass
class Piece:
    """Some params read together: ``read()`` -> {unit: numpy array} for exactly ``units``."""

    units: list
    read: Callable[[], dict]


@dataclasses.dataclass
class Plan:
    component: str  # "uniaudio" (full model) or "vae" (tokenizer only)
    config: Any
    shapes: dict  # path -> full shape
    stacked: dict  # path -> number of layers, for params of layer stacks (our scanned layout)
    parts: list  # part(sizes, max_bytes) -> [Piece] (see _Builder)
    source: str = ""
    path: str = ""  # the source folder (holds the tokenizer files of a full model)
    source_dtype: Optional[np.dtype] = None  # the floating dtype of most of the source's elements

    def pieces(self, dtypes: dict, max_bytes: float = float("inf")) -> list:
        """The pieces to read, in order, for params written in ``dtypes`` (path -> dtype), stacked params larger
        than ``max_bytes`` one layer at a time."""
        return [piece for part in self.parts for piece in part(_Sizes(self.shapes, dtypes), max_bytes)]

    def unit_shape(self, unit: Unit) -> tuple:
        path, layer = unit
        return self.shapes[path] if layer is None else self.shapes[path][1:]

    def num_params(self) -> int:
        return int(sum(np.prod(s, dtype=np.int64) for s in self.shapes.values()))

    def abstract(self, dtypes: Optional[dict] = None) -> dict:
        """The nested tree of ``jax.ShapeDtypeStruct`` (``dtypes``: path -> dtype, default float32)."""
        import jax

        return nest({p: jax.ShapeDtypeStruct(s, (dtypes or {}).get(p, np.float32)) for p, s in self.shapes.items()})


class _Sizes:
    """What a part needs to know of the target dtypes: ``nbytes(path)`` and ``cast(path, array)``."""

    def __init__(self, shapes: dict, dtypes: dict):
        self.shapes, self.dtypes = shapes, dtypes

    def nbytes(self, path) -> int:
        return int(np.prod(self.shapes[path], dtype=np.int64)) * np.dtype(self.dtypes[path]).itemsize

    def cast(self, path, a) -> np.ndarray:
        return np.asarray(a, self.dtypes[path])


def nest(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


# ------------------------------------------------------------------------------------------------ builders


class _Builder:
    """Collects shapes and *parts*: ``part(sizes, max_bytes) -> [Piece]`` (``sizes``: a :class:`_Sizes` for the
    dtypes the params are written in). A stacked param is read and written whole when that fits ``max_bytes``,
    otherwise one layer at a time (only such params are restored layer by layer, see ``store.py``)."""

    def __init__(self):
        self.shapes: dict = {}
        self.stacked: dict = {}  # path -> layers, for params of a layer stack
        self.parts: list = []

    def add_lazy_tree(self, base: Path, tree_fn: Callable[[], dict], r: WeightReader, strict_ignore=None,
                      strict: bool = True):
        """A converter's lazy tree (``tree_fn`` reads through ``r``): first run with ``r.checking`` (every key and
        shape checked, unused keys refused, nothing large read), then one piece for the unstacked params and, per
        :class:`Stacked`, one piece for the whole stack or one per layer."""
        r.checking = True
        try:
            tree = tree_fn()
            stacks = []
            for path, leaf in lazy_items(tree):
                if isinstance(leaf, Stacked):
                    first = None
                    for i in range(leaf.n):  # checks every layer's keys
                        got = {p: np.shape(a) for p, a in flat_items(leaf.layer(i))}
                        first = first or got
                    for sub, shape in (first or {}).items():
                        self.shapes[base + path + sub] = (leaf.n,) + tuple(shape)
                        self.stacked[base + path + sub] = leaf.n
                    stacks.append((path, leaf, list(first or {})))
                else:
                    self.shapes[base + path] = tuple(np.shape(leaf))
            if strict:
                r.finish(strict_ignore or ())
        finally:
            r.checking = False
        top = [base + p for p, leaf in lazy_items(tree) if not isinstance(leaf, Stacked)]

        def read_top():
            return {(base + p, None): np.asarray(a) for p, a in lazy_items(tree_fn()) if not isinstance(a, Stacked)}

        if top:
            self.parts.append(lambda sizes, max_bytes: [Piece([(p, None) for p in top], read_top)])
        for path, stk, subs in stacks:

            def part(sizes, max_bytes, stk=stk, path=path, subs=subs):
                # The smallest params of the stack, up to max_bytes together, are collected over the layers and
                # written whole with the last layer; the others layer by layer. The pieces must be read in order.
                whole, room = set(), max_bytes
                for sub in sorted(subs, key=lambda sub: sizes.nbytes(base + path + sub)):
                    if sizes.nbytes(base + path + sub) > room:
                        break
                    whole.add(sub)
                    room -= sizes.nbytes(base + path + sub)
                collected: dict = {}

                def read_layer(i):
                    if i == 0:
                        collected.clear()
                    out = {}
                    for sub, a in flat_items(stk.layer(i)):
                        if sub not in whole:
                            out[(base + path + sub, i)] = np.asarray(a)
                            continue
                        collected.setdefault(sub, []).append(sizes.cast(base + path + sub, a))
                        if i == stk.n - 1:
                            out[(base + path + sub, None)] = np.stack(collected.pop(sub), 0)
                    return out

                return [Piece([(base + path + sub, i) for sub in subs if sub not in whole]
                              + ([(base + path + sub, None) for sub in subs if sub in whole] if i == stk.n - 1 else []),
                              functools.partial(read_layer, i)) for i in range(stk.n)]

            self.parts.append(part)

    def add_arrays(self, base: Path, tree: dict):
        """Params already read (small: the heads)."""
        flat = {base + p: np.asarray(a) for p, a in flat_items(tree)}
        self.shapes.update({p: a.shape for p, a in flat.items()})
        piece = Piece([(p, None) for p in flat], lambda: {(p, None): a for p, a in flat.items()})
        self.parts.append(lambda sizes, max_bytes: [piece])

    def add_llm(self, base: Path, plan):
        """The LLM's plan (:func:`unitok_jax.convert.llm.plan_llm`): one piece per param, except a stacked param
        larger than ``max_bytes`` (the experts): one piece per layer."""
        for path, (shape, fetch) in plan.params.items():
            full = base + path
            self.shapes[full] = tuple(shape)
            stacked = len(path) > 1 and path[1] == "layers"
            if stacked:
                self.stacked[full] = shape[0]

            def part(sizes, max_bytes, full=full, fetch=fetch, stacked=stacked, n=shape[0]):
                if not stacked or sizes.nbytes(full) <= max_bytes:
                    return [Piece([(full, None)], lambda: {(full, None): fetch(None)})]
                return [Piece([(full, i)], functools.partial(lambda i: {(full, i): fetch((slice(i, i + 1),))[0]}, i))
                        for i in range(n)]

            self.parts.append(part)


def _vae_section(config: dict) -> tuple[dict, list[str]] | None:
    """The AudioVAE kwargs in a reference config.json and the prefixes its weights may sit under."""
    if "audio_tokenizer_config" in config:  # full Ming-UniAudio checkpoint
        return config["audio_tokenizer_config"], ["audio.", ""]
    if "kwargs" in config and "enc_kwargs" in config["kwargs"]:  # {"class": ..., "kwargs": ...} (fixtures)
        return config["kwargs"], ["", "audio."]
    if "enc_kwargs" in config:  # standalone MingTok-Audio
        return config, ["", "audio."]
    return None


def plan_full(src: str, config: dict, weights: Optional[TensorSource] = None) -> Plan:
    """A full Ming-UniAudio folder -> the plan of one ``"uniaudio"`` checkpoint (every component, every key
    checked)."""
    from unitok_jax.convert.flow import convert_heads, dit_tree
    from unitok_jax.convert.llm import detect_root, plan_llm, resolve_config
    from unitok_jax.convert.vae import VAE_UNUSED, vae_config, vae_tree
    from unitok_jax.model import UniAudioConfig

    weights = weights if weights is not None else read_weights(src)  # lazy: headers only
    stray = sorted(k for k in weights if not k.startswith(FULL_PREFIXES))
    if stray:
        raise ConversionError(f"{src}: unexpected key(s) outside {list(FULL_PREFIXES)}: {stray[:10]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown llm_config keys are reported by the LLM converter's own warning
        llm_cfg = resolve_config(weights, config["llm_config"])
        llm_plan = plan_llm(weights, llm_cfg, detect_root(weights), None)
    try:
        cfg = UniAudioConfig.from_bailingmm(config)
    except (KeyError, ValueError, TypeError) as e:
        raise ConversionError(f"{src}/config.json: invalid model config: {e}") from e
    cfg = dataclasses.replace(cfg, llm=llm_cfg)
    b = _Builder()
    b.add_llm(("model",), llm_plan)
    vcfg = vae_config(config["audio_tokenizer_config"], src)
    rv = WeightReader(weights, "audio.", src)
    b.add_lazy_tree(("audio",), lambda: vae_tree(rv, vcfg), rv, VAE_UNUSED)
    rf = WeightReader(weights, "flowloss.cfm.model.", src)
    b.add_lazy_tree(("flowloss",), lambda: dit_tree(rf, cfg.flow), rf)
    heads = convert_heads(weights, cfg.heads, source=src)
    b.add_arrays(("linear_proj_audio",), heads["pooling"])
    b.add_arrays(("stop_head",), heads["stop_head"])
    return Plan("uniaudio", cfg, b.shapes, b.stacked, b.parts, source=os.path.abspath(src),
                path=os.path.abspath(src), source_dtype=weights.main_dtype())


def plan_reference(src: str) -> Plan:
    """Plan the conversion of a reference checkpoint folder (``config.json`` + ``model.safetensors`` or a sharded
    set with ``model.safetensors.index.json``): a full Ming-UniAudio folder (``llm_config`` +
    ``audio_tokenizer_config`` + ``ditar_config``) gives a ``"uniaudio"`` plan, a MingTok-Audio folder a ``"vae"``
    one. Every key and shape is checked here; only tensors of a few KB (and the heads) are read."""
    from unitok_jax.convert.vae import VAE_UNUSED, vae_config, vae_tree

    config = read_json(os.path.join(src, "config.json"))
    if all(k in config for k in ("llm_config", "audio_tokenizer_config", "ditar_config")):
        plan = plan_full(src, config)
    else:
        section = _vae_section(config)
        if section is None:
            raise ConversionError(f"{src}/config.json holds no AudioVAE config (expected enc_kwargs/dec_kwargs, or "
                                  f"audio_tokenizer_config)")
        weights = read_weights(src)
        kwargs, prefixes = section
        prefix = detect_prefix(weights, "encoder.fc1.weight", prefixes)
        cfg = vae_config(kwargs, src)
        r = WeightReader(weights, prefix, src)
        b = _Builder()
        b.add_lazy_tree((), lambda: vae_tree(r, cfg), r, VAE_UNUSED)
        plan = Plan("vae", cfg, b.shapes, b.stacked, b.parts, source=os.path.abspath(src),
                    path=os.path.abspath(src), source_dtype=weights.main_dtype())
    check_plan(plan)
    return plan


def check_plan(plan: Plan) -> None:
    """The planned params must be exactly the model's (tree and shapes; nothing allocated)."""
    from unitok_jax.convert import check_params

    check_params(plan.component, plan.config, plan.abstract(), f"{plan.source}: converter/model mismatch")


def target_dtypes(plan: Plan, dtype) -> dict:
    """path -> the dtype each param is written in for ``dtype`` (:func:`unitok_jax.model.param_dtypes`: norms and
    router float32, the rest ``dtype``)."""
    import jax

    from unitok_jax.model import param_dtypes

    tree = param_dtypes(plan.abstract(), np.dtype(dtype))
    return {tuple(k.key for k in p): d for p, d in jax.tree_util.tree_leaves_with_path(tree)}


def iter_units(plan: Plan, dtypes: dict, pieces: Optional[list] = None):
    """``(unit, array)`` of every unit of ``pieces`` (default: every param whole), piece by piece, each cast to its
    dtype and shape-checked."""
    for piece in plan.pieces(dtypes) if pieces is None else pieces:
        got = piece.read()
        if set(got) != set(piece.units):
            raise ConversionError(f"{plan.source}: internal converter error: a piece read {sorted(got)[:3]}, "
                                  f"planned {piece.units[:3]}")
        for unit in piece.units:
            a = got.pop(unit)
            want = plan.unit_shape(unit)
            if tuple(a.shape) != tuple(want):
                raise ConversionError(f"{plan.source}: converted param {'/'.join(unit[0])} has shape {a.shape}, "
                                      f"expected {want}")
            d = dtypes[unit[0]]
            yield unit, (a if a.dtype == d else a.astype(d))
        del got


def materialize_plan(plan: Plan, dtype=np.float32) -> dict:
    """The whole params tree in host memory (numpy)."""
    flat = {path: a for (path, _), a in iter_units(plan, target_dtypes(plan, dtype))}
    return nest({p: flat[p] for p in plan.shapes})
