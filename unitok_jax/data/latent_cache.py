"""Precompute the frozen VAE's posterior for a manifest (the LM stage's latent cache).

  python -m unitok_jax.data.latent_cache --vae CKPT --manifest train.jsonl --out cache/

``CKPT`` is any checkpoint holding the AudioVAE (``train.py`` stage ``vae``'s ``export``, or a converted
MingTok-Audio / full Ming-UniAudio folder). For each record it writes ``cache/latents/<n>.npy`` holding the posterior
``[T, 2, C]`` (mean, std; T = the item's own frame count) and ``cache/manifest.jsonl``: the records plus
``latents``, ``duration`` and ``frames``. An edit pair (a record with ``target_audio``, see
:mod:`unitok_jax.data.build_edit_corpus`) also gets ``cache/latents/<n>.target.npy`` and ``target_latents``,
``target_duration``, ``target_frames``, so edit training can read latents too. Training samples
``mean + std * eps`` afresh every step, as with on-the-fly encoding. Each file is written under a temporary name
and renamed; an interrupted run resumes (files already there are kept). Unreadable audio is reported and left out
of the cache manifest.

Then train with ``--config.data.manifest=cache/manifest.jsonl --config.data.source=latents`` (edit pairs:
``--config.data.edit_manifest=edit_cache/manifest.jsonl``).
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

    from unitok_jax import vae
    from unitok_jax.shapes import pad_waves
    from unitok_jax.audio import AudioError, load_audio
    from unitok_jax.convert import load
    from unitok_jax.data.manifest import read_manifest, write_manifest
    from unitok_jax.io import atomic_file, load_npy

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype={dtype!r}: choose float32 or float16")
    vcfg, vparams = load(vae_checkpoint).vae()
    vparams = jax.device_put(vparams)
    m = read_manifest(manifest, require_text=False)
    failed = list(m.errors)
    folder = os.path.join(out, "latents")
    os.makedirs(folder, exist_ok=True)
    encode = jax.jit(lambda w, n: vae.encode(vparams, vcfg, w, n, sample=False))

    def has_target(rec) -> bool:
        return isinstance(rec.get("target_audio"), str)

    records, written, kept = [], 0, 0
    todo = []
    for n, rec in enumerate(m.records):
        files = {"latents": os.path.join(folder, f"{n:08d}.npy")}
        if has_target(rec):  # an edit pair: the target speech too
            files["target_latents"] = os.path.join(folder, f"{n:08d}.target.npy")
        rec = dict(rec, **{k: os.path.relpath(f, out) for k, f in files.items()})
        if all(os.path.isfile(f) for f in files.values()):
            for k, f in files.items():
                frames = int(load_npy(f, mmap_mode="r").shape[0])
                pre = "target_" if k == "target_latents" else ""
                rec.setdefault(pre + "duration", frames * vcfg.hop / vcfg.sample_rate)
                rec[pre + "frames"] = frames
            records.append(rec)
            kept += 1
        else:
            todo.append((rec, files))
    bar = tqdm(total=len(todo), desc="latent cache", unit="utt", disable=not progress)
    for s in range(0, len(todo), batch_size):
        items, waves = [], []  # one item per file to write: (record index in the chunk, key, path)
        chunk = []
        for rec, files in todo[s : s + batch_size]:
            try:
                ws = {}
                for k in files:
                    src = rec["audio"] if k == "latents" else rec["target_audio"]
                    ws[k] = load_audio(src, vcfg.sample_rate)
                    if not len(ws[k]):
                        raise AudioError(src, "empty audio")
            except AudioError as e:
                failed.append(f"{rec['id']}: {e}")
                continue
            chunk.append(rec)
            for k, f in files.items():
                items.append((len(chunk) - 1, k, f))
                waves.append(ws[k])
        for b in range(0, len(waves), batch_size):
            batch, lengths = pad_waves(waves[b : b + batch_size], vcfg.hop)
            enc = encode(jnp.asarray(batch), jnp.asarray(lengths))
            mean, std, nf = map(np.asarray, (enc.mean, enc.std, enc.frame_num))
            for j, (c, k, path) in enumerate(items[b : b + batch_size]):
                post = np.stack([mean[j, : nf[j]], std[j, : nf[j]]], axis=1).astype(dtype)
                with atomic_file(path, "wb") as f:
                    np.save(f, post)
                pre = "target_" if k == "target_latents" else ""
                chunk[c][pre + "frames"] = int(nf[j])
                chunk[c][pre + "duration"] = int(lengths[j]) / vcfg.sample_rate
        records += chunk
        written += len(chunk)
        bar.update(len(todo[s : s + batch_size]))
    bar.close()
    records.sort(key=lambda r: r["latents"])
    for r in records:  # the cache files relative to the cache manifest, the audio absolute
        r["audio"] = os.path.abspath(r["audio"])
        if has_target(r):
            r["target_audio"] = os.path.abspath(r["target_audio"])
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
