"""Precompute the frozen VAE's posterior for a manifest (the LM stage's latent cache).

  python -m unitok_jax.data.latent_cache --vae CKPT --manifest train.jsonl --out cache/

``CKPT`` is any checkpoint holding the AudioVAE (``train.py`` stage ``vae``'s ``export``, or a converted
MingTok-Audio / full Ming-UniAudio folder). For each record it writes ``cache/latents/<n>.npy`` holding the posterior
``[T, 2, C]`` (mean, std; T = the item's own frame count) and ``cache/manifest.jsonl``: the records plus
``latents``, ``duration`` and ``frames``. Training samples ``mean + std * eps`` afresh every step, as with
on-the-fly encoding. Each file is written under a temporary name and renamed; an interrupted run resumes (files
already there are kept). Unreadable audio is reported and left out of the cache manifest.

Then train with ``--config.data.manifest=cache/manifest.jsonl --config.data.source=latents``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def build_cache(vae_checkpoint: str, manifest: str, out: str, *, batch_size: int = 8, dtype: str = "float32",
                progress: bool = True) -> dict:
    """Build the cache; returns ``{"written", "kept", "failed": [messages], "manifest": path}``."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from unitok_jax import generate, vae
    from unitok_jax.audio import AudioError, load_audio
    from unitok_jax.convert import load
    from unitok_jax.data.manifest import read_manifest, write_manifest

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype={dtype!r}: choose float32 or float16")
    vcfg, vparams = load(vae_checkpoint).vae()
    vparams = jax.device_put(vparams)
    m = read_manifest(manifest, require_text=False)
    failed = list(m.errors)
    folder = os.path.join(out, "latents")
    os.makedirs(folder, exist_ok=True)
    encode = jax.jit(lambda w, n: vae.encode(vparams, vcfg, w, n, sample=False))

    records, written, kept = [], 0, 0
    todo = []
    for n, rec in enumerate(m.records):
        path = os.path.join(folder, f"{n:08d}.npy")
        rec = dict(rec, latents=os.path.relpath(path, out))
        if os.path.isfile(path):
            frames = int(np.load(path, mmap_mode="r").shape[0])
            records.append(dict(rec, frames=frames, duration=rec.get("duration", frames * vcfg.hop / vcfg.sample_rate)))
            kept += 1
        else:
            todo.append((n, rec, path))
    bar = tqdm(total=len(todo), desc="latent cache", unit="utt", disable=not progress)
    for s in range(0, len(todo), batch_size):
        chunk, waves = [], []
        for n, rec, path in todo[s : s + batch_size]:
            try:
                w = load_audio(rec["audio"], vcfg.sample_rate)
                if not len(w):
                    raise AudioError(rec["audio"], "empty audio")
            except AudioError as e:
                failed.append(f"{rec['id']}: {e}")
                continue
            chunk.append((rec, path, len(w)))
            waves.append(w)
        if waves:
            batch, lengths = generate.pad_sequences(waves, dtype=np.float32)
            frames = generate.bucket(vae.num_frames(batch.shape[1], vcfg.hop))
            batch = generate.pad_axis(batch, frames * vcfg.hop, 1)
            enc = encode(jnp.asarray(batch), jnp.asarray(lengths))
            mean, std, nf = map(np.asarray, (enc.mean, enc.std, enc.frame_num))
            for k, (rec, path, length) in enumerate(chunk):
                post = np.stack([mean[k, : nf[k]], std[k, : nf[k]]], axis=1).astype(dtype)
                tmp = path + ".tmp.npy"
                np.save(tmp, post)
                os.replace(tmp, path)
                records.append(dict(rec, frames=int(nf[k]), duration=length / vcfg.sample_rate))
                written += 1
        bar.update(len(todo[s : s + batch_size]))
    bar.close()
    records.sort(key=lambda r: r["latents"])
    for r in records:  # paths relative to the cache manifest
        r["latents"] = os.path.relpath(os.path.join(out, r["latents"]), out)
        r["audio"] = os.path.abspath(r["audio"])
    path = os.path.join(out, "manifest.jsonl")
    write_manifest(path, records)
    return {"written": written, "kept": kept, "failed": failed, "manifest": path}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unitok_jax.data.latent_cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", required=True, help="checkpoint holding the AudioVAE")
    ap.add_argument("--manifest", required=True, help="JSONL manifest {id, audio, text, speaker}")
    ap.add_argument("--out", required=True, help="cache folder (created; resumed if it exists)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = ap.parse_args(argv)
    for p, what in ((args.manifest, "manifest"), (args.vae, "VAE checkpoint")):
        if not os.path.exists(p):
            print(f"error: {what} {p} does not exist", file=sys.stderr)
            return 2
    res = build_cache(args.vae, args.manifest, args.out, batch_size=args.batch_size, dtype=args.dtype)
    for msg in res["failed"]:
        print(f"skipped {msg}", file=sys.stderr)
    print(f"{res['written']} written, {res['kept']} already there, {len(res['failed'])} skipped -> {res['manifest']}")
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
