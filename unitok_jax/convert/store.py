"""The on-disk params of a unitok_jax checkpoint, written in bounded groups and restored straight into shardings.

Layout (VERSION 2)::

    params/index.json        {"format": "unitok_jax.params", "params": [{"path", "shape", "dtype", "layers"}],
                              "groups": [{"dir": "00000", "units": [[path, layer or null], ...]}]}
    params/00000/ ...        one orbax checkpoint (StandardCheckpointer) per group: {"u0": array, "u1": ...}

A param is stored whole (``layer`` null) or, for a layer stack (our scanned layout, leading ``layers`` axis) larger
than a group, one orbax array per layer (``layers``: how many). A group is a bounded set of such units
(:data:`DEFAULT_GROUP_BYTES`, or one unit if larger), so the conversion holds one group in host memory, never the
model: orbax writes a pytree in one call and has no stable API to append to a checkpoint or to write an array slab
by slab (``ocp.v1.partial`` is experimental and appends whole leaves only), hence one orbax item per group and our
own index.

Restoring builds each param's target (``jax.ShapeDtypeStruct`` with its dtype and ``NamedSharding``) and lets orbax
read, per device, only that device's slice, cast on read; a param stored layer by layer is allocated sharded and
filled one layer at a time (a donated ``dynamic_update_slice``, one compile per such param), so neither the host
nor a device ever holds more than its shard plus one layer's shard. VERSION 1 (one orbax checkpoint of the whole
tree at ``params/``) is restored the same way.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from typing import Iterable, Optional

import numpy as np

from unitok_jax.convert.common import ConversionError

INDEX_NAME = "index.json"
INDEX_FORMAT = "unitok_jax.params"
DEFAULT_GROUP_BYTES = 256 << 20


def _checkpointer():
    import jax
    import orbax.checkpoint as ocp

    if jax.process_count() > 1:  # a single process writes (host params): no cross-process barriers
        me = jax.process_index()
        return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"export{me}"))
    return ocp.StandardCheckpointer()


class GroupWriter:
    """Writes units (a whole param, or one layer of a stacked param) into ``params_dir`` in groups of at most
    ``max_group_bytes`` (a larger unit makes a group of its own); :meth:`close` writes the index."""

    def __init__(self, params_dir: str, max_group_bytes: int = DEFAULT_GROUP_BYTES):
        os.makedirs(params_dir, exist_ok=True)
        self.dir = params_dir
        self.max = int(max_group_bytes)
        self.ckptr = _checkpointer()
        self.groups: list = []
        self.params: dict = {}  # path -> {"shape", "dtype", "layers"}
        self._pending: dict = {}
        self._units: list = []
        self._bytes = 0

    def add(self, path: tuple, layer: Optional[int], array: np.ndarray, full_shape=None, layers=None):
        # contiguous here: handed a transposed view, orbax / tensorstore make their own copies, and the process's
        # resident size was seen to creep up group after group
        a = np.ascontiguousarray(array)
        if self._pending and self._bytes + a.nbytes > self.max:
            self.flush()
        self._pending[f"u{len(self._units)}"] = a
        self._units.append([list(path), layer])
        self._bytes += a.nbytes
        entry = self.params.setdefault(tuple(path), {
            "path": list(path), "shape": list(full_shape if full_shape is not None else a.shape),
            "dtype": a.dtype.name, "layers": layers})
        if entry["dtype"] != a.dtype.name:
            raise ConversionError(f"layers of {'/'.join(path)} have different dtypes")

    def flush(self):
        if not self._pending:
            return
        name = f"{len(self.groups):05d}"
        # orbax copies the arrays, then writes in the background while the next group is read and converted; its
        # next save waits for this one, so at most two groups are in memory
        self.ckptr.save(os.path.join(self.dir, name), self._pending)
        self.groups.append({"dir": name, "units": self._units})
        self._pending, self._units, self._bytes = {}, [], 0
        release_free_memory()

    def close(self) -> dict:
        self.flush()
        self.ckptr.wait_until_finished()
        index = {"format": INDEX_FORMAT, "params": list(self.params.values()), "groups": self.groups}
        with open(os.path.join(self.dir, INDEX_NAME), "w") as f:
            json.dump(index, f)
        return index


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere). glibc serves allocations
    under its dynamic mmap threshold (up to 32 MiB) from per-thread arenas and keeps what is freed there, so without
    this the resident size of a long conversion creeps up group after group although nothing is kept."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


# ------------------------------------------------------------------------------------------------ reading


def read_index(params_dir: str) -> dict:
    path = os.path.join(params_dir, INDEX_NAME)
    try:
        with open(path) as f:
            index = json.load(f)
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
        for p in index["params"]:
            p["path"], p["shape"] = tuple(p["path"]), tuple(p["shape"])
        for g in index["groups"]:
            g["units"] = [(tuple(p), layer) for p, layer in g["units"]]
    except FileNotFoundError:
        raise ConversionError(f"{params_dir}: cannot restore params: {INDEX_NAME} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{path}: damaged params index ({type(e).__name__}: {e})") from None
    return index


def stored_shapes_v2(index: dict) -> dict:
    """path -> (shape, dtype) of every stored param (nothing read but the index)."""
    return {p["path"]: (p["shape"], np.dtype(_np_dtype(p["dtype"]))) for p in index["params"]}


def stored_shapes_v1(params_dir: str) -> dict:
    """path -> (shape, dtype) from a VERSION 1 checkpoint's orbax metadata."""
    import jax
    import orbax.checkpoint as ocp

    try:
        meta = ocp.StandardCheckpointer().metadata(params_dir)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
        return {tuple(str(getattr(k, "key", k)) for k in p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in leaves}
    except Exception as e:  # orbax raises several types for damaged folders
        raise ConversionError(f"{params_dir}: cannot restore params: {e}") from e


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _zeros(shape: tuple, dtype, sharding):
    """A zero array made in ``sharding`` on the devices (a host-made one would pass whole blocks through host
    memory)."""
    import jax.numpy as jnp

    return jnp.zeros(shape, dtype, device=sharding)


@functools.lru_cache(maxsize=None)
def _set_layer_fn(sharding):
    import jax

    def set_layer(buf, x, i):
        return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)

    return jax.jit(set_layer, donate_argnums=0, out_shardings=sharding)


def _slab_sharding(sharding):
    """The sharding of one layer of a stacked param sharded as ``sharding`` (the leading axis dropped)."""
    from jax.sharding import NamedSharding, PartitionSpec

    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    return sharding


def restore_v2(params_dir: str, index: dict, targets: dict) -> dict:
    """path -> jax.Array for every stored param (``targets``: path -> ShapeDtypeStruct with dtype and sharding, one
    per param of the index), read group by group; stacked params are filled one layer at a time."""
    import jax
    import orbax.checkpoint as ocp

    out: dict = {}
    filled: dict = {}
    ckptr = ocp.StandardCheckpointer()  # every process restores (its own shards), as for VERSION 1
    layers_of = {p["path"]: p["layers"] for p in index["params"]}
    for g in index["groups"]:
        units = list(enumerate(g["units"]))
        want = {}
        for i, (path, layer) in units:
            t = targets[path]
            if layer is None:
                want[f"u{i}"] = t
            else:
                want[f"u{i}"] = jax.ShapeDtypeStruct(t.shape[1:], t.dtype, sharding=_slab_sharding(t.sharding))
        gdir = os.path.join(params_dir, g["dir"])
        try:
            got = ckptr.restore(gdir, want)
        except Exception as e:  # orbax raises several types for damaged folders
            raise ConversionError(f"{params_dir}: cannot restore params (group {g['dir']}): {e}") from e
        for i, (path, layer) in units:
            x = got.pop(f"u{i}")
            if layer is None:
                out[path] = x
                continue
            t = targets[path]
            if path not in out:
                out[path] = _zeros(tuple(t.shape), np.dtype(t.dtype), t.sharding)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
                out[path] = _set_layer_fn(t.sharding)(out[path], x, layer)
            filled.setdefault(path, set()).add(layer)
            del x
    missing = sorted("/".join(p) for p in targets if p not in out)
    partial = sorted("/".join(p) for p, got in filled.items() if len(got) != layers_of.get(p))
    if missing or partial:
        raise ConversionError(f"{params_dir}: cannot restore params: {INDEX_NAME} lists no data for "
                              f"{(missing + partial)[:5]}")
    return out


def restore_v1(params_dir: str, targets: dict, stored: Iterable) -> dict:
    """path -> jax.Array from a VERSION 1 checkpoint (one orbax tree) restored into ``targets``."""
    import jax
    import orbax.checkpoint as ocp

    from unitok_jax.convert.plan import nest

    missing = sorted("/".join(p) for p in targets if p not in set(stored))
    if missing:
        raise ConversionError(f"{params_dir}: cannot restore params: no {missing[:5]}")
    try:
        tree = ocp.StandardCheckpointer().restore(params_dir, nest(dict(targets)))
    except Exception as e:  # orbax raises several types for damaged folders
        raise ConversionError(f"{params_dir}: cannot restore params: {e}") from e
    return {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
