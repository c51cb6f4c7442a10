"""The BailingMoE language model (spec §3): embeddings, causal GQA attention with RoPE (1-D or "3D"), MoE blocks
(optionally preceded by ``first_k_dense_replace`` dense layers), final RMSNorm and an LM head with float32 logits.

Layers run through :class:`unitok_jax.nn.Stack` (scanned, params with a leading ``layers`` axis) with the shared
attention (:class:`~unitok_jax.nn.Attention`, mesh-safe :class:`~unitok_jax.nn.attention.Projection` kernels) and the
fixed-size KV cache of :mod:`unitok_jax.nn.cache`, so masks, positions and caches behave as everywhere else.

Params (under ``params``)::

    embed/embedding                 [V, D]
    dense/layers/...                [Ld, ...]  (only if first_k_dense_replace > 0: attention + mlp/{gate,up,down})
    moe/layers/attn_norm/scale      [Lm, D]
    moe/layers/attn/{q,k,v,o}       q kernel [Lm, D, N, d], k/v [Lm, D, K, d], o [Lm, N, d, D] (+ biases)
    moe/layers/mlp_norm/scale       [Lm, D]
    moe/layers/moe/gate             [Lm, D, E]  (+ audio_gate, image_gate with multi_gate)
    moe/layers/moe/wi_gate, wi_up   [Lm, E, D, F];  wo [Lm, E, F, D]
    moe/layers/moe/shared/{gate,up,down}/kernel   (shared experts, width num_shared_experts * F)
    final_norm/scale                [D]
    lm_head                         [D, V]  (absent with tie_word_embeddings; ``norm_head`` is folded in at load)

The KV cache is ``nn.cache``'s dict with ``k``/``v`` [L, B, S, K, d] over all L layers (dense layers first).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unitok_jax.moe import MoE
from unitok_jax.nn import cache as kvcache
from unitok_jax.nn.norms import RMSNorm
from unitok_jax.nn.rotary import mrope_angles, rope_angles
from unitok_jax.nn.transformer import Block, Stack, TransformerConfig

# The Ming-UniAudio LLM (spec §3.1; Ling-lite layout). Every value is overridden by the checkpoint's llm_config.
OFFICIAL_LLM_CONFIG: dict = {
    "vocab_size": 126464,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "hidden_act": "silu",
    "use_qkv_bias": False,
    "use_bias": False,
    "rms_norm_eps": 1e-6,
    "norm_head": False,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
    "rope_theta": 600000.0,
    "rope_scaling": {"type": "3D", "factor": None},
    "pad_token_id": 126081,
    "num_experts": 64,
    "num_shared_experts": 2,
    "num_experts_per_tok": 6,
    "norm_topk_prob": True,
    "moe_intermediate_size": 1408,
    "first_k_dense_replace": 0,
    "multi_gate": False,
}

# llm_config keys that do not change inference math (or are checked elsewhere).
_IGNORED_KEYS = {
    "embedding_dropout", "attention_dropout", "output_dropout", "initializer_range", "use_cache",
    "_attn_implementation", "architectures", "model_type", "torch_dtype", "transformers_version", "bos_token_id",
    "eos_token_id", "use_sliding_window", "sliding_window", "max_window_layers", "output_router_logits",
    "use_rmsnorm", "rope_interleave", "moe_router_topk_scaling_factor", "image_patch_token", "image_start_token",
    "video_start_token", "use_flash_attn", "_name_or_path", "use_grouped_gemm",
}


@dataclasses.dataclass(frozen=True)
class LLMConfig(TransformerConfig):
    """BailingMoE configuration: the :class:`TransformerConfig` fields (``width`` = hidden_size, ``num_layers`` =
    all layers, ``mlp_dim`` = intermediate_size of the dense layers) plus the MoE / LM fields below."""

    vocab_size: int = 0
    num_experts: Optional[int] = None  # None: every layer is dense
    num_experts_per_tok: int = 1
    num_shared_experts: Optional[int] = None
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    multi_gate: bool = False
    norm_head: bool = False  # reference flag; folded into lm_head by the converter (see apply_norm_head)
    tie_word_embeddings: bool = False
    rope_3d: bool = False  # rope_scaling {"type": "3D"}: positions [3, B, T]
    mrope_sections: Optional[tuple] = None  # frequency sections per component; default head_dim/2 * (1/4, 3/8, 3/8)
    max_position_embeddings: int = 32768
    pad_token_id: int = 0
    moe_impl: str = "auto"  # "auto" | "ragged" | "tiled" | "dense" (see unitok_jax.moe)
    moe_tile: Optional[int] = None
    expert_parallel: bool = True  # under a mesh whose rules shard "expert": shard_map expert parallelism
    # how expert parallelism moves tokens: "psum" (tokens on every expert device, partial outputs summed) or
    # "a2a" (only the routed rows sent to their experts' devices and back: unitok_jax.moe.expert_parallel_a2a_ffn)
    moe_dispatch: str = "psum"
    aux_loss_coef: float = 0.0  # load-balancing loss weight (off, as in the release)
    z_loss_coef: float = 0.0  # router z-loss weight (off)

    def __post_init__(self):
        super().__post_init__()
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if not 0 <= self.first_k_dense_replace <= self.num_layers:
            raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} not in [0, {self.num_layers}]")
        if self.num_experts is not None:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} not in [1, {self.num_experts}]")
            if self.moe_intermediate_size <= 0:
                raise ValueError("moe_intermediate_size must be positive for an MoE model")
        if self.rope_3d:
            sec = self.sections
            if sum(sec) != self.head_dim // 2:
                raise ValueError(f"mrope_sections {sec} must sum to head_dim/2 = {self.head_dim // 2}")

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers if self.num_experts is None else self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def shared_dim(self) -> Optional[int]:
        if not self.num_shared_experts:  # None, or 0 (the reference then builds a zero-width expert: output 0)
            return None
        return self.num_shared_experts * self.moe_intermediate_size

    @property
    def sections(self) -> tuple:
        if self.mrope_sections is not None:
            return tuple(self.mrope_sections)
        half = self.head_dim // 2
        s0 = half // 4
        return (s0, (half - s0) // 2, half - s0 - (half - s0) // 2)  # (16, 24, 24) for head_dim 128

    @classmethod
    def from_hf(cls, llm_config: Mapping[str, Any], **overrides) -> "LLMConfig":
        """Parse a reference ``llm_config`` (``BailingMoeConfig`` kwargs / config.json). Unknown keys are ignored with a warning; ``overrides`` set our own fields (e.g. ``dtype="bfloat16"``,
        ``moe_impl="ragged"``)."""
        c = dict(llm_config)
        known = set(OFFICIAL_LLM_CONFIG) | _IGNORED_KEYS
        unknown = sorted(k for k in c if k not in known)
        if unknown:
            warnings.warn(f"llm_config keys ignored (unknown to this implementation): {unknown}", stacklevel=2)
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"llm_config hidden_act={act!r}; only 'silu' (SwiGLU) is implemented")
        rs = c.get("rope_scaling")
        if rs is None:
            rope_3d = False
        elif isinstance(rs, Mapping) and rs.get("type") == "3D":
            rope_3d = True
        else:
            raise ValueError(f"llm_config rope_scaling={rs!r}: only null (1-D) and {{'type': '3D'}} are supported")
        heads = c.get("num_attention_heads", 16)
        hidden = c["hidden_size"]
        head_dim = c.get("head_dim") or hidden // heads
        use_qkv_bias = bool(c.get("use_qkv_bias", False))
        kw = dict(
            width=hidden,
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            mlp_dim=c.get("intermediate_size", 4 * hidden),
            mlp_kind="swiglu",
            mlp_bias=False,
            norm="rms",
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            q_bias=use_qkv_bias,
            k_bias=use_qkv_bias,
            v_bias=use_qkv_bias,
            o_bias=bool(c.get("use_bias", True)),  # class default of use_bias is True (spec §3.3)
            rope="half",
            rope_theta=float(c.get("rope_theta", 10000.0)),
            causal=True,
            final_norm=False,
            vocab_size=c["vocab_size"],
            num_experts=c.get("num_experts"),
            num_experts_per_tok=c.get("num_experts_per_tok", 1),
            num_shared_experts=c.get("num_shared_experts"),
            moe_intermediate_size=c.get("moe_intermediate_size", 0) or 0,
            first_k_dense_replace=c.get("first_k_dense_replace", 0) or 0,
            norm_topk_prob=bool(c.get("norm_topk_prob", True)),
            multi_gate=bool(c.get("multi_gate", False)),
            norm_head=bool(c.get("norm_head", False)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            rope_3d=rope_3d,
            max_position_embeddings=c.get("max_position_embeddings", 32768),
            pad_token_id=c.get("pad_token_id", 0) or 0,
        )
        kw.update(overrides)
        return cls(**kw)


# --------------------------------------------------------------------------------------------- rotary helpers


def get_rope_index(attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reference ``get_rope_index`` for text/audio input (no vision grids).

    attention_mask [B, S] (1 = token) -> position_ids [3, B, S] (cumsum(mask) - 1, padding positions set to 1,
    replicated over the 3 components) and rope_deltas [B, 1] = max(position) + 1 - S."""
    m = attention_mask.astype(jnp.int32)
    pos = jnp.cumsum(m, axis=-1) - 1
    pos = jnp.where(m == 0, 1, pos)
    deltas = jnp.max(pos, axis=-1, keepdims=True) + 1 - m.shape[-1]
    return jnp.broadcast_to(pos[None], (3,) + pos.shape), deltas


# ----------------------------------------------------------------------------------------------------- blocks


class LLMBlock(Block):
    """Pre-norm residual block (:class:`unitok_jax.nn.transformer.Block`): x + attn(norm(x)); x + mlp(norm(x)), the
    MLP being the MoE (``use_moe``) or, for the first ``first_k_dense_replace`` layers, the block's SwiGLU MLP of
    width ``mlp_dim``. Scanned by :class:`Stack`.

    ``extra`` = {"audio_mask", "image_mask", "valid"} (any may be None). MoE layers emit per layer: ``counts``
    [E], ``aux_loss``, ``z_loss``, and with ``emit_hidden`` also ``hidden`` [B, T, D], ``router_logits``,
    ``topk_idx``, ``topk_weight``; dense layers emit ``hidden`` [B, T, D] (or None)."""

    cfg: LLMConfig
    use_moe: bool = True

    def feed_forward(self, h, extra, deterministic: bool, layer=None):
        if not self.use_moe:
            return super().feed_forward(h, extra, deterministic, layer)
        cfg = self.cfg
        extra = extra or {}
        stacked = extra.get("experts")
        y, info = MoE(
            num_experts=cfg.num_experts,
            top_k=cfg.num_experts_per_tok,
            expert_dim=cfg.moe_intermediate_size,
            shared_dim=cfg.shared_dim,
            norm_topk_prob=cfg.norm_topk_prob,
            multi_gate=cfg.multi_gate,
            impl=cfg.moe_impl,
            tile=cfg.moe_tile,
            expert_parallel=cfg.expert_parallel,
            dispatch=cfg.moe_dispatch,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            name="moe",
        )(h, audio_mask=extra.get("audio_mask"), image_mask=extra.get("image_mask"), valid=extra.get("valid"),
          stacked=None if stacked is None or layer is None else (*stacked, layer))
        return y, info

    def layer_output(self, x, info):
        if info is None:  # a dense layer
            return super().layer_output(x, info)
        out = {k: info[k] for k in ("counts", "aux_loss", "z_loss")}
        if self.emit_hidden:
            out.update(hidden=x, **{k: info[k] for k in ("router_logits", "topk_idx", "topk_weight")})
        return out


class DenseLLMBlock(LLMBlock):
    """The first ``first_k_dense_replace`` layers: :class:`LLMBlock` with a dense SwiGLU MLP."""

    use_moe: bool = False


# ------------------------------------------------------------------------------------------------------ model


class BailingMoeLM(nn.Module):
    """BailingMoE causal LM.

    Call with ``input_ids`` [B, T] or ``inputs_embeds`` [B, T, D] (exactly one), and optionally:

    * ``positions`` [B, T]: sequence positions (cache slots and the causal mask); default ``0..T-1`` continuing at
      the cache length. ``valid`` [B, T] bool: tokens that exist (right padding: false); invalid tokens are never
      attended to and do not advance the cache length.
    * ``rope_positions``: [B, T] or, with ``rope_3d``, [3, B, T]; default = ``positions`` (for text and audio the
      three rows are equal and 3D RoPE equals 1-D RoPE).
    * ``cache`` from :func:`init_cache` (returned updated as ``out["cache"]``).
    * ``audio_mask`` / ``image_mask`` [B, T] bool: route those tokens with ``audio_gate`` / ``image_gate``
      (``multi_gate`` configs).
    * ``logits_index`` [B] int: compute logits only at that position of each row (-> [B, 1, V]).
    * ``segment_ids`` [B, T] int with ``positions`` restarting per segment: packed training rows (each token
      attends within its own segment only; no cache).
    * ``output_router`` / ``output_hidden_states``: per-layer router choices / the reference's hidden-states tuple.
    * ``stacked_experts``: inference only (what :func:`prefill` / :func:`decode_step` pass): on CPU each MoE layer
      reads its routed experts out of the layer-stacked weights in place (:class:`unitok_jax.moe.MoE`).

    Returns a dict: ``logits`` [B, T, V] float32 (or None with ``return_logits=False``), ``hidden`` [B, T, D]
    (after the final norm), ``cache``, ``aux_loss`` (weighted by the config coefficients; 0 by default), ``moe``
    (per-MoE-layer ``counts`` [Lm, E], ``aux_loss`` [Lm], ``z_loss`` [Lm]), and on request ``router``
    (``router_logits`` [Lm, B, T, E], ``topk_idx``, ``topk_weight`` [Lm, B, T, k]) and ``hidden_states``
    [L + 1, B, T, D] (embeddings, the output of layers 0..L-2, then the final-normed output).
    """

    cfg: LLMConfig

    def setup(self):
        cfg = self.cfg
        pdtype = jnp.dtype(cfg.param_dtype)
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            param_dtype=pdtype,
            dtype=jnp.dtype(cfg.dtype),
        )
        # The blocks always emit their per-layer outputs (hidden, router choices); under jit the unused ones are
        # removed as dead code, so asking for them costs nothing when they are not returned.
        if cfg.num_dense_layers:
            dcfg = dataclasses.replace(cfg, num_layers=cfg.num_dense_layers, first_k_dense_replace=0, final_norm=False)
            self.dense = Stack(dcfg, DenseLLMBlock, emit_hidden=True)
        if cfg.num_moe_layers:
            mcfg = dataclasses.replace(cfg, num_layers=cfg.num_moe_layers, first_k_dense_replace=0, final_norm=False)
            self.moe = Stack(mcfg, LLMBlock, emit_hidden=True)
        self.final_norm = RMSNorm(cfg.norm_eps, param_dtype=pdtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab")),
                (cfg.width, cfg.vocab_size),
                pdtype,
            )

    def _stacks(self):
        cfg = self.cfg
        out = []
        if cfg.num_dense_layers:
            out.append(("dense", cfg.num_dense_layers, self.dense))
        if cfg.num_moe_layers:
            out.append(("moe", cfg.num_moe_layers, self.moe))
        return out

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Word embeddings [B, T, D] of ids [B, T] (``model.apply(params, ids, method="embed_tokens")``)."""
        return self.embed(input_ids)

    def head(self, h: jax.Array) -> jax.Array:
        """float32 logits [..., V] of final-normed hidden states [..., D] (float32 accumulation)."""
        dtype = jnp.dtype(self.cfg.dtype)
        w = self.embed.embedding.T if self.cfg.tie_word_embeddings else self.lm_head
        return jnp.einsum("...d,dv->...v", h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)

    def rotary(self, rope_positions: jax.Array) -> jax.Array:
        cfg = self.cfg
        if rope_positions.ndim == 3:
            if not cfg.rope_3d:
                raise ValueError("rope_positions [3, B, T] need a config with rope_3d (rope_scaling type 3D)")
            return mrope_angles(rope_positions, cfg.head_dim, cfg.rope_theta, cfg.sections)
        return rope_angles(rope_positions, cfg.head_dim, cfg.rope_theta)

    def __call__(
        self,
        input_ids=None,
        inputs_embeds=None,
        *,
        positions=None,
        rope_positions=None,
        valid=None,
        cache=None,
        audio_mask=None,
        image_mask=None,
        logits_index=None,
        return_logits: bool = True,
        output_router: bool = False,
        output_hidden_states: bool = False,
        segment_ids=None,
        stacked_experts: bool = False,
    ):
        cfg = self.cfg
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(cfg.dtype))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        b, t = x.shape[:2]
        # default positions without a cache: the stacks pass the causal mask to attention as a flag
        stack_positions = positions if positions is not None or cache is not None else None
        if positions is None:
            positions = kvcache.default_positions(b, t, cache)
        angles = self.rotary(positions if rope_positions is None else rope_positions)
        extra = {"audio_mask": audio_mask, "image_mask": image_mask, "valid": valid}
        if stacked_experts and cfg.num_moe_layers and not self.is_initializing():
            # inference: each MoE layer reads its routed experts out of the unsliced stack (see moe.MoE)
            w = self.variables["params"]["moe"]["layers"]["moe"]
            extra["experts"] = tuple(nn.meta.unbox(w[name]) for name in ("wi_gate", "wi_up", "wo"))

        layer_outs, kvs, new_cache, start = [], [], None, 0
        for name, n, stack in self._stacks():
            sub = None
            if cache is not None:
                sub = {**cache, "k": cache["k"][start : start + n], "v": cache["v"][start : start + n]}
            x, sub_new, lo = stack(x, positions=stack_positions, valid=valid, cache=sub, angles=angles, extra=extra,
                                  segment_ids=segment_ids)
            if cache is not None:
                kvs.append(sub_new)
                new_cache = sub_new
            layer_outs.append((name, lo))
            start += n
        if cache is not None and len(kvs) > 1:
            new_cache = {
                **new_cache,
                "k": jnp.concatenate([c["k"] for c in kvs], 0),
                "v": jnp.concatenate([c["v"] for c in kvs], 0),
            }
        h = self.final_norm(x)
        out = {"hidden": h, "cache": new_cache}
        if return_logits:
            hl = h if logits_index is None else jnp.take_along_axis(h, logits_index[:, None, None], axis=1)
            out["logits"] = nn.with_logical_constraint(self.head(hl), ("batch", "length", "vocab"))
        else:
            out["logits"] = None

        moe = dict(layer_outs).get("moe")
        if moe is not None:
            out["moe"] = {k: moe[k] for k in ("counts", "aux_loss", "z_loss")}
            out["aux_loss"] = cfg.aux_loss_coef * jnp.mean(moe["aux_loss"]) + cfg.z_loss_coef * jnp.mean(
                moe["z_loss"]
            )
            if output_router:
                out["router"] = {k: moe[k] for k in ("router_logits", "topk_idx", "topk_weight")}
        else:
            out["moe"], out["aux_loss"] = None, jnp.zeros((), jnp.float32)
        if output_hidden_states:
            per_layer = [lo if name == "dense" else lo["hidden"] for name, lo in layer_outs]
            emb = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(x.dtype)
            hs = jnp.concatenate([emb[None]] + per_layer, axis=0)  # [L + 1, ...]: emb, after layer 0..L-1
            out["hidden_states"] = jnp.concatenate([hs[:-1], h[None]], axis=0)
        return out


# -------------------------------------------------------------------------------------------------- utilities


def apply_norm_head(lm_head_vd: np.ndarray) -> np.ndarray:
    """The reference's ``norm_head``: W [V, D] / (L2 norm over the vocab axis + 1e-7), computed once (float32)."""
    w = np.asarray(lm_head_vd, np.float32)
    return (w / (np.linalg.norm(w, axis=0, keepdims=True) + np.float32(1e-7))).astype(np.float32)


def init_cache(cfg: LLMConfig, batch: int, size: int, dtype: Any = None) -> dict:
    """An empty KV cache for all ``cfg.num_layers`` layers (see :mod:`unitok_jax.nn.cache`)."""
    return kvcache.init_cache(
        cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(dtype or cfg.dtype)
    )


def init_params(cfg: LLMConfig, rng: jax.Array, batch: int = 1, length: int = 4) -> dict:
    """Unsharded random params (boxed with logical axis names; see :mod:`unitok_jax.sharding` for sharded init)."""
    return BailingMoeLM(cfg).init(rng, jnp.zeros((batch, length), jnp.int32))


def random_params(cfg: LLMConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Random host (numpy) params of the model's exact tree, without compiling anything (tests, benchmarks).

    Matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2), embeddings ~ N(0, 1)."""
    from unitok_jax.sharding import abstract_init

    boxed = abstract_init(BailingMoeLM(cfg), np.zeros((1, 1), np.int32))
    rng = np.random.default_rng(seed)
    fan_in = {"o": cfg.num_heads * cfg.head_dim, "wo": cfg.moe_intermediate_size}

    def make(path, leaf):
        shape = leaf.value.shape if hasattr(leaf, "value") else leaf.shape
        names = [getattr(k, "key", str(k)) for k in path]
        if names[-1] == "scale":
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
        if names[-1] == "bias":
            return (0.1 * rng.standard_normal(shape)).astype(dtype)
        if names[-1] == "embedding":
            return rng.standard_normal(shape).astype(dtype)
        fi = fan_in.get(names[-2] if names[-1] == "kernel" else names[-1])
        if names[-2:] == ["down", "kernel"]:
            fi = shape[-2]
        fi = fi or cfg.width
        return (rng.standard_normal(shape) / np.sqrt(fi)).astype(dtype)

    return jax.tree_util.tree_map_with_path(make, boxed, is_leaf=lambda x: hasattr(x, "value"))


def prefill(
    model: BailingMoeLM,
    params,
    cache: dict,
    *,
    input_ids=None,
    inputs_embeds=None,
    lengths=None,
    audio_mask=None,
    rope_positions=None,
    stacked_experts: bool = True,
):
    """Write right-padded prompts [B, T] (``lengths`` [B] valid tokens each; default all T) into ``cache``.

    Returns ``(logits [B, V] at each row's last valid token, hidden [B, D] there, cache)``. Works for an empty
    cache or to append a chunk to a non-empty one. ``stacked_experts``: see :class:`BailingMoeLM` (False: the
    per-layer expert params, as in training; same output)."""
    x = input_ids if input_ids is not None else inputs_embeds
    b, t = x.shape[:2]
    if lengths is None:
        lengths = jnp.full((b,), t, jnp.int32)
    valid = jnp.arange(t)[None, :] < lengths[:, None]
    out = model.apply(
        params,
        input_ids,
        inputs_embeds,
        valid=valid,
        cache=cache,
        audio_mask=audio_mask,
        rope_positions=rope_positions,
        logits_index=jnp.maximum(lengths - 1, 0),
        stacked_experts=stacked_experts,
    )
    last_h = jnp.take_along_axis(out["hidden"], jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return out["logits"][:, 0], last_h, out["cache"]


def decode_step(
    model: BailingMoeLM,
    params,
    cache: dict,
    *,
    input_ids=None,
    inputs_embeds=None,
    active=None,
    audio_mask=None,
    rope_offset=None,
    stacked_experts: bool = True,
):
    """One token per sequence: ``input_ids`` [B] (or [B, 1]) or ``inputs_embeds`` [B, 1, D] (e.g. a pooled audio
    patch). ``active`` [B] bool: rows that really take a step (others leave the cache unchanged). RoPE positions
    are the cache length (+ ``rope_offset`` [B], e.g. the reference's rope_deltas). Pure and shape-stable: usable
    inside ``lax.while_loop``. Returns ``(logits [B, V], hidden [B, D], cache)``. ``stacked_experts``: as
    :func:`prefill`."""
    if input_ids is not None and input_ids.ndim == 1:
        input_ids = input_ids[:, None]
    valid = None if active is None else active[:, None]
    positions = cache["length"][:, None]
    rope = positions if rope_offset is None else positions + rope_offset.reshape(-1, 1)
    out = model.apply(
        params,
        input_ids,
        inputs_embeds,
        positions=positions,
        rope_positions=rope,
        valid=valid,
        cache=cache,
        audio_mask=None if audio_mask is None else audio_mask.reshape(-1, 1),
        stacked_experts=stacked_experts,
    )
    return out["logits"][:, 0], out["hidden"][:, 0], out["cache"]


def pick_tokens(logits: jax.Array, temperature: float = 0.0, key: Optional[jax.Array] = None) -> jax.Array:
    """Next token ids [B] int32 from logits [B, V]: greedy (argmax) at ``temperature`` 0 (the ASR / edit loops of
    :mod:`unitok_jax.generate`), else a categorical draw from ``logits / temperature`` with ``key``."""
    if temperature > 0:
        if key is None:
            raise ValueError("pick_tokens: a temperature > 0 needs a PRNG key")
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def generate(
    model: BailingMoeLM,
    params,
    prompt_ids: jax.Array,
    lengths: jax.Array,
    max_new_tokens: int,
    *,
    eos_id: Optional[int] = None,
    cache_size: Optional[int] = None,
    temperature: float = 0.0,
    rng: Optional[jax.Array] = None,
):
    """Batched sampling (greedy when ``temperature == 0``) of right-padded prompts [B, T] with ``lengths`` [B].

    One prefill, then a ``lax.while_loop`` of :func:`decode_step` whose state is (step, tokens, cache, done, rng,
    last logits); it stops when every row has produced ``eos_id`` or after ``max_new_tokens``. Returns
    ``(tokens [B, max_new_tokens] (eos_id / pad after the end), num_generated [B])``."""
    cfg = model.cfg
    b, t = prompt_ids.shape
    size = cache_size or (t + max_new_tokens)
    cache = init_cache(cfg, b, size)
    logits, _, cache = prefill(model, params, cache, input_ids=prompt_ids, lengths=lengths)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    pad = cfg.pad_token_id if eos_id is None else eos_id

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, cache, done, rng, logits = state
        rng, key = jax.random.split(rng)
        tok = jnp.where(done, pad, pick_tokens(logits, temperature, key))
        tokens = tokens.at[:, step].set(tok)
        new_done = done if eos_id is None else done | (tok == eos_id)
        logits, _, cache = decode_step(model, params, cache, input_ids=tok, active=~done)
        return step + 1, tokens, cache, new_done, rng, logits

    tokens = jnp.full((b, max_new_tokens), pad, jnp.int32)
    done = jnp.zeros((b,), bool)
    state = (jnp.zeros((), jnp.int32), tokens, cache, done, rng, logits)
    _, tokens, cache, done, _, _ = jax.lax.while_loop(cond, body, state)
    num = cache["length"] - lengths
    return tokens, num
