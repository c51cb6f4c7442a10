"""CLI: python -m unitok_jax.convert SRC_DIR DST_DIR [--dtype bfloat16|float32] [--overwrite]"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m unitok_jax.convert",
        description="Convert an official (PyTorch, safetensors) checkpoint folder into a unitok_jax checkpoint, "
                    "streaming (host memory stays near one group of tensors, not the model).",
    )
    ap.add_argument("src", help="folder with config.json and model.safetensors (or a sharded set + index)")
    ap.add_argument("dst", help="output folder (orbax params + unitok_config.json)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="dtype of the written params (norms and MoE router stay float32); default: the "
                         "checkpoint's own (bfloat16 for the release)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    ap.add_argument("--group-mb", type=int, default=None,
                    help="write params in orbax groups of at most this many MiB (default 256; one tensor if larger)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    from unitok_jax.convert import ConversionError, convert

    t0 = time.perf_counter()
    try:
        plan = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                       max_group_bytes=args.group_mb << 20 if args.group_mb else None, progress=not args.no_progress)
    except (ConversionError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{plan.component}: {plan.num_params():,} parameters")
    print(f"wrote {args.dst} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
