"""Shared building blocks: norms, rotary embeddings, attention with a KV cache, MLPs, the transformer stack."""
from unitok_jax.nn.attention import Attention
from unitok_jax.nn.cache import cache_size_for, position_mask
from unitok_jax.nn.mlp import MLP, dense
from unitok_jax.nn.norms import LayerNorm, RMSNorm, make_norm
from unitok_jax.nn.rotary import apply_rotary, inv_frequencies, mrope_angles, rope_angles
from unitok_jax.nn.transformer import Block, Stack, TransformerConfig, init_cache

__all__ = [
    "Attention", "Block", "LayerNorm", "MLP", "RMSNorm", "Stack", "TransformerConfig", "apply_rotary",
    "cache_size_for", "dense", "init_cache", "inv_frequencies", "make_norm", "mrope_angles", "position_mask",
    "rope_angles",
]
