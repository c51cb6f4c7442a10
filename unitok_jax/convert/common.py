"""Reading reference (PyTorch) safetensors checkpoints, and strict key bookkeeping.

The safetensors header is parsed here by hand rather than through the ``safetensors`` package: numpy has no bf16
(the release's dtype) and per-device slices need a memory map (:class:`_SafetensorsFile`).

Only the ``unitok_jax.convert`` package knows the reference parameter names.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np


class ConversionError(ValueError):
    """A checkpoint does not match what the converter expects (missing/unexpected/mis-shaped key, bad file)."""


# ----------------------------------------------------------------------------------------------- tensor sources

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
    "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _st_dtype(name: str, path: str, key: str):
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in _ST_DTYPES:
        raise ConversionError(f"{path}: tensor {key!r} has unsupported dtype {name}")
    return np.dtype(_ST_DTYPES[name])


class _SafetensorsFile:
    """Header-parsed, memory-mapped safetensors file: shapes without reading, slices on demand.

    Hand-parsed on purpose (the format is an 8-byte length, a JSON header, then raw little-endian tensors): numpy
    has no bfloat16 of its own, and safetensors' numpy reader cannot read the release's BF16 tensors (safetensors
    0.8: "data type 'bfloat16' not understood"; ml_dtypes supplies the dtype here). Both the streaming conversion
    and the per-device sharded reader (:func:`unitok_jax.convert.llm.load_llm`) also need any slice of a tensor
    straight from a memory map, never the whole tensor. Each read maps the file afresh and drops the map once the
    slice is copied, so the pages read do not stay in this process's resident memory."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or n > 100_000_000:
                    raise ValueError(f"implausible header length {n}")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise ConversionError(f"cannot read safetensors file {path}: {e}") from e
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries = {}
        size = os.path.getsize(path)
        for key, info in header.items():
            try:
                dtype = _st_dtype(info["dtype"], path, key)
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(v) for v in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ConversionError(f"{path}: bad header entry for {key!r}: {e}") from e
            if end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or self.base + end > size:
                raise ConversionError(f"{path}: tensor {key!r} has inconsistent offsets (file truncated?)")
            self.entries[key] = (dtype, shape, start)
        self._mm = None

    def shape(self, key):
        return self.entries[key][1]

    def dtype(self, key):
        return self.entries[key][0]

    def read(self, key, index=None) -> np.ndarray:
        dtype, shape, start = self.entries[key]
        if int(np.prod(shape, dtype=np.int64)) == 0:
            arr = np.zeros(shape, dtype)
        else:
            arr = np.memmap(self.path, dtype=dtype, mode="r", offset=self.base + start, shape=shape)
        return np.array(arr if index is None else arr[index])


class TensorSource(Mapping):
    """Lazy, read-only access to a checkpoint's tensors: a Mapping name -> array (read on access), plus
    ``shape(key)`` without reading and ``read(key, index)`` for slices."""

    def __init__(self, shapes: Mapping[str, tuple], reader: Callable[[str, Any], np.ndarray], name: str,
                 dtypes: Optional[Mapping[str, Any]] = None):
        self._shapes = dict(shapes)
        self._reader = reader
        self._dtypes = dict(dtypes or {})
        self.name = name

    def keys(self):
        return self._shapes.keys()

    def __getitem__(self, key) -> np.ndarray:
        if key not in self._shapes:
            raise KeyError(key)
        return self.read(key)

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key):
        return key in self._shapes

    def shape(self, key) -> tuple:
        return tuple(self._shapes[key])

    def read(self, key, index=None) -> np.ndarray:
        return self._reader(key, index)

    def dtype(self, key) -> Optional[np.dtype]:
        """The stored dtype of ``key`` (None if unknown)."""
        d = self._dtypes.get(key)
        return None if d is None else np.dtype(d)

    def main_dtype(self) -> Optional[np.dtype]:
        """The floating dtype holding most of the checkpoint's elements (the checkpoint's "own" dtype: bfloat16
        for the release), None if no dtype is known."""
        count: dict = {}
        for k, shape in self._shapes.items():
            d = self.dtype(k)
            if d is not None and (d.kind == "f" or d.name == "bfloat16"):  # ml_dtypes' bfloat16 has kind "V"
                count[d] = count.get(d, 0) + int(np.prod(shape, dtype=np.int64))
        return max(count, key=count.get) if count else None

    @classmethod
    def from_dict(cls, weights: Mapping[str, Any], name: str = "state dict") -> "TensorSource":
        def read(key, index):
            a = weights[key]
            return np.asarray(a if index is None else a[index])

        dtypes = {k: v.dtype for k, v in weights.items() if hasattr(v, "dtype")}
        return cls({k: tuple(np.shape(v)) for k, v in weights.items()}, read, name, dtypes)

    @classmethod
    def from_files(cls, files: Sequence[str], name: str, weight_map: Optional[Mapping[str, str]] = None):
        opened = {f: _SafetensorsFile(f) for f in files}
        where: dict[str, _SafetensorsFile] = {}
        for f in opened.values():
            for k in f.entries:
                where[k] = f
        if weight_map is not None:
            absent = sorted(k for k in weight_map if k not in where)
            if absent:
                raise ConversionError(f"{name}: keys listed in the index are not in their shards, e.g. {absent[:5]}")
        return cls({k: f.shape(k) for k, f in where.items()}, lambda k, i: where[k].read(k, i), name,
                   {k: f.dtype(k) for k, f in where.items()})

    @classmethod
    def open(cls, src) -> "TensorSource":
        """A source from a path (file or folder) or a mapping of arrays."""
        if isinstance(src, TensorSource):
            return src
        if isinstance(src, Mapping):
            return cls.from_dict(src)
        src = os.fspath(src)
        if os.path.isfile(src):
            return cls.from_files([src], src)
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
            return cls.from_files([os.path.join(src, s) for s in shards], src, weight_map)
        files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
        if not files:
            raise ConversionError(f"{src} holds no .safetensors file and no model.safetensors.index.json")
        return cls.from_files([os.path.join(src, f) for f in files], src)


def read_weights(src) -> "TensorSource":
    """All tensors of a checkpoint as a lazy mapping: a ``.safetensors`` file, or a folder holding
    ``model.safetensors`` or a sharded set described by ``model.safetensors.index.json`` (every shard must be
    present). Headers are checked up front (a truncated file is reported by name); data is read on access."""
    return TensorSource.open(src)


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

    With ``checking`` set, :meth:`get` checks the key and its shape without reading: it returns a zero-strided
    array of the right shape (no memory), except for tensors of at most :data:`CHECK_READ_MAX` elements, which are
    read for the converters' value checks (Hann window, rotary frequencies). A converter run once this way checks
    every key before anything large is read (see :class:`Stacked`).
    """

    CHECK_READ_MAX = 1 << 16

    def __init__(self, weights: Mapping[str, np.ndarray], prefix: str = "", source: str = "checkpoint"):
        self.weights = weights
        self.prefix = prefix
        self.source = source
        self.used: set[str] = set()
        self.checking = False

    def has(self, name: str) -> bool:
        return self.prefix + name in self.weights

    def get(self, name: str, shape: Optional[Sequence[int]] = None, dtype=np.float32) -> np.ndarray:
        key = self.prefix + name
        if key not in self.weights:
            want = f" (expected shape {tuple(shape)})" if shape is not None else ""
            raise ConversionError(f"{self.source}: missing key {key!r}{want}")
        w = self.weights
        found = tuple(w.shape(key) if isinstance(w, TensorSource) else np.shape(w[key]))
        if shape is not None and found != tuple(shape):
            raise ConversionError(f"{self.source}: key {key!r} has shape {found}, expected {tuple(shape)}")
        self.used.add(key)
        if self.checking and int(np.prod(found, dtype=np.int64)) > self.CHECK_READ_MAX:
            return np.broadcast_to(np.zeros((), dtype or np.float32), found)
        arr = self.weights[key]
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


class Stacked:
    """A scanned stack (params with a leading ``layers`` axis) converted one layer at a time: ``layer(i)`` -> the
    param tree of layer ``i`` (numpy). Converters return these in place of stacked subtrees, so the streaming
    conversion can read, convert and write one layer at a time; :func:`materialize` stacks them."""

    def __init__(self, n: int, layer: Callable[[int], dict]):
        self.n = int(n)
        self.layer = layer

    def __repr__(self):
        return f"Stacked(n={self.n})"


def materialize(tree):
    """``tree`` with every :class:`Stacked` replaced by its layers stacked along a new leading axis."""
    if isinstance(tree, Stacked):
        return stack_layers([materialize(tree.layer(i)) for i in range(tree.n)])
    if isinstance(tree, Mapping):
        return {k: materialize(v) for k, v in tree.items()}
    return tree


def lazy_items(tree, prefix: tuple = ()):
    """``(path, leaf)`` pairs of a converter's tree, a :class:`Stacked` counting as one leaf."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from lazy_items(v, prefix + (k,))
    else:
        yield prefix, tree


def flat_items(tree, prefix: tuple = ()):
    """``(path, array)`` pairs of a plain nested-dict param tree."""
    return lazy_items(tree, prefix)


def detect_prefix(weights: Mapping[str, np.ndarray], probe: str, candidates: Sequence[str]) -> str:
    """The first candidate prefix under which ``probe`` exists (e.g. ``"audio."`` or ``""``)."""
    for c in candidates:
        if c + probe in weights:
            return c
    raise ConversionError(f"cannot find {probe!r} under any of the prefixes {list(candidates)}")
