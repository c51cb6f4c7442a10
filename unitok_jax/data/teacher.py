"""Teacher features for tokenizer stage S1: Whisper tiny.en's encoder output for each utterance of a manifest.

  python -m unitok_jax.data.teacher --manifest corpus/train.jsonl --out teacher/ [--dim 48] [--limit N]

Writes ``teacher/feats/<n>.npy`` (float32 ``[ceil(samples / 320), dim]``, 50 Hz, row ``i`` describing samples
``[320 i, 320 (i + 1))``: the layout :func:`unitok_jax.data.pipeline.load_teacher` and the S1 stage read) and
``teacher/manifest.jsonl``: the records with ``teacher`` (and ``audio`` made absolute), ready for
``train.py --config configs/vae.py:tiny --config.train.objective=s1 --config.data.manifest=teacher/manifest.jsonl``.

The encoder features are 384 wide (:func:`unitok_jax.eval.whisper.encoder_features`). ``--dim`` below 384 projects
them onto their first ``dim`` principal components (fitted on every frame written, centred, then one global scale
that gives the projected channels unit mean variance), so that a tiny semantic module can distil them without
growing to Whisper's width; ``teacher/projection.npz`` keeps ``mean`` [384], ``components`` [384, dim], ``scale``
and ``explained`` (the fraction of the variance the projection keeps). ``--dim 384`` (or 0) keeps the raw features.
``--limit N`` encodes an evenly spaced subset of N records (the encoder costs about 0.2 s an utterance on a core).
The run is not resumable: it is a few minutes at most, and writes under a temporary folder renamed into place.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

WIDTH = 384  # Whisper tiny(.en) encoder width


def select(records: list, limit: Optional[int]) -> list:
    """Every record, or ``limit`` of them evenly spaced (deterministic)."""
    if not limit or limit >= len(records):
        return list(records)
    idx = np.unique(np.linspace(0, len(records) - 1, limit).round().astype(int))
    return [records[i] for i in idx]


def fit_projection(feats: Sequence[np.ndarray], dim: int) -> dict:
    """PCA of the rows of ``feats`` onto ``dim`` components, scaled to unit mean variance per projected channel."""
    x = np.concatenate(feats, 0).astype(np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2 / max(len(x) - 1, 1)
    comps = vt[:dim].T  # [width, dim]
    scale = 1.0 / np.sqrt(var[:dim].mean())
    return {"mean": mean.astype(np.float32), "components": comps.astype(np.float32),
            "scale": np.float32(scale), "explained": np.float32(var[:dim].sum() / var.sum())}


def project(feats: np.ndarray, proj: dict) -> np.ndarray:
    return ((feats - proj["mean"]) @ proj["components"] * proj["scale"]).astype(np.float32)


def build_teacher(manifest: str, out: str, *, dim: int = 0, limit: Optional[int] = None, batch: int = 8,
                  progress: bool = True) -> dict:
    """Encode, project, write (see the module docstring); returns the summary also written to ``teacher.json``."""
    from tqdm import tqdm

    from unitok_jax.audio import AudioError, load_audio
    from unitok_jax.data.manifest import read_manifest, write_manifest
    from unitok_jax.eval.whisper import encoder_features, load_model
    from unitok_jax.io import atomic_dir, write_json

    if not 0 <= dim <= WIDTH:
        raise ValueError(f"--dim must be in [1, {WIDTH}] (0: keep {WIDTH}), got {dim}")
    man = read_manifest(manifest, require_text=False)
    records = select(man.records, limit)
    if not records:
        raise ValueError(f"{manifest}: no usable records")
    model = load_model()
    feats, kept, failed = [], [], list(man.errors)
    for b in tqdm(range(0, len(records), batch), desc="teacher", unit="batch", disable=not progress,
                  file=sys.stderr):
        waves, recs = [], []
        for r in records[b: b + batch]:
            try:
                waves.append(load_audio(r["audio"], 16000))
                recs.append(r)
            except AudioError as e:
                failed.append(f"{r['id']}: {e}")
        if waves:
            feats += encoder_features(waves, model, batch=batch)
            kept += recs
    if not kept:
        raise ValueError(f"{manifest}: no readable audio")
    proj = fit_projection(feats, dim) if dim and dim < WIDTH else None
    out = os.path.abspath(out)
    with atomic_dir(out) as tmp:
        os.makedirs(os.path.join(tmp, "feats"))
        rows = []
        for n, (r, f) in enumerate(zip(kept, feats)):
            rel = f"feats/{n:06d}.npy"
            np.save(os.path.join(tmp, rel), project(f, proj) if proj else f)
            rows.append({**r, "teacher": rel})
        write_manifest(os.path.join(tmp, "manifest.jsonl"), rows)
        summary = {"teacher": "Whisper tiny.en encoder (faster-whisper)", "manifest": os.path.abspath(manifest),
                   "records": len(rows), "failed": failed, "frames": int(sum(len(f) for f in feats)),
                   "rate_hz": 50, "width": WIDTH, "dim": int(proj["components"].shape[1]) if proj else WIDTH,
                   "explained": float(proj["explained"]) if proj else 1.0}
        if proj:
            np.savez(os.path.join(tmp, "projection.npz"), **proj)
        write_json(os.path.join(tmp, "teacher.json"), summary)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unitok_jax.data.teacher", description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, help="speech manifest (JSONL with id, audio, speaker)")
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--dim", type=int, default=0, help=f"PCA-project to this width (0 or {WIDTH}: raw features)")
    p.add_argument("--limit", type=int, default=None, help="encode only N evenly spaced records")
    p.add_argument("--batch", type=int, default=8, help="windows per encoder call")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from unitok_jax.eval.metrics import EvalDependencyError

    try:
        s = build_teacher(args.manifest, args.out, dim=args.dim, limit=args.limit, batch=args.batch,
                          progress=not args.quiet)
    except (ValueError, EvalDependencyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {s['records']} utterances, {s['frames']} frames of {s['dim']} channels "
          f"(variance kept {s['explained']:.1%}); {len(s['failed'])} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
