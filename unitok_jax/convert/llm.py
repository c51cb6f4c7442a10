"""Reference BailingMoE weights -> :class:`unitok_jax.llm.BailingMoeLM` params.

Accepted sources: an in-memory state dict (numpy arrays), a ``.safetensors`` file, or a folder with
``model.safetensors`` / a sharded set described by ``model.safetensors.index.json`` (the 16B release). Keys may be
the standalone LLM's (``model.layers...``, ``lm_head.weight``) or the full checkpoint's (an extra ``model.``
prefix); other components of a full checkpoint (``audio.``, ``flowloss.``, ...) are left alone.

Expert layouts: per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``) or stacked / grouped-gemm
(``mlp.experts.{gate,up,down}_proj.weight`` [E, out, in]); each layer may use either.

Safetensors files are memory-mapped and read slice by slice (bfloat16 included, via ml_dtypes), so
:func:`load_llm` with a mesh builds each sharded param from exactly the slices its devices hold
(``jax.make_array_from_callback``) without ever loading the checkpoint, or a whole param, into host memory.

Every expected key and shape is checked before anything is read; errors (:class:`ConversionError`) name the key,
the shape found and the shape expected; keys of the LLM that nothing consumed are reported as unexpected.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from unitok_jax.convert.common import ConversionError, TensorSource, read_json

# ------------------------------------------------------------------------------------------------ the plan

IGNORE = (r".*rotary_emb\.inv_freq",)


class _Plan:
    """Our param paths -> (shape, fetch(index)); records every source key it will read, with shape checks."""

    def __init__(self, src: TensorSource, dtype):
        self.src = src
        self.dtype = dtype
        self.used: set[str] = set()
        self.params: dict[tuple, tuple[tuple, Callable]] = {}

    def need(self, key: str, shape: Sequence[int], why: str = "") -> str:
        if key not in self.src:
            raise ConversionError(f"{self.src.name}: missing key {key!r} (expected shape {tuple(shape)}){why}")
        got = self.src.shape(key)
        if tuple(got) != tuple(shape):
            raise ConversionError(f"{self.src.name}: key {key!r} has shape {tuple(got)}, expected {tuple(shape)}")
        self.used.add(key)
        return key

    def read(self, key, index=None):
        a = self.src.read(key, index)
        return a if self.dtype is None else a.astype(self.dtype)  # dtype None: as stored

    def add(self, path: tuple, shape: tuple, fetch: Callable):
        self.params[path] = (tuple(shape), fetch)

    # ---- building blocks: each returns fetch(index) for one layer, index over OUR param's dims

    def linear(self, key, d_in, d_out):
        """torch Linear [out, in] -> kernel [in, out]."""
        self.need(key, (d_out, d_in))
        return lambda i: self.read(key, (i[1], i[0])).T

    def vector(self, key, n):
        self.need(key, (n,))
        return lambda i: self.read(key, i)

    def layered(self, path, layer_ids, shape, per_layer: Callable[[int], Callable]):
        fetchers = [per_layer(l) for l in layer_ids]

        def fetch(index):
            index = _full_index(index, 1 + len(shape))
            sel = range(len(fetchers))[index[0]]
            out = [fetchers[j](index[1:]) for j in sel]
            if not out:
                return np.zeros((0,) + tuple(_slice_len(s, n) for s, n in zip(index[1:], shape)),
                                self.dtype or np.float32)
            return np.stack(out, axis=0)

        self.add(path, (len(layer_ids),) + tuple(shape), fetch)


def _full_index(index, ndim):
    if index is None:
        return (slice(None),) * ndim
    index = tuple(index)
    return index + (slice(None),) * (ndim - len(index))


def _slice_len(s, n):
    return len(range(n)[s])


def detect_root(src: TensorSource) -> str:
    """The name prefix of the LLM's tensors: "model." in a full BailingMM checkpoint, "" in an LLM-only one."""
    for root in ("model.", ""):
        if f"{root}model.word_embeddings.weight" in src:
            return root
    raise ConversionError(
        f"{src.name}: no BailingMoE LLM found: neither 'model.model.word_embeddings.weight' (full checkpoint) nor "
        f"'model.word_embeddings.weight' (standalone LLM) is present"
    )


def plan_llm(src: TensorSource, cfg, root: str, dtype) -> _Plan:
    """Every param of the LLM as (shape, fetch(index)), all keys and shapes checked first; ``dtype`` None reads
    tensors as stored."""
    pl = _Plan(src, dtype)
    m = f"{root}model."
    D, V = cfg.width, cfg.vocab_size
    N, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv_rows = (N + 2 * K) * hd

    emb_key = pl.need(f"{m}word_embeddings.weight", (V, D))
    pl.add(("embed", "embedding"), (V, D), lambda i: pl.read(emb_key, _full_index(i, 2)))
    norm_key = pl.need(f"{m}norm.weight", (D,))
    pl.add(("final_norm", "scale"), (D,), lambda i: pl.read(norm_key, _full_index(i, 1)))
    if not cfg.tie_word_embeddings:
        head_key = pl.need(f"{root}lm_head.weight", (V, D))

        def head(i):
            i = _full_index(i, 2)  # our [D, V]
            w = pl.read(head_key, (slice(None), i[0]))  # [V, D_slice]: norm_head needs whole vocab columns
            if cfg.norm_head:
                from unitok_jax.llm import apply_norm_head

                w = apply_norm_head(w).astype(dtype or np.float32)
            return w[i[1]].T

        pl.add(("lm_head",), (D, V), head)

    def attention(prefix, l):
        p = f"{m}layers.{l}."
        qkv = pl.need(f"{p}attention.query_key_value.weight", (qkv_rows, D))
        dense = pl.need(f"{p}attention.dense.weight", (D, N * hd))
        out = {}
        for name, start, heads in (("q", 0, N), ("k", N * hd, K), ("v", (N + K) * hd, K)):

            def kernel(i, start=start, heads=heads):  # ours [D, heads, hd]
                w = pl.read(qkv, (slice(start, start + heads * hd), i[0]))  # [heads*hd, Dsl]
                return w.reshape(heads, hd, -1).transpose(2, 0, 1)[:, i[1], i[2]]

            out[(prefix, "attn", name, "kernel")] = ((D, heads, hd), kernel)
            if cfg.q_bias:
                bkey = pl.need(f"{p}attention.query_key_value.bias", (qkv_rows,))

                def bias(i, start=start, heads=heads, bkey=bkey):
                    return pl.read(bkey, slice(start, start + heads * hd)).reshape(heads, hd)[i[0], i[1]]

                out[(prefix, "attn", name, "bias")] = ((heads, hd), bias)
        out[(prefix, "attn", "o", "kernel")] = (
            (N, hd, D),
            lambda i: pl.read(dense, (i[2], slice(None))).reshape(-1, N, hd).transpose(1, 2, 0)[i[0], i[1]],
        )
        if cfg.o_bias:
            obias = pl.need(f"{p}attention.dense.bias", (D,))
            out[(prefix, "attn", "o", "bias")] = ((D,), lambda i: pl.read(obias, i[0]))
        out[(prefix, "attn_norm", "scale")] = ((D,), pl.vector(f"{p}input_layernorm.weight", D))
        out[(prefix, "mlp_norm", "scale")] = ((D,), pl.vector(f"{p}post_attention_layernorm.weight", D))
        return out

    def dense_layer(l):
        p = f"{m}layers.{l}.mlp."
        out = attention("dense", l)
        F = cfg.mlp_dim
        for name, (di, do) in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D))):
            out[("dense", "mlp", name, "kernel")] = ((di, do), pl.linear(f"{p}{name}_proj.weight", di, do))
        return out

    def moe_layer(l):
        p = f"{m}layers.{l}.mlp."
        out = attention("moe", l)
        E, F = cfg.num_experts, cfg.moe_intermediate_size
        gates = ["gate"] + (["image_gate", "audio_gate"] if cfg.multi_gate else [])
        for g in gates:
            why = " (config multi_gate=true)" if g != "gate" else ""
            if why and f"{p}{g}.weight" not in src:
                raise ConversionError(f"{src.name}: missing key {p + g + '.weight'!r} (expected shape {(E, D)}){why}")
            out[("moe", "moe", g)] = ((D, E), pl.linear(f"{p}{g}.weight", D, E))
        grouped = f"{p}experts.gate_proj.weight" in src
        per_expert = f"{p}experts.0.gate_proj.weight" in src
        if grouped and per_expert:
            raise ConversionError(f"{src.name}: layer {l} has both per-expert and stacked expert weights")
        for ours, name, (di, do) in (("wi_gate", "gate", (D, F)), ("wi_up", "up", (D, F)), ("wo", "down", (F, D))):
            if grouped:
                key = pl.need(f"{p}experts.{name}_proj.weight", (E, do, di))

                def fetch(i, key=key):  # ours [E, di, do] from [E, do, di]
                    return pl.read(key, (i[0], i[2], i[1])).transpose(0, 2, 1)
            else:
                keys = [pl.need(f"{p}experts.{e}.{name}_proj.weight", (do, di)) for e in range(E)]

                def fetch(i, keys=keys, di=di, do=do):
                    sel = range(E)[i[0]]
                    return np.stack([pl.read(keys[e], (i[2], i[1])).T for e in sel], 0).reshape(
                        (len(sel), _slice_len(i[1], di), _slice_len(i[2], do))
                    )

            out[("moe", "moe", ours)] = ((E, di, do), fetch)
        if cfg.shared_dim:
            S = cfg.shared_dim
            for name, (di, do) in (("gate", (D, S)), ("up", (D, S)), ("down", (S, D))):
                out[("moe", "moe", "shared", name, "kernel")] = (
                    (di, do), pl.linear(f"{p}shared_experts.{name}_proj.weight", di, do)
                )
        return out

    for kind, layer_ids, fn in (
        ("dense", list(range(cfg.num_dense_layers)), dense_layer),
        ("moe", list(range(cfg.num_dense_layers, cfg.num_layers)), moe_layer),
    ):
        if not layer_ids:
            continue
        per = [fn(l) for l in layer_ids]  # checks every key of every layer now
        for sub in per[0]:
            shape = per[0][sub][0]
            path = (sub[0], "layers") + sub[1:]
            fetchers = [p[sub][1] for p in per]
            pl.layered(path, layer_ids, shape, lambda j, fetchers=fetchers, base=layer_ids[0]: fetchers[j - base])

    # Everything of the LLM must have been consumed.
    ignore = [re.compile(x) for x in IGNORE]
    if cfg.tie_word_embeddings:
        ignore.append(re.compile(re.escape(f"{root}lm_head.weight")))
    llm_keys = [k for k in src.keys() if k.startswith(m) or k.startswith(f"{root}lm_head.")]
    left = sorted(k for k in llm_keys if k not in pl.used and not any(p.fullmatch(k) for p in ignore))
    if left:
        more = f" (and {len(left) - 10} more)" if len(left) > 10 else ""
        raise ConversionError(
            f"{src.name}: unexpected key(s) {left[:10]}{more} for this llm_config (check use_qkv_bias, use_bias, "
            f"multi_gate, num_experts, first_k_dense_replace, num_hidden_layers)"
        )
    return pl


def _nest(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


# --------------------------------------------------------------------------------------------------- public


def resolve_config(src: TensorSource, llm_config: Optional[Mapping], path_hint=None, **overrides):
    """LLMConfig from ``llm_config`` (a dict: llm_config itself, a {"llm_config": ...} config, or a {"class",
    "kwargs"} fixture config), or from ``config.json`` beside a checkpoint folder. A missing ``multi_gate`` is
    inferred from the presence of ``mlp.audio_gate`` weights."""
    from unitok_jax.llm import LLMConfig

    if llm_config is None:
        if path_hint is None or not os.path.isdir(path_hint):
            raise ConversionError("no llm_config given and no checkpoint folder with a config.json to read it from")
        llm_config = read_json(os.path.join(path_hint, "config.json"))
    c = dict(llm_config)
    if "llm_config" in c:
        c = dict(c["llm_config"])
    elif "kwargs" in c and "class" in c:
        c = dict(c["kwargs"])
    if "multi_gate" not in c:
        c["multi_gate"] = any(k.endswith("mlp.audio_gate.weight") for k in src.keys())
    try:
        return LLMConfig.from_hf(c, **overrides)
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"invalid llm_config: {e}") from e


def convert_llm(weights, llm_config: Optional[Mapping] = None, *, dtype=np.float32, **overrides):
    """Reference LLM weights (state dict, file or folder) + its ``llm_config`` -> ``(LLMConfig, variables)`` with
    ``variables = {"params": {...}}`` as host numpy arrays (``norm_head`` folded into ``lm_head``).
    ``overrides`` go to :meth:`LLMConfig.from_hf` (e.g. ``moe_impl``, ``dtype``)."""
    src = TensorSource.open(weights)
    cfg = resolve_config(src, llm_config, weights if isinstance(weights, (str, os.PathLike)) else None, **overrides)
    plan = plan_llm(src, cfg, detect_root(src), np.dtype(dtype))
    flat = {path: fetch(None) for path, (shape, fetch) in plan.params.items()}
    for path, (shape, _) in plan.params.items():
        assert flat[path].shape == shape, (path, flat[path].shape, shape)
    params = _nest(flat)
    _check_against_model(cfg, params)
    return cfg, {"params": params}


def load_llm(weights, llm_config: Optional[Mapping] = None, *, mesh=None, rules=None, dtype=np.float32, **overrides):
    """Like :func:`convert_llm` but returns device arrays (``dtype`` e.g. ``ml_dtypes.bfloat16``; the config's
    ``param_dtype`` follows). With a ``mesh`` (and logical ``rules``, default
    :data:`unitok_jax.sharding.DEFAULT_RULES`) every param is created in its sharding straight from the checkpoint
    slices that each device holds (``jax.make_array_from_callback`` over memory-mapped safetensors: streamed, the
    whole checkpoint -- or a whole param -- is never in host memory). Without a mesh, params are converted and
    moved to the default device one at a time."""
    import jax

    from unitok_jax import sharding as shd
    from unitok_jax.llm import BailingMoeLM

    overrides.setdefault("param_dtype", np.dtype(dtype).name)
    src = TensorSource.open(weights)
    cfg = resolve_config(src, llm_config, weights if isinstance(weights, (str, os.PathLike)) else None, **overrides)
    plan = plan_llm(src, cfg, detect_root(src), np.dtype(dtype))
    boxed = shd.abstract_init(BailingMoeLM(cfg), np.zeros((1, 1), np.int32))
    _compare_paths(set(plan.params), set(_flatten(boxed["params"])), cfg)
    if mesh is None:
        flat = {p: jax.numpy.asarray(f(None)) for p, (s, f) in plan.params.items()}
        return cfg, {"params": _nest(flat)}
    shardings = _flatten(shd.shardings_for(boxed, mesh, rules or shd.DEFAULT_RULES)["params"])
    flat = {}
    for path, (shape, fetch) in plan.params.items():
        flat[path] = jax.make_array_from_callback(shape, shardings[path], lambda idx, f=fetch: f(idx))
    return cfg, {"params": _nest(flat)}


def export_llm(cfg, variables, *, grouped: bool = False, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_llm`: params -> a reference state dict (torch layout, numpy float32).

    ``grouped``: stacked expert weights (``mlp.experts.{gate,up,down}_proj.weight`` [E, out, in]) instead of one
    tensor per expert. ``prefix``: e.g. ``"model."`` for the full-checkpoint names. ``lm_head`` is written as held
    (with ``norm_head`` already folded in, so write the result with ``norm_head: false``)."""
    p = variables["params"] if "params" in variables else variables
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = {}
    m = f"{prefix}model."
    N, hd, D = cfg.num_heads, cfg.head_dim, cfg.width
    out[f"{m}word_embeddings.weight"] = a(p["embed"]["embedding"])
    out[f"{m}norm.weight"] = a(p["final_norm"]["scale"])
    if not cfg.tie_word_embeddings:
        out[f"{prefix}lm_head.weight"] = a(p["lm_head"]).T
    stacks = [("dense", i, i) for i in range(cfg.num_dense_layers)]
    stacks += [("moe", cfg.num_dense_layers + i, i) for i in range(cfg.num_moe_layers)]
    for kind, l, j in stacks:
        lp = jax_tree_index(p[kind]["layers"], j)
        pre = f"{m}layers.{l}."
        att = lp["attn"]
        out[f"{pre}attention.query_key_value.weight"] = np.concatenate(
            [a(att[n]["kernel"]).transpose(1, 2, 0).reshape(-1, D) for n in ("q", "k", "v")], 0
        )
        if cfg.q_bias:
            out[f"{pre}attention.query_key_value.bias"] = np.concatenate(
                [a(att[n]["bias"]).reshape(-1) for n in ("q", "k", "v")], 0
            )
        out[f"{pre}attention.dense.weight"] = a(att["o"]["kernel"]).transpose(2, 0, 1).reshape(D, N * hd)
        if cfg.o_bias:
            out[f"{pre}attention.dense.bias"] = a(att["o"]["bias"])
        out[f"{pre}input_layernorm.weight"] = a(lp["attn_norm"]["scale"])
        out[f"{pre}post_attention_layernorm.weight"] = a(lp["mlp_norm"]["scale"])
        if kind == "dense":
            for n in ("gate", "up", "down"):
                out[f"{pre}mlp.{n}_proj.weight"] = a(lp["mlp"][n]["kernel"]).T
            continue
        mo = lp["moe"]
        for g in ("gate", "image_gate", "audio_gate"):
            if g in mo:
                out[f"{pre}mlp.{g}.weight"] = a(mo[g]).T
        for ours, name in (("wi_gate", "gate"), ("wi_up", "up"), ("wo", "down")):
            w = a(mo[ours]).transpose(0, 2, 1)  # [E, out, in]
            if grouped:
                out[f"{pre}mlp.experts.{name}_proj.weight"] = w
            else:
                for e in range(w.shape[0]):
                    out[f"{pre}mlp.experts.{e}.{name}_proj.weight"] = w[e]
        if "shared" in mo:
            for n in ("gate", "up", "down"):
                out[f"{pre}mlp.shared_experts.{n}_proj.weight"] = a(mo["shared"][n]["kernel"]).T
    return out


def jax_tree_index(tree, i):
    """Layer ``i`` of a scanned (stacked) param tree."""
    if isinstance(tree, Mapping):
        return {k: jax_tree_index(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def _is_box(x):
    from flax.core import meta

    return isinstance(x, meta.AxisMetadata)


def _flatten(tree, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _compare_paths(ours: set, model: set, cfg):
    if ours != model:
        raise ConversionError(
            f"converter/model mismatch for {cfg}: only converted {sorted(ours - model)}, only in model "
            f"{sorted(model - ours)}"
        )


def _check_against_model(cfg, params):
    """Converted params must have exactly the model's tree and shapes."""

    from unitok_jax import sharding as shd
    from unitok_jax.llm import BailingMoeLM

    boxed = shd.abstract_init(BailingMoeLM(cfg), np.zeros((1, 1), np.int32))
    abstract = _flatten(boxed["params"])
    flat = _flatten(params)
    _compare_paths(set(flat), set(abstract), cfg)
    for p, a in abstract.items():
        shape = a.value.shape if _is_box(a) else a.shape
        if tuple(shape) != flat[p].shape:
            raise ConversionError(f"converted param {'/'.join(p)} has shape {flat[p].shape}, model expects {shape}")
