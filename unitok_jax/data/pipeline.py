"""grain input pipelines for the two training stages.

* :func:`vae_batches`: random fixed-length crops of utterances (VAE stage), ``{"wave" [B, crop], "lengths" [B],
  "ok" [B]}``.
* :func:`bucketed_batches`: whole utterances grouped by duration into a few padded lengths (LM stage),
  ``{"wave" [B, Lb], "lengths" [B], "text" [B], "speaker" [B], "id" [B], "ok" [B]}``.

Both are deterministic functions of (records, seed) and shard per host (``shard_index`` / ``shard_count``, by
default ``jax.process_index()`` / ``jax.process_count()``). Their iterators are grain ``DatasetIterator`` objects:
``it.get_state()`` / ``it.set_state(state)`` save and restore the position exactly (checkpointable). A record whose
audio cannot be read becomes an all-zero, zero-length item with ``ok = False`` rather than an exception, so batch
shapes never change and training counts and skips it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import grain
import numpy as np

from unitok_jax.audio import SAMPLE_RATE, AudioError, load_audio


def _shard(shard_index: Optional[int], shard_count: Optional[int]) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    return shard_index, shard_count


def _load(record: dict, sample_rate: int) -> Optional[np.ndarray]:
    try:
        return load_audio(record["audio"], sample_rate)
    except AudioError:
        return None


@dataclasses.dataclass(frozen=True)
class _Crop:
    crop: int
    sample_rate: int

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        wave = _load(record, self.sample_rate)
        out = np.zeros((self.crop,), np.float32)
        if wave is None:
            return {"wave": out, "lengths": np.int32(0), "ok": False}
        start = int(rng.integers(0, max(len(wave) - self.crop, 0) + 1))
        piece = wave[start : start + self.crop]
        out[: len(piece)] = piece
        return {"wave": out, "lengths": np.int32(len(piece)), "ok": True}


def vae_batches(records: Sequence[dict], *, batch_size: int, crop_seconds: float, seed: int,
                sample_rate: int = SAMPLE_RATE, shard_index: Optional[int] = None,
                shard_count: Optional[int] = None, num_epochs: Optional[int] = None):
    """Shuffled random crops (a new crop every epoch), batched; repeats forever unless ``num_epochs``."""
    index, count = _shard(shard_index, shard_count)
    if not records:
        raise ValueError("no records to train on")
    crop = _Crop(int(round(crop_seconds * sample_rate)), sample_rate)
    ds = grain.MapDataset.source(list(records))[index::count]
    ds = ds.shuffle(seed=seed).repeat(num_epochs).random_map(crop.random_map, seed=seed)
    return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)


def plan_buckets(durations: Sequence[float], *, batch_size: int, seed: int, epoch: int,
                 window: int = 64) -> list[list[int]]:
    """One epoch of batches of record indices: shuffle, sort by duration inside windows of ``window`` batches (so
    a batch holds similar lengths), cut into batches, shuffle the batches. Deterministic in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(durations))
    span = window * batch_size
    batches = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s : s + span], key=lambda i: durations[i])
        batches += [list(map(int, chunk[b : b + batch_size])) for b in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]  # fixed batch shape
    rng.shuffle(batches)
    return batches


class _EpochPlans:
    """A grain random-access source: batch ``i`` of ``num_epochs`` epochs, each planned by :func:`plan_buckets`
    on demand (only the current epoch's plan is kept)."""

    def __init__(self, durations, batch_size, seed, window, num_epochs):
        self.durations, self.batch_size, self.seed, self.window = list(durations), batch_size, seed, window
        self.per_epoch = len(plan_buckets(self.durations, batch_size=batch_size, seed=seed, epoch=0, window=window))
        if self.per_epoch == 0:
            raise ValueError(f"fewer records ({len(self.durations)}) than one batch ({batch_size})")
        self.num_epochs = num_epochs
        self._cache: dict[int, list] = {}

    def __len__(self) -> int:
        return self.per_epoch * self.num_epochs

    def __getitem__(self, i: int) -> list[int]:
        epoch, j = divmod(int(i), self.per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: plan_buckets(self.durations, batch_size=self.batch_size, seed=self.seed,
                                               epoch=epoch, window=self.window)}
        return self._cache[epoch][j]


def bucket_length(seconds: float, buckets_seconds: Sequence[float]) -> float:
    for b in buckets_seconds:
        if seconds <= b:
            return b
    return buckets_seconds[-1]


def bucketed_batches(records: Sequence[dict], *, batch_size: int, seed: int,
                     buckets_seconds: Sequence[float] = (2.0, 4.0, 8.0, 16.0, 32.0), max_seconds: float = 32.0,
                     sample_rate: int = SAMPLE_RATE, shard_index: Optional[int] = None,
                     shard_count: Optional[int] = None, num_epochs: int = 1000, window: int = 64):
    """Whole-utterance batches padded to a bucket length (LM stage). Records need ``duration`` (see
    ``read_manifest(add_durations=True)``); longer than ``max_seconds`` are cut there."""
    index, count = _shard(shard_index, shard_count)
    recs = list(records)
    durations = [min(float(r["duration"]), max_seconds) for r in recs]
    plans = grain.MapDataset.source(_EpochPlans(durations, batch_size, seed, window, num_epochs))[index::count]

    def load_batch(idx: list[int]) -> dict:
        length = int(bucket_length(max(durations[i] for i in idx), buckets_seconds) * sample_rate)
        wave = np.zeros((len(idx), length), np.float32)
        lengths = np.zeros((len(idx),), np.int32)
        ok = np.zeros((len(idx),), bool)
        for k, i in enumerate(idx):
            w = _load(recs[i], sample_rate)
            if w is not None:
                w = w[:length]
                wave[k, : len(w)] = w
                lengths[k], ok[k] = len(w), True
        return {"wave": wave, "lengths": lengths, "ok": ok,
                "text": np.array([recs[i].get("text", "") for i in idx], dtype=object),
                "speaker": np.array([recs[i]["speaker"] for i in idx], dtype=object),
                "id": np.array([recs[i]["id"] for i in idx], dtype=object)}

    return plans.map(load_batch).to_iter_dataset()
