"""Training and model configurations, big_vision style: each file's ``get_config(variant)`` returns a ConfigDict.

* ``vae.py``: the tokenizer stages S0 / S1 (``tiny``, ``official``);
* ``lm.py``: the LM stage and the tokenizer's unified stage S2 (``tiny``, ``official``);
* ``llm.py``: the LLM alone, and the home of every LLM size preset;
* ``uniaudio.py``: the tiny full model (LLM + AudioVAE + DiT, ``TINY_BAILINGMM``) of the tests and benchmarks.

``train.py --config`` takes a file path (``PATH[:variant]``). The repository's ``configs/*.py`` re-export these files,
and :func:`resolve` lets the packaged ones be named from any folder: ``--config configs/vae.py:tiny`` loads this
package's ``vae.py`` wherever there is no such file, so an installed package needs no checkout.
"""
from __future__ import annotations

import os

NAMES = ("vae", "lm", "llm")


def path(name: str) -> str:
    """The file of the packaged config ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"no packaged config {name!r}; choose from {NAMES}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")


def resolve(spec: str) -> str:
    """A ``--config`` value ``PATH[:variant]``: unchanged when PATH is a file; else, when PATH names a packaged config
    (``vae``, ``vae.py``, ``configs/vae.py``, any folder), that file with the same variant; else unchanged (the
    flag parser then reports the missing file)."""
    file, sep, variant = spec.partition(":")
    if os.path.isfile(file):
        return spec
    name = os.path.basename(file)
    name = name[:-3] if name.endswith(".py") else name
    return path(name) + sep + variant if name in NAMES else spec
