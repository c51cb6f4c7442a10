"""CLI: python -m unitok_jax.convert SRC_DIR DST_DIR [--overwrite]"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m unitok_jax.convert",
        description="Convert an official (PyTorch, safetensors) checkpoint folder into a unitok_jax checkpoint.",
    )
    ap.add_argument("src", help="folder with config.json and model.safetensors (or a sharded set + index)")
    ap.add_argument("dst", help="output folder (orbax params + unitok_config.json)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = ap.parse_args(argv)

    from unitok_jax.convert import ConversionError, convert_reference, save

    t0 = time.perf_counter()
    try:
        ckpt = convert_reference(args.src)
        save(ckpt, args.dst, overwrite=args.overwrite)
    except (ConversionError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in ckpt.configs:
        print(f"{name}: {ckpt.num_params(name):,} parameters")
    print(f"wrote {args.dst} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
