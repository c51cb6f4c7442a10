"""Reading reference (PyTorch) checkpoints with safetensors' numpy API, and strict key bookkeeping.

Only the ``unitok_jax.convert`` package knows the reference parameter names.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np


class ConversionError(ValueError):
    """A checkpoint does not match what the converter expects (missing/unexpected/mis-shaped key, bad file)."""


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"cannot read safetensors file {path}: {e}") from e


def read_weights(src: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint: a ``.safetensors`` file, or a folder holding ``model.safetensors`` or a sharded
    set described by ``model.safetensors.index.json`` (every shard must be present)."""
    if os.path.isfile(src):
        return _load_safetensors(src)
    if not os.path.isdir(src):
        raise ConversionError(f"checkpoint path {src} does not exist")
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"cannot read shard index {index}: {e}") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(src, s))]
        if missing:
            raise ConversionError(f"{src}: shard(s) listed in model.safetensors.index.json are missing: {missing}")
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(_load_safetensors(os.path.join(src, shard)))
        absent = sorted(k for k in weight_map if k not in out)
        if absent:
            raise ConversionError(f"{src}: keys listed in the index are not in their shards, e.g. {absent[:5]}")
        return out
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"{src} holds no .safetensors file and no model.safetensors.index.json")
    out = {}
    for f in files:
        out.update(_load_safetensors(os.path.join(src, f)))
    return out


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ConversionError(f"config file {path} not found") from e
    except ValueError as e:
        raise ConversionError(f"config file {path} is not valid JSON: {e}") from e


class WeightReader:
    """Hands out reference tensors by name, checking shapes, and remembers which keys were used.

    ``prefix`` is prepended to every name asked for. :meth:`finish` raises if any key under the prefix was left
    unused (other than the ``ignore`` patterns).
    """

    def __init__(self, weights: Mapping[str, np.ndarray], prefix: str = "", source: str = "checkpoint"):
        self.weights = weights
        self.prefix = prefix
        self.source = source
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return self.prefix + name in self.weights

    def get(self, name: str, shape: Optional[Sequence[int]] = None, dtype=np.float32) -> np.ndarray:
        key = self.prefix + name
        if key not in self.weights:
            want = f" (expected shape {tuple(shape)})" if shape is not None else ""
            raise ConversionError(f"{self.source}: missing key {key!r}{want}")
        arr = self.weights[key]
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ConversionError(
                f"{self.source}: key {key!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}"
            )
        self.used.add(key)
        return np.asarray(arr, dtype=dtype) if dtype is not None else np.asarray(arr)

    def linear(self, name: str, d_in: int, d_out: int, bias: bool) -> dict[str, np.ndarray]:
        """A torch Linear ``name.weight`` [out, in] (+ ``name.bias``) as a flax Dense {kernel [in, out], bias}."""
        p = {"kernel": self.get(f"{name}.weight", (d_out, d_in)).T}
        if bias:
            p["bias"] = self.get(f"{name}.bias", (d_out,))
        return p

    def unused(self, ignore: Iterable[str] = ()) -> list[str]:
        pats = [re.compile(p) for p in ignore]
        left = []
        for k in self.weights:
            if not k.startswith(self.prefix) or k in self.used:
                continue
            rest = k[len(self.prefix) :]
            if any(p.fullmatch(rest) for p in pats):
                continue
            left.append(k)
        return sorted(left)

    def finish(self, ignore: Iterable[str] = ()) -> None:
        left = self.unused(ignore)
        if left:
            more = f" (and {len(left) - 10} more)" if len(left) > 10 else ""
            raise ConversionError(f"{self.source}: unexpected key(s) {left[:10]}{more}")


def heads_in(r: WeightReader, name: str, d_in: int, n: int, d: int, bias: bool) -> dict:
    """torch Linear [n*d, d_in] -> DenseGeneral kernel [d_in, n, d] (+ bias [n, d])."""
    p = {"kernel": r.get(f"{name}.weight", (n * d, d_in)).T.reshape(d_in, n, d)}
    if bias:
        p["bias"] = r.get(f"{name}.bias", (n * d,)).reshape(n, d)
    return p


def heads_out(r: WeightReader, name: str, n: int, d: int, d_out: int, bias: bool) -> dict:
    """torch Linear [d_out, n*d] -> DenseGeneral kernel [n, d, d_out] (+ bias [d_out])."""
    p = {"kernel": r.get(f"{name}.weight", (d_out, n * d)).T.reshape(n, d, d_out)}
    if bias:
        p["bias"] = r.get(f"{name}.bias", (d_out,))
    return p


def stack_layers(per_layer: list[dict]) -> dict:
    """Stack a list of identical per-layer param trees along a new leading ``layers`` axis (our scanned layout)."""
    import jax

    return jax.tree.map(lambda *xs: np.stack(xs, axis=0), *per_layer)


def detect_prefix(weights: Mapping[str, np.ndarray], probe: str, candidates: Sequence[str]) -> str:
    """The first candidate prefix under which ``probe`` exists (e.g. ``"audio."`` or ``""``)."""
    for c in candidates:
        if c + probe in weights:
            return c
    raise ConversionError(f"cannot find {probe!r} under any of the prefixes {list(candidates)}")
