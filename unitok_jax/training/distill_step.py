"""Tokenizer stage S1: semantic distillation (spec §7.1).

The semantic path of the decoder (``fc2`` + the Whisper-style semantic stack) learns to reproduce a teacher's
features (the reference: Whisper-large-v3's encoder output on the same audio) from the frozen encoder's latents:

    z = encode(wave) (posterior sample, frozen)      Z_uni = semantic(fc2(GELU(fc1(z))))
    loss = mean over valid frames and channels of (Z_uni - teacher)^2

The teacher features come from disk (``unitok_jax.data.pipeline.vae_batches(teacher_key=...)``), one row per
50 Hz latent frame: row ``i`` describes samples ``[hop * i, hop * (i + 1))``. A frame counts when it is inside
both the audio (``lengths``) and the teacher rows of that crop (``teacher_frames``).

    state = init_distill_state(cfg, vae_params, opt_cfg, key)
    step = jax.jit(distill_train_step, static_argnums=(2, 3), donate_argnums=0)
    state, metrics = step(state, {"wave", "lengths", "teacher" [B, F, U], "teacher_frames" [B]}, cfg, opt_cfg)

Only the ``trainable`` prefixes move (``fc1`` is shared with the low-level reconstruction path and stays frozen,
so S0's reconstructions are unchanged). There is no discriminator. A step whose loss or gradients are not finite
keeps params and optimizer state and reports ``skipped = 1``, as in S0.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from unitok_jax import vae
from unitok_jax.training.trees import all_finite, update_if
from unitok_jax.training.vae_step import OptConfig, gen_optimizer, trainable_labels

S1_TRAINABLE = ("decoder/fc2", "decoder/semantic")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Static settings of the S1 step (hashable: a static jit argument). ``trainable``: '/'-joined param-path
    prefixes the optimiser updates; ``sample_posterior``: feed posterior samples (as the LLM stage does) rather
    than the mean."""

    vae: vae.VAEConfig
    trainable: tuple[str, ...] = S1_TRAINABLE
    sample_posterior: bool = True

    def __post_init__(self):
        object.__setattr__(self, "trainable", tuple(self.trainable))


def init_distill_state(cfg: DistillConfig, vae_params, opt_cfg: OptConfig, key: jax.Array) -> dict:
    """-> {step, gen_params, gen_opt_state, rng, num_skipped} (one jitted program, so ``jax.eval_shape`` gives the
    abstract state). ``vae_params`` are copied (a donating step never deletes the caller's arrays)."""
    labels = trainable_labels(vae_params, cfg.trainable)
    if not any(v == "train" for v in jax.tree_util.tree_leaves(labels)):
        raise ValueError(f"no VAE param matches the trainable prefixes {cfg.trainable}")
    return _init_state(cfg, vae_params, opt_cfg, key)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_state(cfg, vae_params, opt_cfg, key):
    vae_params = jax.tree_util.tree_map(jnp.copy, vae_params)
    return {"step": jnp.zeros((), jnp.int32), "gen_params": vae_params,
            "gen_opt_state": gen_optimizer(cfg, opt_cfg).init(vae_params), "rng": key,
            "num_skipped": jnp.zeros((), jnp.int32)}


def distill_loss(params, cfg: DistillConfig, wave, lengths, teacher, teacher_frames, key):
    """(MSE, metrics) of the unified embedding against the teacher features over the valid frames.

    wave [B, L], lengths [B], teacher [B, F, U] (float), teacher_frames [B] (valid teacher rows). The encoder's
    output is a constant (stop_gradient): only the semantic path receives gradients."""
    if teacher.shape[-1] != cfg.vae.unified_dim:
        raise ValueError(f"teacher features have {teacher.shape[-1]} channels; the semantic module emits "
                         f"{cfg.vae.unified_dim}")
    enc = vae.encode(params, cfg.vae, wave, lengths, key=key, sample=cfg.sample_posterior)
    z = jax.lax.stop_gradient(enc.latent)
    uni, _ = vae.unified_embedding(params, cfg.vae, z)
    f = min(uni.shape[1], teacher.shape[1])
    uni, tgt = uni[:, :f].astype(jnp.float32), teacher[:, :f].astype(jnp.float32)
    valid = jnp.minimum(enc.frame_num, teacher_frames.astype(jnp.int32))
    mask = (jnp.arange(f)[None, :] < valid[:, None]).astype(jnp.float32)  # [B, F]
    count = jnp.maximum(jnp.sum(mask), 1.0)
    mse = jnp.sum(jnp.mean(jnp.square(uni - tgt), axis=-1) * mask) / count
    cos = jnp.sum(jnp.sum(uni * tgt, -1) / (jnp.linalg.norm(uni, axis=-1) * jnp.linalg.norm(tgt, axis=-1) + 1e-8)
                  * mask) / count
    return mse, {"distill_mse": mse, "distill_cos": cos, "distill_frames": jnp.sum(mask)}


def distill_train_step(state: dict, batch: dict, cfg: DistillConfig, opt_cfg: OptConfig):
    """One S1 update. ``batch``: {"wave" [B, L], "lengths" [B], "teacher" [B, F, U], "teacher_frames" [B]}.
    Returns (new state, metrics: loss, distill_mse, distill_cos, distill_frames, grad_norm_g, skipped)."""
    wave = batch["wave"].astype(jnp.float32)
    lengths = batch["lengths"].astype(jnp.int32)
    rng, k_post = jax.random.split(state["rng"])
    (loss, parts), grads = jax.value_and_grad(distill_loss, has_aux=True)(
        state["gen_params"], cfg, wave, lengths, batch["teacher"], batch["teacher_frames"], k_post)
    labels = trainable_labels(state["gen_params"], cfg.trainable)
    grads = jax.tree_util.tree_map(lambda g, lab: g if lab == "train" else jnp.zeros_like(g), grads, labels)
    ok = all_finite(loss, grads)

    def update():
        updates, opt_state = gen_optimizer(cfg, opt_cfg).update(grads, state["gen_opt_state"], state["gen_params"])
        return optax.apply_updates(state["gen_params"], updates), opt_state

    params, opt_state = update_if(ok, update, (state["gen_params"], state["gen_opt_state"]))
    new_state = {"step": state["step"] + 1, "gen_params": params, "gen_opt_state": opt_state, "rng": rng,
                 "num_skipped": state["num_skipped"] + (1 - ok.astype(jnp.int32))}
    metrics = {"loss": loss, **parts, "grad_norm_g": optax.tree.norm(grads), "skipped": 1 - ok.astype(jnp.int32)}
    return new_state, metrics
