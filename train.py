#!/usr/bin/env python
"""Training CLI: ``python train.py --config configs/vae.py:tiny --workdir DIR [--config.key=value ...]``.

The front door of :mod:`unitok_jax.cli.train` (the same command as ``unitok-train`` and
``python -m unitok_jax.cli.train``; flags and stages are described there); the stages live in
:mod:`unitok_jax.training.vae_train` and :mod:`unitok_jax.training.lm_train`.
"""
import sys

from unitok_jax.cli.train import main

if __name__ == "__main__":
    main(sys.argv[1:])
