"""Reference AudioVAE (MingTok-Audio) state dict -> our VAE params.

Reference names (relative to the VAE root, ``audio.`` in a full Ming-UniAudio checkpoint, nothing in a standalone
MingTok-Audio one): ``encoder.{fc1,fc2,fc3}``, ``encoder.encoder.*`` (Qwen2), ``decoder.{fc1,fc2,fc3}``,
``decoder.decoder.*`` (Qwen2), ``decoder.semantic_model.*`` (Whisper blocks), ``decoder.head.out``,
``decoder.head.istft.window``.
"""
from __future__ import annotations

import numpy as np

from unitok_jax.convert.common import ConversionError, Stacked, WeightReader, heads_in, heads_out, materialize
from unitok_jax.nn import TransformerConfig
from unitok_jax.vae import VAEConfig, hann_window

# Keys the reference saves but never uses (spec 2.2, 6.2).
VAE_UNUSED = (
    r"encoder\.norm\.(weight|bias)",
    r"encoder\.encoder\.embed_tokens\.weight",
    r"decoder\.decoder\.embed_tokens\.weight",
)


def qwen2_stack(r: WeightReader, root: str, c: TransformerConfig) -> dict:
    """A transformers Qwen2Model (``root.layers.{i}...``, ``root.norm``) -> our Stack params (``layers`` a lazy
    :class:`Stacked`, converted one layer at a time)."""
    D, N, K, d = c.width, c.num_heads, c.num_kv_heads, c.head_dim

    def layer(i):
        p = f"{root}.layers.{i}."
        return (
            {
                "attn_norm": {"scale": r.get(p + "input_layernorm.weight", (D,))},
                "attn": {
                    "q": heads_in(r, p + "self_attn.q_proj", D, N, d, True),
                    "k": heads_in(r, p + "self_attn.k_proj", D, K, d, True),
                    "v": heads_in(r, p + "self_attn.v_proj", D, K, d, True),
                    "o": heads_out(r, p + "self_attn.o_proj", N, d, D, False),
                },
                "mlp_norm": {"scale": r.get(p + "post_attention_layernorm.weight", (D,))},
                "mlp": {
                    "gate": r.linear(p + "mlp.gate_proj", D, c.mlp_dim, False),
                    "up": r.linear(p + "mlp.up_proj", D, c.mlp_dim, False),
                    "down": r.linear(p + "mlp.down_proj", c.mlp_dim, D, False),
                },
            }
        )

    return {"layers": Stacked(c.num_layers, layer), "final_norm": {"scale": r.get(f"{root}.norm.weight", (D,))}}


def whisper_stack(r: WeightReader, root: str, c: TransformerConfig) -> dict:
    """The semantic module (``root.blocks.{i}...``, ``root.ln_post``) -> our Stack params (``layers`` lazy)."""
    U, N, d, F = c.width, c.num_heads, c.head_dim, c.mlp_dim
    ln = lambda name: {"scale": r.get(f"{name}.weight", (U,)), "bias": r.get(f"{name}.bias", (U,))}  # noqa: E731

    def layer(i):
        p = f"{root}.blocks.{i}."
        return (
            {
                "attn_norm": ln(p + "attn_ln"),
                "attn": {
                    "q": heads_in(r, p + "attn.query", U, N, d, True),
                    "k": heads_in(r, p + "attn.key", U, N, d, False),
                    "v": heads_in(r, p + "attn.value", U, N, d, True),
                    "o": heads_out(r, p + "attn.out", N, d, U, True),
                },
                "mlp_norm": ln(p + "mlp_ln"),
                "mlp": {"fc1": r.linear(p + "mlp.0", U, F, True), "fc2": r.linear(p + "mlp.2", F, U, True)},
            }
        )

    return {"layers": Stacked(c.num_layers, layer), "final_norm": ln(f"{root}.ln_post")}


def vae_config(vae_kwargs: dict, source: str = "checkpoint") -> VAEConfig:
    try:
        return VAEConfig.from_reference(vae_kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise ConversionError(f"{source}: invalid AudioVAE config: {e}") from e


def convert_vae(weights, vae_kwargs: dict, prefix: str = "", source: str = "checkpoint", strict: bool = True):
    """(our VAEConfig, params) from a reference state dict and its ``AudioVAEconfig`` kwargs.

    ``prefix``: where the VAE lives in ``weights`` (``"audio."`` in a full checkpoint). Raises
    :class:`ConversionError` naming the key for missing, mis-shaped or (``strict``) unexpected tensors.
    """
    cfg = vae_config(vae_kwargs, source)
    r = WeightReader(weights, prefix, source)
    params = materialize(vae_tree(r, cfg))
    if strict:
        r.finish(VAE_UNUSED)
    return cfg, params


def vae_tree(r: WeightReader, cfg: VAEConfig) -> dict:
    """The VAE params read through ``r`` (its prefix: where the VAE lives), the layer stacks lazy
    (:class:`Stacked`); checks the ISTFT window buffer."""
    e, dcfg = cfg.encoder, cfg.decoder
    C, U = cfg.latent_dim, cfg.unified_dim
    params = {
        "encoder": {
            "fc1": r.linear("encoder.fc1", cfg.input_dim, e.width, False),
            "fc2": r.linear("encoder.fc2", e.width, e.width, True),
            "backbone": qwen2_stack(r, "encoder.encoder", e),
            "fc3": r.linear("encoder.fc3", e.width, 2 * C, True),
        },
        "decoder": {
            "fc1": r.linear("decoder.fc1", C, dcfg.width, True),
            "fc2": r.linear("decoder.fc2", dcfg.width, U, True),
            "fc3": r.linear("decoder.fc3", U, dcfg.width, True),
            "semantic": whisper_stack(r, "decoder.semantic_model", cfg.semantic),
            "backbone": qwen2_stack(r, "decoder.decoder", dcfg),
            "head": r.linear("decoder.head.out", dcfg.width, cfg.n_fft + 2, True),
        },
    }
    if r.has("decoder.head.istft.window"):
        window = r.get("decoder.head.istft.window", (cfg.n_fft,))
        if not np.allclose(window, hann_window(cfg.n_fft), atol=1e-6):
            raise ConversionError(
                f"{r.source}: {r.prefix}decoder.head.istft.window is not a periodic Hann window of length {cfg.n_fft}"
            )
    return params
