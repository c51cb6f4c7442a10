"""Reference flow head, LinearPooling and stop head state dicts -> our params.

Reference names (spec §6.2):

* flow head, under ``flowloss.cfm.model.`` in a full Ming-UniAudio checkpoint (``cfm.model.`` in a bare
  ``FlowLoss`` state dict): ``t_embedder.time_mlp.{0,2}``, ``x_embedder``, ``c_embedder.cond_embedder``,
  ``rotary_embed.inv_freq`` (a saved buffer, checked), ``blocks.{i}.{norm1, attn.to_q, attn.to_k, attn.to_v,
  attn.to_out.0, attn.q_norm, attn.k_norm, norm2, mlp.ff.0.0, mlp.ff.2}``, ``final_layer.{norm_final, linear}``;
* pooling: ``linear_proj_audio.final_layer.{norm_final.weight, linear}``;
* stop head: ``stop_head.{weight, bias}``.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import numpy as np

from unitok_jax.convert.common import (ConversionError, Stacked, WeightReader, detect_prefix, heads_in, heads_out,
                                       materialize, read_weights)
from unitok_jax.flow import FlowConfig
from unitok_jax.heads import HeadsConfig
from unitok_jax.nn import inv_frequencies

FLOW_PREFIXES = ("flowloss.cfm.model.", "cfm.model.", "")
FLOW_PROBE = "t_embedder.time_mlp.0.weight"
POOLING_PREFIX = "linear_proj_audio."
STOP_PREFIX = "stop_head."


def _weights(weights) -> Mapping[str, np.ndarray]:
    if isinstance(weights, (str, os.PathLike)):
        return read_weights(os.fspath(weights))
    return weights


def flow_kwargs_from_bailingmm(config: Mapping) -> dict:
    """The ``FlowLoss`` kwargs a full ``BailingMMConfig`` (config.json) builds: z_channels from
    ``audio_tokenizer_config.enc_kwargs.latent_dim``, llm_cond_dim from ``llm_config.hidden_size``, plus
    ``ditar_config``."""
    try:
        return {
            "z_channels": config["audio_tokenizer_config"]["enc_kwargs"]["latent_dim"],
            "llm_cond_dim": config["llm_config"]["hidden_size"],
            **config["ditar_config"],
        }
    except KeyError as e:
        raise ConversionError(
            f"config lacks {e}: a Ming-UniAudio config.json needs ditar_config, llm_config.hidden_size and "
            "audio_tokenizer_config.enc_kwargs.latent_dim"
        ) from e


def heads_config_from_bailingmm(config: Mapping, patch_size: int = 5) -> HeadsConfig:
    """HeadsConfig from a full config.json: U = the semantic module width (``whisper_encoder.n_state``), D =
    ``llm_config.hidden_size``."""
    try:
        u = config["audio_tokenizer_config"]["semantic_module_kwargs"]["whisper_encoder"]["n_state"]
        d = config["llm_config"]["hidden_size"]
    except KeyError as e:
        raise ConversionError(f"config lacks {e} (needed for the pooling / stop head dims)") from e
    p = config["audio_tokenizer_config"].get("patch_size", patch_size)
    return HeadsConfig(semantic_dim=int(u), llm_dim=int(d), patch_size=int(p))


def _check_rotary(r: WeightReader, cfg: FlowConfig) -> None:
    name = "rotary_embed.inv_freq"
    if not r.has(name):
        return  # a non-persistent buffer in some x_transformers versions: nothing to check
    arr = r.weights[r.prefix + name]
    half = cfg.head_dim // 2
    if arr.shape != (half,):
        implied = cfg.hidden_size // (2 * arr.shape[0]) if arr.ndim == 1 and arr.shape[0] else "?"
        raise ConversionError(
            f"{r.source}: key {r.prefix + name!r} has shape {tuple(arr.shape)}, expected ({half},) "
            f"(head_dim {cfg.head_dim} = hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads}); "
            f"the buffer implies num_heads = {implied}"
        )
    want = inv_frequencies(cfg.head_dim, cfg.rope_theta)
    got = r.get(name, (half,))
    if not np.allclose(got, want, rtol=1e-5, atol=0):
        raise ConversionError(
            f"{r.source}: {r.prefix + name!r} = {got[:4]}... does not match theta={cfg.rope_theta}^(-2i/{cfg.head_dim})"
            f" = {want[:4]}...; set rope_theta / num_heads to match the checkpoint"
        )


def convert_dit(weights, cfg: FlowConfig, prefix: Optional[str] = None, source: str = "checkpoint",
                strict: bool = True) -> dict:
    """Our :class:`unitok_jax.flow.DiT` params from a reference state dict (``prefix`` auto-detected among
    ``flowloss.cfm.model.``, ``cfm.model.``, ``""`` when None). Every shape is checked against ``cfg``;
    raises :class:`ConversionError` naming the key for a missing, mis-shaped or (``strict``) unexpected tensor."""
    weights = _weights(weights)
    if prefix is None:
        prefix = detect_prefix(weights, FLOW_PROBE, FLOW_PREFIXES)
    r = WeightReader(weights, prefix, source)
    params = materialize(dit_tree(r, cfg))
    if strict:
        r.finish()
    return params


def dit_tree(r: WeightReader, cfg: FlowConfig) -> dict:
    """The DiT params read through ``r`` (its prefix: where the DiT lives), the block stack lazy
    (:class:`Stacked`); checks the rotary buffer."""
    H, C, D, n, d, F = cfg.hidden_size, cfg.z_channels, cfg.llm_cond_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    _check_rotary(r, cfg)

    def block(i):
        b = f"blocks.{i}."
        attn = {
            "q": heads_in(r, b + "attn.to_q", H, n, d, True),
            "k": heads_in(r, b + "attn.to_k", H, n, d, True),
            "v": heads_in(r, b + "attn.to_v", H, n, d, True),
            "o": heads_out(r, b + "attn.to_out.0", n, d, H, True),
        }
        if cfg.qk_norm:
            attn["q_norm"] = {"scale": r.get(b + "attn.q_norm.weight", (d,))}
            attn["k_norm"] = {"scale": r.get(b + "attn.k_norm.weight", (d,))}
        return (
            {
                "attn_norm": {"scale": r.get(b + "norm1.weight", (H,))},
                "attn": attn,
                "mlp_norm": {"scale": r.get(b + "norm2.weight", (H,))},
                "mlp": {
                    "fc1": r.linear(b + "mlp.ff.0.0", H, F, True),
                    "fc2": r.linear(b + "mlp.ff.2", F, H, True),
                },
            }
        )

    return {
        "t_embedder": {
            "fc1": r.linear("t_embedder.time_mlp.0", cfg.freq_embed_dim, H, True),
            "fc2": r.linear("t_embedder.time_mlp.2", H, H, True),
        },
        "c_embedder": r.linear("c_embedder.cond_embedder", D, H, True),
        "x_embedder": r.linear("x_embedder", C, H, True),
        "blocks": {"layers": Stacked(cfg.depth, block)},
        "final_norm": {"scale": r.get("final_layer.norm_final.weight", (H,))},
        "final_linear": r.linear("final_layer.linear", H, C, True),
    }


def convert_flow_head(weights, flow_kwargs: Mapping, patch_size: int = 5, prefix: Optional[str] = None,
                      source: str = "checkpoint", strict: bool = True, **overrides) -> tuple[FlowConfig, dict]:
    """(FlowConfig, DiT params) from a reference state dict and its ``FlowLoss`` kwargs (``z_channels``,
    ``llm_cond_dim`` and the ``ditar_config`` entries; see :func:`flow_kwargs_from_bailingmm` for a full
    config.json). ``overrides`` set FlowConfig fields the reference config does not carry (e.g. ``rope_layout``)."""
    try:
        cfg = FlowConfig.from_reference(dict(flow_kwargs), patch_size=patch_size, **overrides)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{source}: invalid flow-head config: {e}") from e
    return cfg, convert_dit(weights, cfg, prefix=prefix, source=source, strict=strict)


def convert_pooling(weights, cfg: HeadsConfig, prefix: str = POOLING_PREFIX, source: str = "checkpoint",
                    strict: bool = True) -> dict:
    """:class:`unitok_jax.heads.LinearPooling` params from ``linear_proj_audio.final_layer.*``."""
    r = WeightReader(_weights(weights), prefix, source)
    params = {
        "norm": {"scale": r.get("final_layer.norm_final.weight", (cfg.semantic_dim,))},
        "linear": r.linear("final_layer.linear", cfg.semantic_dim, cfg.llm_dim, True),
    }
    if strict:
        r.finish()
    return params


def convert_stop_head(weights, cfg: HeadsConfig, prefix: str = STOP_PREFIX, source: str = "checkpoint",
                      strict: bool = True) -> dict:
    """:class:`unitok_jax.heads.StopHead` params from ``stop_head.{weight,bias}`` [2, D]."""
    r = WeightReader(_weights(weights), prefix, source)
    params = {"linear": {"kernel": r.get("weight", (2, cfg.llm_dim)).T, "bias": r.get("bias", (2,))}}
    if strict:
        r.finish()
    return params


def convert_heads(weights, cfg: HeadsConfig, source: str = "checkpoint", strict: bool = True) -> dict:
    """``{"pooling": ..., "stop_head": ...}`` params from a state dict holding both (full checkpoint or
    ``heads.safetensors``)."""
    weights = _weights(weights)
    return {
        "pooling": convert_pooling(weights, cfg, source=source, strict=strict),
        "stop_head": convert_stop_head(weights, cfg, source=source, strict=strict),
    }


__all__ = [
    "FLOW_PREFIXES", "convert_dit", "convert_flow_head", "convert_heads", "convert_pooling", "convert_stop_head",
    "flow_kwargs_from_bailingmm", "heads_config_from_bailingmm",
]
