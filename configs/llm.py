"""BailingMoE LLM configurations (big_vision style: ``get_config(variant)`` returns a ConfigDict).

Variants:
  * ``official``: the Ming-UniAudio-16B-A3B LLM as the spec estimates it (section 3.1, Ling-lite layout);
  * ``tiny``: the same structure at CPU size (tests, benchmarks, the demo).

The ``[I]`` (inferred) values of the official variant are only defaults: :func:`build` overrides every one of them
with the checkpoint's ``llm_config`` when a ``config.json`` is given, so the released file always wins.

  from configs import llm as llm_configs
  cfg = llm_configs.build(llm_configs.get_config("official"), checkpoint_config="ckpt/config.json")
"""
from __future__ import annotations

import json
from typing import Mapping, Optional, Union

import ml_collections

from unitok_jax.llm import OFFICIAL_LLM_CONFIG, TINY_LLM_CONFIG, LLMConfig

VARIANTS = {"official": OFFICIAL_LLM_CONFIG, "tiny": TINY_LLM_CONFIG}


def get_config(variant: str = "official") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown LLM config variant {variant!r}; choose from {sorted(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.llm_config = ml_collections.ConfigDict(dict(VARIANTS[variant]))
    c.moe_impl = "auto"  # "auto" | "ragged" | "tiled" | "dense"
    c.dtype = "float32"  # compute dtype ("bfloat16" on accelerators)
    c.param_dtype = "float32"
    return c


def build(config: ml_collections.ConfigDict, checkpoint_config: Optional[Union[str, Mapping]] = None) -> LLMConfig:
    """LLMConfig from a config of this file, with every key of the checkpoint's ``llm_config`` (a config.json path,
    a full config dict, or the ``llm_config`` dict itself) taking precedence."""
    llm = config.llm_config.to_dict()
    if checkpoint_config is not None:
        if isinstance(checkpoint_config, str):
            with open(checkpoint_config) as f:
                checkpoint_config = json.load(f)
        ck = dict(checkpoint_config)
        llm.update(ck.get("llm_config", ck))
    return LLMConfig.from_hf(llm, moe_impl=config.moe_impl, dtype=config.dtype, param_dtype=config.param_dtype)
