"""BailingMoE LLM configurations (big_vision style: ``get_config(variant)`` returns a ConfigDict) and the home of
every LLM size preset (``llm_config`` dicts in the checkpoint's ``config.json`` layout).

Variants:
  * ``official``: the Ming-UniAudio-16B-A3B LLM as the spec estimates it (section 3.1, Ling-lite layout;
    :data:`OFFICIAL_LLM_CONFIG`, defined beside the model in :mod:`unitok_jax.llm`, whose keys it validates);
  * ``tiny``: the same structure at CPU size (:data:`TINY_LLM_CONFIG`: tests, benchmarks).

:data:`TINY_LM_LLM_CONFIG` is the LLM of the LM stage's tiny variant (``configs/lm.py:tiny``, the demo).

The ``[I]`` (inferred) values of the official variant are only defaults: :func:`build` overrides every one of them
with the checkpoint's ``llm_config`` when a ``config.json`` is given, so the released file always wins.

  from unitok_jax.configs import llm as llm_configs   # or, in a checkout: from configs import llm
  cfg = llm_configs.build(llm_configs.get_config("official"), checkpoint_config="ckpt/config.json")
"""
from __future__ import annotations

import json
from typing import Mapping, Optional, Union

import ml_collections

from unitok_jax.llm import OFFICIAL_LLM_CONFIG, LLMConfig

# A CPU-sized variant with the official structure (tests and the benchmark).
TINY_LLM_CONFIG: dict = {
    **OFFICIAL_LLM_CONFIG,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rope_scaling": None,
    "pad_token_id": 0,
    "num_experts": 8,
    "num_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "max_position_embeddings": 1024,
}

# The LLM of the LM stage's tiny variant (configs/lm.py:tiny; the demo widens it with --config overrides): the tiny
# LLM with qkv bias, the audio gate (multi_gate), 4 wider experts and a longer context.
TINY_LM_LLM_CONFIG: dict = {
    **TINY_LLM_CONFIG,
    "use_qkv_bias": True,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "num_experts": 4,
    "moe_intermediate_size": 64,
    "multi_gate": True,
}

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
