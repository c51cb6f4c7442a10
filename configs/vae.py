"""The package's :mod:`unitok_jax.configs.vae`, here so that a checkout's ``--config configs/vae.py:VARIANT`` keeps
working (the package never imports this folder)."""
from unitok_jax.configs.vae import *  # noqa: F401,F403
from unitok_jax.configs.vae import get_config  # noqa: F401
