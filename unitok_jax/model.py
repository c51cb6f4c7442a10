"""UniAudio: the AudioVAE, the BailingMoE LLM, the flow head, LinearPooling and the stop head as one model.

One params pytree whose top-level keys mirror the official checkpoint prefixes::

    {"audio": VAE params, "model": LLM params, "flowloss": DiT params,
     "linear_proj_audio": pooling params, "stop_head": stop-head params}

and one frozen :class:`UniAudioConfig`. The functions here are the per-step pieces the generation loops and the
training steps are built from; each is a pure function of ``(params, cfg, arrays)``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from unitok_jax import flow, heads, vae
from unitok_jax.flow import FlowConfig
from unitok_jax.heads import HeadsConfig
from unitok_jax.llm import BailingMoeLM, LLMConfig
from unitok_jax.vae import VAEConfig

COMPONENTS = ("audio", "model", "flowloss", "linear_proj_audio", "stop_head")


@dataclasses.dataclass(frozen=True)
class UniAudioConfig:
    vae: VAEConfig
    llm: LLMConfig
    flow: FlowConfig
    heads: HeadsConfig

    @property
    def patch_size(self) -> int:
        return self.heads.patch_size

    def __post_init__(self):
        if self.flow.z_channels != self.vae.latent_dim:
            raise ValueError(f"flow head z_channels={self.flow.z_channels} != VAE latent_dim={self.vae.latent_dim}")
        if self.flow.llm_cond_dim != self.llm.width or self.heads.llm_dim != self.llm.width:
            raise ValueError("flow head / pooling LLM width does not match llm_config.hidden_size")
        if self.heads.semantic_dim != self.vae.unified_dim:
            raise ValueError("pooling input width does not match the semantic module width")
        if self.flow.patch_size != self.heads.patch_size:
            raise ValueError("flow head and pooling disagree on the patch size")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UniAudioConfig":
        return cls(
            vae=VAEConfig.from_dict(d["vae"]),
            llm=LLMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["llm"].items()}),
            flow=FlowConfig.from_dict(d["flow"]),
            heads=HeadsConfig.from_dict(d["heads"]),
        )

    @classmethod
    def from_bailingmm(cls, config: Mapping[str, Any], **llm_overrides) -> "UniAudioConfig":
        """From a full checkpoint's ``config.json`` (``llm_config`` / ``audio_tokenizer_config`` /
        ``ditar_config``)."""
        llm_cfg = LLMConfig.from_hf(config["llm_config"], **llm_overrides)
        vae_cfg = VAEConfig.from_reference(config["audio_tokenizer_config"])
        p = int(config["audio_tokenizer_config"].get("patch_size", 5))
        flow_kwargs = {"z_channels": vae_cfg.latent_dim, "llm_cond_dim": llm_cfg.width, **config["ditar_config"]}
        return cls(
            vae=vae_cfg,
            llm=llm_cfg,
            flow=FlowConfig.from_reference(flow_kwargs, patch_size=p),
            heads=HeadsConfig(semantic_dim=vae_cfg.unified_dim, llm_dim=llm_cfg.width, patch_size=p),
        )


def llm_module(cfg: UniAudioConfig) -> BailingMoeLM:
    return BailingMoeLM(cfg.llm)


def llm_vars(params) -> dict:
    return {"params": params["model"]}


def embed_tokens(params, cfg: UniAudioConfig, ids: jax.Array) -> jax.Array:
    """Word embeddings [B, S, D] of token ids [B, S]."""
    return llm_module(cfg).apply(llm_vars(params), ids, method=BailingMoeLM.embed_tokens)


def pool(params, cfg: UniAudioConfig, unified: jax.Array) -> jax.Array:
    """LinearPooling: unified embeddings [B, T, U] (T a multiple of p) -> [B, T/p, D]."""
    return cfg.heads.pooling().apply({"params": params["linear_proj_audio"]}, unified)


def audio_inputs(params, cfg: UniAudioConfig, latent: jax.Array, sem_cache: Optional[dict] = None, valid=None):
    """Latents [B, T, C] (T a multiple of p) -> (LLM inputs [B, T/p, D], unified [B, T, U], semantic cache).

    With ``sem_cache`` the semantic module continues its cache (prompt, then each generated patch)."""
    unified, sem_cache = vae.unified_embedding(params["audio"], cfg.vae, latent, sem_cache, valid)
    return pool(params, cfg, unified), unified, sem_cache


def stop_logits(params, cfg: UniAudioConfig, hidden: jax.Array) -> jax.Array:
    """Stop-head logits [..., 2] (float32) of final-normed LLM hiddens [..., D]."""
    return heads.StopHead().apply({"params": params["stop_head"]}, hidden)


def sample_patch(params, config: UniAudioConfig, key, cond, history, **sampler) -> jax.Array:
    """Next patch [N, p, C] from the flow head for LLM conditions [N, 1, D] and previous patches [N, p, C];
    ``sampler`` are :func:`unitok_jax.flow.sample` arguments (steps, cfg, sigma, temperature, sway, noises)."""
    return flow.sample(params["flowloss"], config.flow, key, cond, history, **sampler)


def splice_audio(embeds: jax.Array, audio: jax.Array, start: jax.Array) -> jax.Array:
    """Write audio inputs [B, P, D] into embeds [B, S, D] at positions start[b] .. start[b] + P - 1."""
    b, p = audio.shape[:2]
    idx = start[:, None] + jnp.arange(p)[None, :]
    return embeds.at[jnp.arange(b)[:, None], idx].set(audio.astype(embeds.dtype))


def splice_by_mask(embeds: jax.Array, pooled: jax.Array, mask: jax.Array) -> jax.Array:
    """Replace the embeddings [B, S, D] at ``mask`` [B, S] (the ``<audioPatch>`` positions) by the pooled patches
    [B, N, D], the j-th true position of a row taking its patch j (training and the ASR / edit prefill)."""
    idx = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, pooled.shape[1] - 1)
    gathered = jnp.take_along_axis(pooled, idx[:, :, None], axis=1)
    return jnp.where(mask[:, :, None], gathered.astype(embeds.dtype), embeds)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: UniAudioConfig, key: jax.Array) -> dict:
    """Random params of the whole model (plain arrays), each component from its own init: the VAE, the LLM
    (unboxed), the DiT, LinearPooling (its Linear zero-initialised, as for training from scratch) and the stop head.
    For tests, benchmarks and training from scratch; real weights come from :mod:`unitok_jax.convert`. One compiled
    program (run eagerly, each initialiser op would compile on its own: hundreds of small compiles)."""
    import flax.linen as nn

    from unitok_jax import llm

    k_vae, k_llm, k_flow, k_pool, k_stop = jax.random.split(key, 5)
    pool_in = jnp.zeros((1, cfg.patch_size, cfg.heads.semantic_dim), jnp.float32)
    return {
        "audio": vae.init_params(cfg.vae, k_vae),
        "model": nn.unbox(llm.init_params(cfg.llm, k_llm))["params"],
        "flowloss": flow.init_dit(cfg.flow, k_flow),
        "linear_proj_audio": nn.unbox(cfg.heads.pooling().init(k_pool, pool_in))["params"],
        "stop_head": nn.unbox(heads.StopHead().init(k_stop, jnp.zeros((1, cfg.llm.width), jnp.float32)))["params"],
    }


# ------------------------------------------------------------------------------------------------- dtype policy

ROUTER_PARAMS = ("gate", "image_gate", "audio_gate")  # the MoE router weights (leaves of ``moe``; not ``mlp/gate``)


def keeps_float32(path) -> bool:
    """Whether the param at ``path`` (a ``jax.tree_util`` key path or a tuple of names) stays float32 whatever the
    compute dtype: norm params (RMSNorm / LayerNorm scales and LayerNorm biases: any module named ``*norm``) and
    the MoE router weights (``gate`` / ``image_gate`` / ``audio_gate`` leaves)."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if any(n.endswith("norm") for n in names[:-1]):
        return True
    return bool(names) and names[-1] in ROUTER_PARAMS and len(names) >= 2 and names[-2] == "moe"


def param_dtypes(abstract_params, dtype=None):
    """The dtype each param is held in when the model is loaded for compute dtype ``dtype`` (DESIGN's policy):
    a tree like ``abstract_params`` (arrays or ShapeDtypeStructs of the whole UniAudio tree or any sub-tree) of
    numpy dtypes. ``dtype=None``: every param keeps its own dtype; otherwise floating params become ``dtype``
    except those :func:`keeps_float32` names (norms, router), which are float32. Non-floating leaves keep theirs.

    The one place this policy lives: conversion (``python -m unitok_jax.convert --dtype``) and
    :func:`unitok_jax.convert.load` (``dtype=``, cast while reading) both use it."""
    import numpy as np

    def one(path, x):
        own = np.dtype(x.dtype)
        if dtype is None or not jnp.issubdtype(own, jnp.floating):
            return own
        return np.dtype(np.float32) if keeps_float32(path) else np.dtype(jnp.dtype(dtype))

    return jax.tree_util.tree_map_with_path(one, abstract_params)
