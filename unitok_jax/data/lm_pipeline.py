"""grain input pipeline of the LM stage: whole utterances, length-bucketed, as this process's rows of each global
batch.

Every process plans the *same* global batches (:func:`unitok_jax.data.pipeline.plan_buckets` over the durations,
deterministic in the seed and epoch) and loads only its own contiguous rows of each, so

* the bucket length of a batch (from the durations of all its rows) is the same on every process: the per-process
  pieces assemble into one global array without any communication;
* the data order does not depend on the number of processes: a run on 2 hosts sees exactly the batches of a run
  on 1 host.

Two sources:

* ``"audio"``: ``{"wave" [b, L], "lengths" [b] samples}`` (the frozen VAE encodes them in the training loop);
* ``"latents"``: ``{"mean", "std" [b, T, C], "lengths" [b] frames}`` from the latent cache
  (:mod:`unitok_jax.data.latent_cache`; records carry a ``latents`` file).

Edit pairs (records with ``target_audio`` and ``instruction``, see :mod:`unitok_jax.data.build_edit_corpus`) add
the target speech -- audio source: ``"target_wave"``, ``"target_lengths"``; latent source (the cache's
``target_latents``): ``"target_mean"``, ``"target_std"``, ``"target_lengths"`` -- and the ``instruction`` /
``target_markup`` / ``edit_type`` of each row; the bucket holds the longer of source and target.

Both add ``"ok" [b]`` (false for an unreadable record: zeros, length 0, counted and skipped by the trainer),
``"text"``, ``"speaker"``, ``"id"`` (object arrays) and ``"row"`` [b] (the global row index). The iterator is a grain
``DatasetIterator``: ``get_state`` / ``set_state`` give an exact, checkpointable position.

With ``row_sizes`` (one int per record, e.g. the tokens of its sequence besides the audio patches) every batch also
carries ``"plan_size"``: the maximum of ``row_sizes`` over *all* rows of the global batch, known to every process
from the plan alone, so that batch shapes need no agreement between processes at run time.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import grain
import numpy as np

from unitok_jax.audio import SAMPLE_RATE
from unitok_jax.data.pipeline import EpochPlans, bucket_plans, load_record_audio, plan_packed, shard_range
from unitok_jax.io import load_npy
from unitok_jax.shapes import bucket


def load_latents(path: str) -> Optional[np.ndarray]:
    """A cache file -> posterior ``[T, 2, C]`` float32 (mean, std), or None if unreadable."""
    try:
        arr = load_npy(path)
    except (OSError, ValueError):
        return None
    if arr.ndim != 3 or arr.shape[1] != 2 or not np.all(np.isfinite(arr)):
        return None
    return arr.astype(np.float32)


def lm_batches(records: Sequence[dict], *, batch_size: int, seed: int, source: str = "audio",
               hop: int = 320, buckets_seconds: Sequence[float] = (2.0, 4.0, 8.0, 16.0, 32.0),
               max_seconds: float = 32.0, sample_rate: int = SAMPLE_RATE, process_index: Optional[int] = None,
               process_count: Optional[int] = None, num_epochs: int = 1000, window: int = 64,
               row_sizes: Optional[Sequence[int]] = None, pack_len: int = 0, pack_patches: int = 0,
               patch_size: int = 5, note: Optional[Callable[[str], None]] = None):
    """This process's ``batch_size / process_count`` rows of each global batch of ``batch_size`` (see the module
    docstring). ``hop``: waveform samples per latent frame (latent source: the bucket length in frames). Records need
    ``duration`` (``read_manifest(add_durations=True)``; the latent cache writes it).

    ``pack_len`` > 0 (latent source, with ``row_sizes``): packed batches of ``batch_size`` rows of ``pack_len``
    tokens and ``pack_patches`` audio patches (:func:`unitok_jax.data.pipeline.plan_packed`; a record's size is its
    ``row_sizes`` entry plus its patches of ``patch_size`` frames, an edit's source and target both). Each batch
    holds a varying number of records: this process's are those planned in its rows, each whole (up to
    ``max_seconds``), with ``"pack_row"`` [k] (its row among this process's rows) and ``"row"`` [k] (its place in the
    global batch's plan, for seeding). ``note``: told how many records fit no row (they are left out)."""
    if source not in ("audio", "latents"):
        raise ValueError(f"source={source!r}: choose 'audio' or 'latents'")
    index, count = shard_range(process_index, process_count)
    if batch_size % count:
        raise ValueError(f"global batch {batch_size} is not divisible by {count} processes")
    local = batch_size // count
    recs = list(records)
    if not recs:
        raise ValueError("no records to train on")
    if source == "latents":
        missing = [r["id"] for r in recs if "latents" not in r]
        if missing:
            raise ValueError(f"{len(missing)} records have no 'latents' file (first: {missing[0]!r}); "
                             f"build the cache with python -m unitok_jax.data.latent_cache")
    durations = [min(float(r["duration"]), max_seconds) for r in recs]

    edit = any("target_audio" in r for r in recs)
    if edit:
        missing = [r["id"] for r in recs if "target_audio" not in r or "instruction" not in r]
        if missing:
            raise ValueError(f"{len(missing)} edit records lack target_audio / instruction (first: {missing[0]!r})")
        if source == "latents":
            missing = [r["id"] for r in recs if "target_latents" not in r]
            if missing:
                raise ValueError(f"{len(missing)} edit records have no 'target_latents' file (first: "
                                 f"{missing[0]!r}); cache the edit manifest with "
                                 f"python -m unitok_jax.data.latent_cache")
        durations = [min(max(float(r["duration"]), float(r.get("target_duration", r["duration"]))), max_seconds)
                     for r in recs]

    if row_sizes is not None and len(row_sizes) != len(recs):
        raise ValueError(f"row_sizes has {len(row_sizes)} entries for {len(recs)} records")
    max_frames = int(math.ceil(max_seconds * sample_rate / hop))

    def packed_frames(r: dict, pre: str) -> int:
        """The latent frames a packed batch takes of a record (``pre`` "target_": an edit's target): the cache's
        ``frames`` (else ceil(duration * rate / hop)), up to ``max_seconds``."""
        n = r.get(pre + "frames")
        if n is None:
            n = math.ceil(round(float(r.get(pre + "duration", r["duration"])) * sample_rate / hop, 6))
        return min(int(n), max_frames)

    if pack_len:
        if source != "latents" or row_sizes is None:
            raise ValueError("packed batches (pack_len > 0) read the latent cache (source='latents') and need "
                             "row_sizes")
        if pack_patches <= 0:
            raise ValueError("packed batches need pack_patches > 0 (the audio patches a row holds)")
        patches = [packed_frames(r, "") // patch_size + (packed_frames(r, "target_") // patch_size if edit else 0)
                   for r in recs]
        sizes = [int(row_sizes[i]) + patches[i] for i in range(len(recs))]
        fit = sum(s <= pack_len and n <= pack_patches for s, n in zip(sizes, patches))
        if note is not None and 0 < fit < len(recs):
            note(f"warning: {len(recs) - fit} of {len(recs)} records do not fit a packed row of {pack_len} tokens / "
                 f"{pack_patches} patches and are left out")
        plans = grain.MapDataset.source(EpochPlans(
            lambda e: plan_packed(sizes, rows=batch_size, seq_len=pack_len, seed=seed, epoch=e, patches=patches,
                                  max_patches=pack_patches), num_epochs,
            f"one packed batch ({fit} of {len(recs)} records fit {pack_len} tokens / {pack_patches} patches)"))
    else:
        plans = grain.MapDataset.source(bucket_plans(durations, batch_size, seed, window, num_epochs))

    def meta(rows: list[int], idx: list[int], plan: list[int]) -> dict:
        extra = {}
        if row_sizes is not None and plan:
            extra["plan_size"] = np.int64(max(int(row_sizes[i]) for i in plan))
        if edit:
            extra.update({k: np.array([recs[i].get(k) for i in idx], dtype=object)
                          for k in ("instruction", "target_markup", "edit_type")})
        return {**extra, "text": np.array([recs[i].get("text", "") for i in idx], dtype=object),
                "speaker": np.array([recs[i]["speaker"] for i in idx], dtype=object),
                "id": np.array([recs[i]["id"] for i in idx], dtype=object),
                "row": np.asarray(rows, np.int32)}

    def load_audio_batch(plan: list[int]) -> dict:
        rows = list(range(index * local, (index + 1) * local))
        idx = [plan[r] for r in rows]
        length = int(bucket(max(durations[i] for i in plan), buckets_seconds, clamp=True) * sample_rate)
        wave = np.zeros((local, length), np.float32)
        lengths = np.zeros((local,), np.int32)
        ok = np.zeros((local,), bool)
        for k, i in enumerate(idx):
            w = load_record_audio(recs[i], sample_rate)
            if w is not None and len(w):
                w = w[:length]
                wave[k, : len(w)] = w
                lengths[k], ok[k] = len(w), True
        out = {"wave": wave, "lengths": lengths, "ok": ok, **meta(rows, idx, plan)}
        if edit:  # the target speech of each pair, same bucket length
            tw = np.zeros_like(wave)
            tl = np.zeros_like(lengths)
            for k, i in enumerate(idx):
                w = load_record_audio({"audio": recs[i]["target_audio"]}, sample_rate)
                if w is not None and len(w):
                    w = w[:length]
                    tw[k, : len(w)] = w
                    tl[k] = len(w)
                else:
                    ok[k] = False
            out.update(target_wave=tw, target_lengths=tl)
        return out

    c = None

    def latents_into(paths: list, frames: int, rows: int = local):
        """(mean, std [rows, frames, C], lengths [rows], readable [rows]) of the cache files."""
        nonlocal c
        loaded = [load_latents(p) for p in paths]
        if c is None:
            c = next((x.shape[2] for x in loaded if x is not None), None)
        ch = c or 1
        mean = np.zeros((rows, frames, ch), np.float32)
        std = np.zeros((rows, frames, ch), np.float32)
        lengths = np.zeros((rows,), np.int32)
        ok = np.zeros((rows,), bool)
        for k, x in enumerate(loaded):
            if x is not None and x.shape[2] == ch and len(x):
                x = x[:frames]
                mean[k, : len(x)], std[k, : len(x)] = x[:, 0], x[:, 1]
                lengths[k], ok[k] = len(x), True
        return mean, std, lengths, ok

    def load_latent_batch(plan: list[int]) -> dict:
        rows = list(range(index * local, (index + 1) * local))
        idx = [plan[r] for r in rows]
        seconds = bucket(max(durations[i] for i in plan), buckets_seconds, clamp=True)
        frames = int(math.ceil(seconds * sample_rate / hop))
        mean, std, lengths, ok = latents_into([recs[i]["latents"] for i in idx], frames)
        out = {"mean": mean, "std": std, "lengths": lengths, "ok": ok, **meta(rows, idx, plan)}
        if edit:
            tm, ts, tl, t_ok = latents_into([recs[i]["target_latents"] for i in idx], frames)
            out.update(target_mean=tm, target_std=ts, target_lengths=tl, ok=ok & t_ok)
        return out

    def packed_latents(idx: list, pre: str):
        """latents_into for packed records: each cut to the frames its plan counted."""
        planned = np.asarray([packed_frames(recs[i], pre) for i in idx], np.int32)
        mean, std, lengths, ok = latents_into([recs[i][pre + "latents"] for i in idx],
                                              max([1] + planned.tolist()), len(idx))
        return mean, std, np.minimum(lengths, planned), ok

    def load_packed_batch(plan: list) -> dict:
        mine = [(g, i, r - index * local) for g, (i, r) in enumerate(plan) if index * local <= r < (index + 1) * local]
        idx = [i for _, i, _ in mine]
        mean, std, lengths, ok = packed_latents(idx, "")
        out = {"mean": mean, "std": std, "lengths": lengths, "ok": ok, **meta([g for g, _, _ in mine], idx, [])}
        out["pack_row"] = np.asarray([r for _, _, r in mine], np.int32)
        if edit:
            tm, ts, tl, t_ok = packed_latents(idx, "target_")
            out.update(target_mean=tm, target_std=ts, target_lengths=tl, ok=ok & t_ok)
        return out

    if pack_len:
        return plans.map(load_packed_batch).to_iter_dataset()
    return plans.map(load_audio_batch if source == "audio" else load_latent_batch).to_iter_dataset()
