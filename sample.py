#!/usr/bin/env python
"""Batch sampling from a unitok_jax checkpoint.

  python sample.py reconstruct --checkpoint DIR IN.wav [IN2.flac ...] --out OUTDIR

``reconstruct`` encodes each file with the AudioVAE and decodes it back (batched, length-bucketed so a run compiles
a handful of programs), writing ``OUTDIR/<name>.wav``. A bad input is reported and skipped; the others are still
written. Exit status: 0 if every file was written, 1 if some failed, 2 for a usage or checkpoint error.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np


@dataclasses.dataclass
class Item:
    path: str
    out: str
    wave: np.ndarray | None = None
    seconds: float = 0.0
    error: str | None = None


def _bucket(frames: int, base: int) -> int:
    """Round a frame count up to base * 2^k (at most 2x padding, few distinct shapes)."""
    size = base
    while size < frames:
        size *= 2
    return size


def _output_names(paths: list[str], out_dir: str) -> list[str]:
    """OUTDIR/<stem>.wav, disambiguating equal stems (a.wav and a.flac) with a numeric suffix."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0] or "audio"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        names.append(os.path.join(out_dir, f"{stem}.wav" if n == 0 else f"{stem}-{n}.wav"))
    return names


def reconstruct(args) -> int:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from unitok_jax import vae
    from unitok_jax.audio import AudioError, load_audio, save_audio
    from unitok_jax.convert import ConversionError, load

    try:
        cfg, params = load(args.checkpoint).vae()  # a tokenizer-only or a full checkpoint
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = jax.device_put(params)
    hop, sr = cfg.hop, cfg.sample_rate
    os.makedirs(args.out, exist_ok=True)

    items = [Item(p, o) for p, o in zip(args.inputs, _output_names(args.inputs, args.out))]
    for it in tqdm(items, desc="load", unit="file", disable=args.quiet):
        try:
            it.wave = load_audio(it.path, sr, max_seconds=args.max_seconds)
            it.seconds = len(it.wave) / sr
        except AudioError as e:
            it.error = str(e)

    key = jax.random.key(args.seed)
    chunk_frames = int(args.chunk_seconds * sr) // hop
    ok = sorted((it for it in items if it.error is None), key=lambda it: len(it.wave))
    short = [it for it in ok if len(it.wave) <= chunk_frames * hop]
    long = [it for it in ok if len(it.wave) > chunk_frames * hop]
    base = max(1, int(args.bucket_seconds * sr) // hop)
    batches = [short[i : i + args.batch_size] for i in range(0, len(short), args.batch_size)]
    t0 = time.perf_counter()
    bar = tqdm(total=sum(it.seconds for it in ok), desc="reconstruct", unit="s audio", disable=args.quiet,
               bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s audio [{elapsed}<{remaining}]")

    def write(it: Item, wave: np.ndarray) -> None:
        try:
            save_audio(it.out, wave[: len(it.wave)], sr, subtype=args.subtype)
        except (AudioError, OSError) as e:
            it.error = f"{it.out}: cannot write: {e}"
        bar.update(it.seconds)

    for batch in batches:
        frames = _bucket(max(vae.num_frames(len(it.wave), hop) for it in batch), base)
        wave = np.zeros((args.batch_size, frames * hop), np.float32)  # fixed batch size: one program per bucket
        lengths = np.zeros((args.batch_size,), np.int32)
        for i, it in enumerate(batch):
            wave[i, : len(it.wave)] = it.wave
            lengths[i] = len(it.wave)
        key, sub = jax.random.split(key)
        enc = vae.encode(params, cfg, jnp.asarray(wave), jnp.asarray(lengths), key=sub, sample=args.sample)
        out = np.asarray(vae.decode(params, cfg, enc.latent, enc.frame_num))
        for i, it in enumerate(batch):
            write(it, out[i])
    for it in long:  # one at a time, chunk by chunk with the KV caches (same result, bounded memory)
        key, sub = jax.random.split(key)
        enc = vae.encode_chunked(params, cfg, it.wave[None], chunk_frames=chunk_frames, key=sub,
                                 sample=args.sample)
        write(it, np.asarray(vae.decode_chunked(params, cfg, enc.latent, chunk_frames=chunk_frames))[0])
    bar.close()
    wall = time.perf_counter() - t0

    width = max([len(it.path) for it in items] + [4])
    print(f"\n{'file':<{width}}  {'seconds':>8}  result")
    for it in items:
        result = it.out if it.error is None else f"FAILED: {it.error}"
        print(f"{it.path:<{width}}  {it.seconds:8.2f}  {result}")
    done = [it for it in items if it.error is None]
    total = sum(it.seconds for it in done)
    print(f"\n{len(done)}/{len(items)} files, {total:.1f} s of audio in {wall:.1f} s"
          + (f" ({total / wall:.1f}x real time, compile included)" if wall > 0 and total else ""))
    return 0 if len(done) == len(items) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconstruct", help="encode and decode audio files with the AudioVAE")
    rec.add_argument("--checkpoint", required=True, help="unitok_jax checkpoint folder (python -m unitok_jax.convert)")
    rec.add_argument("inputs", nargs="+", help="audio files (any format/rate soundfile or librosa can read)")
    rec.add_argument("--out", required=True, help="output folder for <name>.wav")
    rec.add_argument("--batch-size", type=int, default=8)
    rec.add_argument("--sample", action="store_true",
                     help="decode a posterior sample instead of the posterior mean (the default)")
    rec.add_argument("--seed", type=int, default=0, help="PRNG seed for --sample")
    rec.add_argument("--subtype", choices=("PCM_16", "FLOAT"), default="PCM_16", help="output WAV sample format")
    rec.add_argument("--bucket-seconds", type=float, default=2.0,
                     help="smallest length bucket; inputs are padded to this times a power of two")
    rec.add_argument("--chunk-seconds", type=float, default=60.0,
                     help="longer files are processed alone, chunk by chunk with the KV caches")
    rec.add_argument("--max-seconds", type=float, default=None, help="reject inputs longer than this")
    rec.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.command == "reconstruct":
        if args.batch_size < 1:
            ap.error("--batch-size must be >= 1")
        return reconstruct(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
