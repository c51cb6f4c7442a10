"""grain input pipelines for the two training stages.

* :func:`vae_batches`: random fixed-length crops of utterances (VAE stage), ``{"wave" [B, crop], "lengths" [B],
  "ok" [B]}``; with ``teacher_key`` (stage S1) the crops start on a frame boundary and carry the matching rows of
  the record's teacher features: ``"teacher" [B, crop / hop, dim]``, ``"teacher_frames" [B]``.
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
from typing import Callable, Optional, Sequence

import grain
import numpy as np

from unitok_jax.audio import SAMPLE_RATE, AudioError, load_audio
from unitok_jax.io import load_npy
from unitok_jax.shapes import bucket


def shard_range(shard_index: Optional[int], shard_count: Optional[int]) -> tuple[int, int]:
    """(index, count) of this reader's shard: the given pair, checked, or this JAX process's when either is None."""
    if shard_index is None or shard_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    return shard_index, shard_count


def load_record_audio(record: dict, sample_rate: int) -> Optional[np.ndarray]:
    """A manifest record's waveform at ``sample_rate``, or None when the file cannot be read (the pipelines count
    and skip such records)."""
    try:
        return load_audio(record["audio"], sample_rate)
    except AudioError:
        return None


class TeacherError(ValueError):
    """A record's teacher-feature file is missing, unreadable or of the wrong shape."""


def load_teacher(path: str, dim: int) -> np.ndarray:
    """Teacher features of one record (stage S1): a ``.npy`` array [T, dim] of 50 Hz frames, row ``i`` describing
    samples ``[hop * i, hop * (i + 1))`` (Whisper's encoder output has this rate). Memory-mapped; finite floats
    only. Raises :class:`TeacherError` naming the file and the problem."""
    try:
        feats = load_npy(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise TeacherError(f"teacher features {path}: {e}") from None
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise TeacherError(f"teacher features {path}: shape {feats.shape}, expected [frames, {dim}]")
    if not np.issubdtype(feats.dtype, np.floating):
        raise TeacherError(f"teacher features {path}: dtype {feats.dtype}, expected floating point")
    return feats


def teacher_rows(feats: np.ndarray, start_frame: int, frames: int) -> Optional[tuple[np.ndarray, int]]:
    """Rows ``start_frame .. start_frame + frames`` of teacher features, zero-padded to ``frames`` rows, with the
    number of real rows; None if any of them is not finite."""
    rows = np.asarray(feats[start_frame : start_frame + frames], np.float32)
    if not np.all(np.isfinite(rows)):
        return None
    return np.pad(rows, ((0, frames - len(rows)), (0, 0))), len(rows)


@dataclasses.dataclass(frozen=True)
class _Crop:
    crop: int
    sample_rate: int
    teacher_key: Optional[str] = None
    teacher_dim: int = 0
    hop: int = 320

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        wave = load_record_audio(record, self.sample_rate)
        out = np.zeros((self.crop,), np.float32)
        if self.teacher_key is not None:
            return self._with_teacher(record, wave, out, rng)
        if wave is None:
            return {"wave": out, "lengths": np.int32(0), "ok": False}
        start = int(rng.integers(0, max(len(wave) - self.crop, 0) + 1))
        piece = wave[start : start + self.crop]
        out[: len(piece)] = piece
        return {"wave": out, "lengths": np.int32(len(piece)), "ok": True}

    def _with_teacher(self, record, wave, out, rng) -> dict:
        frames = self.crop // self.hop
        bad = {"wave": out, "lengths": np.int32(0), "teacher": np.zeros((frames, self.teacher_dim), np.float32),
               "teacher_frames": np.int32(0), "ok": False}
        if wave is None or not isinstance(record.get(self.teacher_key), str):
            return bad
        try:
            feats = load_teacher(record[self.teacher_key], self.teacher_dim)
        except TeacherError:
            return bad
        # a frame-aligned start, so teacher row k of the crop is latent frame k of the crop
        start_frame = int(rng.integers(0, max(len(wave) // self.hop - frames, 0) + 1))
        rows = teacher_rows(feats, start_frame, frames)
        if rows is None:
            return bad
        piece = wave[start_frame * self.hop : start_frame * self.hop + self.crop]
        out[: len(piece)] = piece
        return {"wave": out, "lengths": np.int32(len(piece)), "teacher": rows[0],
                "teacher_frames": np.int32(rows[1]), "ok": True}


def vae_batches(records: Sequence[dict], *, batch_size: int, crop_seconds: float, seed: int,
                sample_rate: int = SAMPLE_RATE, shard_index: Optional[int] = None,
                shard_count: Optional[int] = None, num_epochs: Optional[int] = None,
                teacher_key: Optional[str] = None, teacher_dim: int = 0, hop: int = 320):
    """Shuffled random crops (a new crop every epoch), batched; repeats forever unless ``num_epochs``.

    ``teacher_key``: the manifest field naming each record's teacher features (:func:`load_teacher`, ``teacher_dim``
    channels); the crop is then rounded to whole frames of ``hop`` samples and starts on a frame boundary. A record
    whose features are missing or malformed is a bad item (``ok = False``) like unreadable audio."""
    index, count = shard_range(shard_index, shard_count)
    if not records:
        raise ValueError("no records to train on")
    n = int(round(crop_seconds * sample_rate))
    if teacher_key is not None:
        if teacher_dim < 1:
            raise ValueError("teacher_key needs teacher_dim (the teacher's feature channels)")
        n = max(hop, n // hop * hop)
    crop = _Crop(n, sample_rate, teacher_key, teacher_dim, hop)
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


def plan_packed(sizes: Sequence[int], *, rows: int, seq_len: int, seed: int, epoch: int,
                patches: Optional[Sequence[int]] = None, max_patches: int = 0) -> list[list[tuple]]:
    """One epoch of packed batches: shuffle, then place each record (its size: the most tokens its sequence can
    take; with ``patches``, also the most audio patches, up to ``max_patches`` a row) in the first of the current
    batch's ``rows`` rows of ``seq_len`` tokens with room, opening the next batch when none has room. A batch is a
    list of ``(record index, row)``. Records larger than a row are left out. Deterministic in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    cap = np.array([seq_len, max_patches if patches is not None else 0], np.int64)
    need = np.stack([np.asarray(sizes, np.int64),
                     np.asarray(patches if patches is not None else np.zeros(len(sizes)), np.int64)], axis=1)
    batches, current, free = [], [], np.tile(cap, (rows, 1))
    for i in rng.permutation(len(sizes)):
        if np.any(need[i] > cap):
            continue
        room = np.flatnonzero(np.all(free >= need[i], axis=1))
        if not len(room):
            batches.append(current)
            current, free = [], np.tile(cap, (rows, 1))
            room = [0]
        free[room[0]] -= need[i]
        current.append((int(i), int(room[0])))
    if current:
        batches.append(current)
    return batches


class EpochPlans:
    """A grain random-access source: batch ``i`` of ``num_epochs`` epochs, each planned by ``plan_epoch(epoch)``
    (a list of batches) on demand; only the current epoch's plan is kept. Every epoch counts as many batches as
    epoch 0: a shorter one starts over from its first batch, a longer one is cut."""

    def __init__(self, plan_epoch: Callable[[int], list], num_epochs: int, what: str = "one batch"):
        self.plan_epoch = plan_epoch
        self._cache: dict[int, list] = {0: plan_epoch(0)}
        self.per_epoch = len(self._cache[0])
        if self.per_epoch == 0:
            raise ValueError(f"the records do not fill {what}")
        self.num_epochs = num_epochs

    def __len__(self) -> int:
        return self.per_epoch * self.num_epochs

    def __getitem__(self, i: int) -> list:
        epoch, j = divmod(int(i), self.per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: self.plan_epoch(epoch)}
        plan = self._cache[epoch]
        return plan[j % len(plan)]


def bucket_plans(durations: Sequence[float], batch_size: int, seed: int, window: int, num_epochs: int) -> EpochPlans:
    """:class:`EpochPlans` of :func:`plan_buckets`."""
    return EpochPlans(lambda e: plan_buckets(durations, batch_size=batch_size, seed=seed, epoch=e, window=window),
                      num_epochs, f"one batch of {batch_size} ({len(durations)} records)")


def bucketed_batches(records: Sequence[dict], *, batch_size: int, seed: int,
                     buckets_seconds: Sequence[float] = (2.0, 4.0, 8.0, 16.0, 32.0), max_seconds: float = 32.0,
                     sample_rate: int = SAMPLE_RATE, shard_index: Optional[int] = None,
                     shard_count: Optional[int] = None, num_epochs: int = 1000, window: int = 64):
    """Whole-utterance batches padded to a bucket length (LM stage). Records need ``duration`` (see
    ``read_manifest(add_durations=True)``); longer than ``max_seconds`` are cut there."""
    index, count = shard_range(shard_index, shard_count)
    recs = list(records)
    durations = [min(float(r["duration"]), max_seconds) for r in recs]
    plans = grain.MapDataset.source(bucket_plans(durations, batch_size, seed, window, num_epochs))[index::count]

    def load_batch(idx: list[int]) -> dict:
        length = int(bucket(max(durations[i] for i in idx), buckets_seconds, clamp=True) * sample_rate)
        wave = np.zeros((len(idx), length), np.float32)
        lengths = np.zeros((len(idx),), np.int32)
        ok = np.zeros((len(idx),), bool)
        for k, i in enumerate(idx):
            w = load_record_audio(recs[i], sample_rate)
            if w is not None:
                w = w[:length]
                wave[k, : len(w)] = w
                lengths[k], ok[k] = len(w), True
        return {"wave": wave, "lengths": lengths, "ok": ok,
                "text": np.array([recs[i].get("text", "") for i in idx], dtype=object),
                "speaker": np.array([recs[i]["speaker"] for i in idx], dtype=object),
                "id": np.array([recs[i]["id"] for i in idx], dtype=object)}

    return plans.map(load_batch).to_iter_dataset()
