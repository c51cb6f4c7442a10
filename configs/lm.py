"""The package's :mod:`unitok_jax.configs.lm`, here so that a checkout's ``--config configs/lm.py:VARIANT`` keeps
working (the package never imports this folder)."""
from unitok_jax.configs.lm import *  # noqa: F401,F403
from unitok_jax.configs.lm import get_config  # noqa: F401
