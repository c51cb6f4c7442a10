"""One pre-norm transformer stack, configurable to be any of the reference's backbones.

* Qwen2-style (VAE encoder/decoder): RMSNorm, q/k/v biases, rotate-half rotary, causal, SwiGLU, final RMSNorm,
  optional sliding window.
* Whisper-style (semantic module): LayerNorm, q/v/o biases (no k bias), interleaved rotary, causal, GELU MLP,
  final LayerNorm (``ln_post``).
* DiT blocks: RMSNorm, all biases, interleaved rotary, bidirectional, tanh-GELU MLP.

Layers are stacked with ``nn.scan`` (params carry a leading ``layers`` axis), which keeps compile time flat in the
depth. Models with a different block (the MoE LLM) pass their own ``block_cls`` with the same call signature.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from unitok_jax.nn import cache as kvcache
from unitok_jax.nn.attention import Attention
from unitok_jax.nn.mlp import MLP
from unitok_jax.nn.norms import make_norm
from unitok_jax.nn.rotary import rope_angles


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    width: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    mlp_kind: str = "swiglu"  # "swiglu" | "gelu" | "gelu_tanh"
    mlp_bias: bool = False
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    q_bias: bool = True
    k_bias: bool = True
    v_bias: bool = True
    o_bias: bool = False
    rope: Optional[str] = "half"  # "half" | "interleaved" | None
    rope_theta: float = 10000.0
    rope_heads: Optional[int] = None
    qk_norm: bool = False
    causal: bool = True
    # Keys visible to a query, its own included (a query at i sees j with i - window < j <= i). None = no window.
    sliding_window: Optional[int] = None
    # Layers with index >= window_from_layer use the window; earlier layers attend fully.
    window_from_layer: int = 0
    final_norm: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False
    # jax.nn.dot_product_attention's implementation: None (jax picks; XLA today), "xla", "cudnn" (GPU, bf16/fp16)
    attention_impl: Optional[str] = None
    # Dropout on the attention output (after ``o``) and on the MLP hidden activation (the DiT's placement). It is
    # only applied when ``deterministic`` is False (training); the defaults keep every stack dropout-free.
    dropout: float = 0.0
    deterministic: bool = True

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 key, got {self.sliding_window}")

    @property
    def windowed_layers(self) -> np.ndarray:
        """[L] bool: which layers use the sliding window."""
        flags = np.zeros((self.num_layers,), bool)
        if self.sliding_window is not None:
            flags[self.window_from_layer :] = True
        return flags


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x)). Scanned over layers by :class:`Stack`.

    A model whose blocks differ only in the feed-forward part (the MoE LLM) subclasses this and overrides
    :meth:`feed_forward` and :meth:`layer_output`."""

    cfg: TransformerConfig
    emit_hidden: bool = False
    # "mask": ``masks`` are (full, windowed) [B, 1, T, S] masks; "fused": ``masks`` is (key_valid [B, S] or None,)
    # and the causal flag / window come from the config (see :class:`Stack`)
    attn_mode: str = "mask"

    @nn.compact
    def __call__(self, x, masks, angles, cache_kv, slots, windowed, extra=None, layer=None):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if self.attn_mode == "fused":
            flags = cfg.windowed_layers
            mask_kw = dict(is_causal=cfg.causal, key_valid=masks[0],
                           window=cfg.sliding_window if flags.size and flags.all() else None)
        else:
            mask_kw = dict(mask=masks[0] if windowed is None else jnp.where(windowed, masks[1], masks[0]))
        h = make_norm(cfg.norm, cfg.norm_eps, "attn_norm", pdtype)(x)
        h, new_kv = Attention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            q_bias=cfg.q_bias,
            k_bias=cfg.k_bias,
            v_bias=cfg.v_bias,
            o_bias=cfg.o_bias,
            rope=cfg.rope,
            rope_heads=cfg.rope_heads,
            qk_norm=cfg.qk_norm,
            dtype=dtype,
            param_dtype=pdtype,
            implementation=getattr(cfg, "attention_impl", None),
            name="attn",
        )(h, angles=angles, cache_kv=cache_kv, slots=slots, **mask_kw)
        rate = getattr(cfg, "dropout", 0.0)
        deterministic = getattr(cfg, "deterministic", True) or rate == 0.0
        if not deterministic:
            h = nn.Dropout(rate)(h, deterministic=False)
        x = x + h
        h = make_norm(cfg.norm, cfg.norm_eps, "mlp_norm", pdtype)(x)
        y, aux = self.feed_forward(h, extra, deterministic, layer)
        x = x + y
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, (new_kv, self.layer_output(x, aux))

    def feed_forward(self, h, extra, deterministic: bool, layer=None):
        """The feed-forward part on the normed residual ``h`` [B, T, D] -> (output [B, T, D], aux for
        :meth:`layer_output`). ``extra``: the per-call inputs handed to every block (see :class:`Stack`);
        ``layer``: this block's index in its stack (int32 scalar, traced). The plain block uses neither."""
        del extra, layer
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        rate = getattr(cfg, "dropout", 0.0)
        mlp = MLP(cfg.mlp_dim, cfg.mlp_kind, cfg.mlp_bias, dtype=dtype, param_dtype=pdtype, dropout=rate, name="mlp")
        return mlp(h, deterministic=deterministic), None

    def layer_output(self, x, aux):
        """What the block emits for its layer (stacked over layers by :class:`Stack`): the residual stream ``x``
        after the block when ``emit_hidden``, else None."""
        del aux
        return x if self.emit_hidden else None


class Stack(nn.Module):
    """``num_layers`` blocks and an optional final norm.

    Call: ``x`` [B, T, D]; ``positions`` [B, T] (default ``0..T-1`` or continuing the cache); ``valid`` [B, T] bool
    (tokens that exist; default all); ``cache`` from :func:`init_cache` or None; ``angles`` [B, T, d/2] to override
    the rotary angles (e.g. multi-component rotary); ``extra``: any pytree handed unchanged to every block (e.g. a
    per-token modality mask for a custom block); ``segment_ids`` [B, T] int (packed rows, training only: with
    ``positions`` restarting per segment, a token attends only to keys of its own segment). Returns ``(y, new_cache,
    layer_outputs)`` where ``layer_outputs`` is whatever the blocks emit as their second output, stacked over
    layers: for :class:`Block`, [L, B, T, D] (the residual stream after each block) when ``emit_hidden`` else None.

    Custom blocks (``block_cls``, subclasses of :class:`Block`) are constructed as
    ``block_cls(cfg, emit_hidden=..., attn_mode=..., name=...)`` and called as
    ``block(x, masks, angles, cache_kv, slots, windowed, extra, layer) -> (x, (new_cache_kv, layer_output))``
    (``layer``: the block's index in the stack, which the MoE block uses to read its experts out of the stacked
    weights at inference); ``cfg``
    may be any frozen dataclass with the :class:`TransformerConfig` fields (e.g. a subclass adding MoE fields).
    """

    cfg: TransformerConfig
    block_cls: Any = Block
    emit_hidden: bool = False

    @nn.compact
    def __call__(self, x, positions=None, valid=None, cache=None, angles=None, extra=None, segment_ids=None):
        cfg = self.cfg
        b, t = x.shape[:2]
        if segment_ids is not None and (positions is None or cache is not None):
            raise ValueError("segment_ids (packed sequences) need explicit positions and no cache")
        explicit_positions = positions is not None
        if positions is None:
            positions = kvcache.default_positions(b, t, cache)
        if cache is not None:
            new_cache, slots = kvcache.advance(cache, positions, valid)
            k_pos = new_cache["pos"]
            cache_kv = {"k": cache["k"], "v": cache["v"]}
        else:
            new_cache, slots, cache_kv = None, None, None
            k_pos = positions if valid is None else jnp.where(valid, positions, -1)
        flags = cfg.windowed_layers
        need_mask = cfg.causal or cache is not None or valid is not None or flags.any()
        # Without a cache and at the default positions the masks are a causal flag, a window and the valid keys,
        # which jax.nn.dot_product_attention takes as such ("fused"). Explicit masks stay for caches (slots, ring
        # buffers), given positions, a window on only some layers (chosen per layer inside the scan) and a window
        # without causality: the call cannot express those.
        fused = (cache is None and not explicit_positions
                 and (not flags.any() or (flags.all() and cfg.causal)))
        attn_mode = "fused" if fused else "mask"
        if fused:
            masks, windowed = (valid,), None
        else:
            if need_mask:
                full = kvcache.position_mask(positions, k_pos, cfg.causal, None)
                win = kvcache.position_mask(positions, k_pos, cfg.causal, cfg.sliding_window) if flags.any() else None
                if segment_ids is not None:  # packed rows: a query sees only keys of its own segment
                    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
                    full = full & same
                    win = None if win is None else win & same
            else:
                full = win = None
            if flags.all() and flags.size:
                masks, windowed = (win, None), None
            elif flags.any():
                masks, windowed = (full, win), jnp.asarray(flags)
            else:
                masks, windowed = (full, None), None
        if angles is None and cfg.rope is not None:
            angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta)

        block = self.block_cls
        if cfg.remat:
            block = nn.remat(block, prevent_cse=False)
        scanned = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(
                nn.broadcast, nn.broadcast, 0, nn.broadcast, 0 if windowed is not None else nn.broadcast, nn.broadcast,
                0,
            ),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, (kv, layer_outputs) = scanned(cfg, emit_hidden=self.emit_hidden, attn_mode=attn_mode, name="layers")(
            x, masks, angles, cache_kv, slots, windowed, extra, jnp.arange(cfg.num_layers, dtype=jnp.int32)
        )
        if cache is not None:
            new_cache = {**new_cache, "k": kv["k"], "v": kv["v"]}
        if cfg.final_norm:
            x = make_norm(cfg.norm, cfg.norm_eps, "final_norm", jnp.dtype(cfg.param_dtype))(x)
        return x, new_cache, layer_outputs


def init_cache(cfg: TransformerConfig, batch: int, size: int, dtype: Any = None) -> dict:
    """An empty KV cache for a stack built from ``cfg`` (see :mod:`unitok_jax.nn.cache`)."""
    return kvcache.init_cache(
        cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(dtype or cfg.dtype)
    )
