"""Static shapes: the length-bucket rule and right-padding, one home for generation, sampling, the latent cache and
training (a jitted program is compiled per shape, so every batch is padded up to one of a few sizes)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

DEFAULT_BUCKETS: tuple = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BATCH_BUCKETS: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(n, sizes: Optional[Sequence] = DEFAULT_BUCKETS, *, clamp: bool = False):
    """The smallest size in ``sizes`` (ascending) that holds ``n``; beyond the last: the last doubled until it holds
    ``n`` (``clamp``: the last itself, for callers that cut longer inputs). ``sizes=None``: ``n`` itself (at least
    1). Works for frame counts and for seconds alike."""
    if sizes is None:
        return max(int(n), 1)
    for s in sizes:
        if s >= n:
            return s
    s = sizes[-1]
    if clamp:
        return s
    while s < n:
        s *= 2
    return s


def pad_axis(x, size: int, axis: int, value=0) -> np.ndarray:
    """Right-pad a numpy/jax array along ``axis`` to ``size``."""
    x = np.asarray(x)
    if x.shape[axis] > size:
        raise ValueError(f"axis {axis} has {x.shape[axis]} > bucket {size}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths, constant_values=value)


def pad_sequences(seqs: Sequence, value=0, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """A list of arrays [T_i, ...] -> (right-padded [B, max T_i, ...], lengths [B])."""
    seqs = [np.asarray(s, dtype) for s in seqs]
    lengths = np.array([len(s) for s in seqs], np.int32)
    t = int(max(lengths.max(), 1))
    return np.stack([pad_axis(s, t, 0, value) for s in seqs]), lengths


def pad_waves(waves: Sequence, hop: int, sizes: Optional[Sequence] = DEFAULT_BUCKETS,
              rows: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Waveforms -> (float32 batch [rows or B, F * hop], lengths [rows or B]) for the VAE encoder: the longest
    input's frame count (``ceil(samples / hop)``) padded up to its bucket F, and (``rows``) padding rows of length 0
    up to a fixed batch size, so that a job of many batches compiles a few programs."""
    batch, lengths = pad_sequences(waves, dtype=np.float32)
    frames = bucket(-(-batch.shape[1] // hop), sizes)
    batch = pad_axis(batch, frames * hop, 1)
    if rows is not None:
        batch, lengths = pad_axis(batch, rows, 0), pad_axis(lengths, rows, 0)
    return batch, lengths
