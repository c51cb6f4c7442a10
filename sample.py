#!/usr/bin/env python
"""Batch sampling CLI: ``python sample.py {tts,asr,edit,reconstruct} --checkpoint DIR ...``.

The front door of :mod:`unitok_jax.cli.sample` (the same command as ``unitok-sample`` and
``python -m unitok_jax.cli.sample``; tasks, request files and flags are described there).
"""
import sys

from unitok_jax.cli.sample import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
