"""Atomic writes (a file or a folder appears whole under its name or not at all), and a thread-safe ``.npy`` read.

Everything is first written under a temporary name beside the target (same folder, so the final ``os.replace`` is a
rename on one file system) and renamed into place when the writing finished without an exception; on an exception
the temporary is deleted and whatever stood at the target is left untouched. A killed process can leave a
temporary behind, never a half-written target: temporary files are named ``.<name>.<32 hex digits>.tmp`` and
temporary folders ``.<name>.partial-*`` / ``.<name>.old-*``, so a tool that resumes can recognise and remove them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from typing import Any, Iterable, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "w", *, encoding: str = "utf-8", fsync: bool = False) -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing (``mode`` ``"w"`` text or ``"wb"`` binary; the parent folder
    is created) and yield the file; when the block ends normally it replaces ``path``. ``fsync``: flush the data to
    the disk before the rename (survives a power loss, not only a killed process)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    name = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(name)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(name)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as f:
        f.write(text)


def write_json(path: PathLike, obj: Any, *, indent: int = 1, **kwargs) -> None:
    """Write ``obj`` as JSON (``indent``, then a newline; ``kwargs`` go to ``json.dump``) to ``path`` atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent, **kwargs)
        f.write("\n")


def write_jsonl(path: PathLike, rows: Iterable[dict]) -> None:
    """Write one JSON object a line (non-ASCII kept as is) to ``path`` atomically."""
    with atomic_file(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(out: PathLike) -> Iterator[str]:
    """Yield a fresh temporary sibling folder of ``out`` to fill; when the block ends normally it becomes ``out``
    (mode 0755; a folder already at ``out`` is replaced, and removed only after the new one is in place), on an
    exception it is deleted and ``out`` is left untouched."""
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if os.path.isdir(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "x"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# np.load parses the .npy header with ast.literal_eval, and CPython 3.11 before 3.11.8 corrupts its AST recursion
# counter when two threads compile at once ("SystemError: AST constructor recursion depth mismatch"): grain's
# worker threads read teacher and latent files concurrently, so the reads are serialised here. With ``mmap_mode``
# the lock covers the header only (the data is mapped, not read).
_NPY_LOCK = threading.Lock()


def load_npy(path: PathLike, mmap_mode=None):
    """``np.load(path, mmap_mode=mmap_mode, allow_pickle=False)``, safe to call from several threads."""
    import numpy as np

    with _NPY_LOCK:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
