"""Turn a checkpoint of a ``train.py`` run into an inference export (``unitok-export``).

  python -m unitok_jax.export WORKDIR [--step N] [--out DIR]

``WORKDIR`` is the run's workdir (its ``config.json`` says which stage and model); ``--step`` one of its saved
steps (default: the latest); ``--out`` where the export goes (default ``WORKDIR/export_step{N}``; an existing
export there is replaced). The export is what a finished run writes to ``WORKDIR/export``: a VAE for
``sample.py reconstruct``, a full model (with the run's tokenizer) for ``sample.py tts / asr / edit`` and
:meth:`unitok_jax.api.UniAudio.load`. The run's mesh is used when this host has its devices, else one device.

Exit status: 0 done, 2 no such workdir or step (the message lists the saved steps).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unitok_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="a train.py workdir")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest)")
    parser.add_argument("--out", default=None, help="where the export goes (default WORKDIR/export_step{N})")
    args = parser.parse_args(argv)

    from absl import logging

    from unitok_jax.training.guard import SetupError
    from unitok_jax.training.loop import export_checkpoint

    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    try:
        export_checkpoint(args.workdir, args.step, args.out)
    except (FileNotFoundError, ValueError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
