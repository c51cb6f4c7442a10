"""The package's :mod:`unitok_jax.configs.llm`, here so that a checkout's ``--config configs/llm.py:VARIANT`` keeps
working (the package never imports this folder)."""
from unitok_jax.configs.llm import *  # noqa: F401,F403
from unitok_jax.configs.llm import get_config  # noqa: F401
