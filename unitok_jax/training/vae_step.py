"""Train state and one alternating GAN update of the VAE stage (S0, plus the RAE-style decoder fine-tune, §7.4a).

    state = init_vae_train_state(cfg, vae_params, disc_cfg, opt_cfg, key)
    step = jax.jit(vae_train_step, static_argnums=(2, 3, 4), donate_argnums=0)
    state, metrics = step(state, {"wave": [B, L] f32, "lengths": [B] i32}, cfg, disc_cfg, opt_cfg)

One step: encode (posterior sample) -> optional noise augmentation of z -> decode (low-level path) = fake;
discriminator update on (real, stop_gradient(fake)); then generator update with the *updated* discriminator on
15·mel + adv + fm + 1e-4·KL (HiFi-GAN order). The generator forward runs once: its VJP is kept and pulled back
from d L_G / d(fake, KL). A step whose losses or gradients are not finite keeps params and optimizer states and
reports ``skipped = 1`` (``state["num_skipped"]`` counts them).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unitok_jax import vae
from unitok_jax.training import vae_losses as L
from unitok_jax.training.discriminators import (
    DiscConfig,
    apply_discriminators,
    init_disc_params,
)
from unitok_jax.training.trees import all_finite, label_tree, update_if

# S0 trains the encoder and the low-level decoder path; the semantic path (fc2, semantic stack, fc3) stays frozen.
S0_TRAINABLE = ("encoder", "decoder/fc1", "decoder/backbone", "decoder/head")
DECODER_ONLY = ("decoder/fc1", "decoder/backbone", "decoder/head")  # RAE-style decoder fine-tune (encoder frozen)


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    """Static settings of the VAE-stage step (hashable: pass as a static jit argument).

    weights: pairs or a dict of generator loss weights (mel, adv, fm, kl), stored as sorted pairs.
    noise_tau: RAE noise augmentation scale (0 disables). adv_start_step: steps of mel + KL only before the GAN
    terms (and discriminator updates) start. trainable: '/'-joined param-path prefixes the generator optimiser
    updates (others are frozen, no weight decay).
    """

    vae: vae.VAEConfig
    mel: L.MelLossConfig = dataclasses.field(default_factory=L.MelLossConfig)
    gan_loss: str = "hinge"  # "hinge" | "lsgan"
    weights: Any = L.DEFAULT_WEIGHTS
    noise_tau: float = 0.0
    sample_posterior: bool = True
    adv_start_step: int = 0
    trainable: tuple[str, ...] = S0_TRAINABLE

    def __post_init__(self):
        if self.gan_loss not in L.GAN_KINDS:
            raise ValueError(f"gan_loss={self.gan_loss!r} is not one of {L.GAN_KINDS}")
        object.__setattr__(self, "weights", tuple(sorted(L.loss_weights(self.weights).items())))
        object.__setattr__(self, "trainable", tuple(self.trainable))
        if self.noise_tau < 0:
            raise ValueError(f"noise_tau must be >= 0, got {self.noise_tau}")


@dataclasses.dataclass(frozen=True)
class OptConfig:
    """AdamW for generator and discriminator (HiFi-GAN betas by default), global-norm clipping; the lr is constant,
    or with ``decay_steps`` > 0 follows a cosine from ``lr`` to ``final_lr_ratio * lr`` over that many steps."""

    lr: float = 1e-4
    decay_steps: int = 0
    final_lr_ratio: float = 0.1
    disc_lr: float | None = None  # None: same as lr
    b1: float = 0.8
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0  # None: no clipping
    disc_clip_norm: float | None = 1.0


def _adamw(lr, opt: OptConfig, clip):
    if opt.decay_steps > 0:
        lr = optax.cosine_decay_schedule(lr, opt.decay_steps, alpha=opt.final_lr_ratio)
    chain = [] if clip is None else [optax.clip_by_global_norm(clip)]
    chain.append(optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay))
    return optax.chain(*chain)


def trainable_labels(params, prefixes: tuple[str, ...]):
    """Pytree of 'train' / 'freeze' labels: a leaf trains when its '/'-joined path starts with a prefix."""
    return label_tree(params, dict.fromkeys(prefixes, "train"), "freeze")


def gen_optimizer(cfg: VAETrainConfig, opt: OptConfig) -> optax.GradientTransformation:
    return optax.multi_transform({"train": _adamw(opt.lr, opt, opt.clip_norm), "freeze": optax.set_to_zero()},
                                 lambda p: trainable_labels(p, cfg.trainable))


def disc_optimizer(opt: OptConfig) -> optax.GradientTransformation:
    return _adamw(opt.lr if opt.disc_lr is None else opt.disc_lr, opt, opt.disc_clip_norm)


def init_vae_train_state(cfg: VAETrainConfig, vae_params, disc_cfg: DiscConfig, opt_cfg: OptConfig,
                         key: jax.Array) -> dict:
    """-> {step, gen_params, disc_params, gen_opt_state, disc_opt_state, rng, num_skipped}.

    Runs as one jitted program (cached per config), so ``jax.eval_shape`` gives the abstract state for sharding.
    ``vae_params`` are copied, so a step jitted with ``donate_argnums=0`` never deletes the caller's arrays."""
    labels = trainable_labels(vae_params, cfg.trainable)
    if not any(v == "train" for v in jax.tree_util.tree_leaves(labels)):
        raise ValueError(f"no VAE param matches the trainable prefixes {cfg.trainable}; top-level keys are "
                         f"{sorted(vae_params)}")
    return _init_state(cfg, vae_params, disc_cfg, opt_cfg, key)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_state(cfg, vae_params, disc_cfg, opt_cfg, key):
    k_d, k_rng = jax.random.split(key)
    vae_params = jax.tree_util.tree_map(jnp.copy, vae_params)
    disc_params = init_disc_params(disc_cfg, k_d)
    return {
        "step": jnp.zeros((), jnp.int32),
        "gen_params": vae_params,
        "disc_params": disc_params,
        "gen_opt_state": gen_optimizer(cfg, opt_cfg).init(vae_params),
        "disc_opt_state": disc_optimizer(opt_cfg).init(disc_params),
        "rng": k_rng,
        "num_skipped": jnp.zeros((), jnp.int32),
    }


def generator_forward(gen_params, cfg: VAETrainConfig, wave, lengths, key):
    """(real [B, L], lengths [B]) -> (fake [B, L] zero past lengths, KL over valid frames)."""
    k_post, k_noise = jax.random.split(key)
    n = wave.shape[1]
    enc = vae.encode(gen_params, cfg.vae, wave, lengths, key=k_post, sample=cfg.sample_posterior)
    z = enc.latent
    if cfg.noise_tau > 0:
        z = L.noise_augment(z, k_noise, cfg.noise_tau)
    fake = vae.decode(gen_params, cfg.vae, z, enc.frame_num)[:, :n]
    t = z.shape[1]
    frame_mask = jnp.arange(t)[None, :] < enc.frame_num[:, None]
    kl = vae.kl_divergence(vae.posterior(enc.posterior), frame_mask)
    return L.mask_waveform(fake, lengths), kl


def vae_train_step(state: dict, batch: dict, cfg: VAETrainConfig, disc_cfg: DiscConfig, opt_cfg: OptConfig,
                   gan: bool = True):
    """One alternating update. ``batch`` = {"wave": [B, L] float32, "lengths": [B] int32}. Returns
    (new state, metrics) with metrics: loss_d, loss_g, mel, adv, fm, kl, d_real, d_fake (mean logits),
    grad_norm_d, grad_norm_g (before clipping), skipped (0/1).

    ``gan`` (static) False: the mel + KL step of the steps before ``cfg.adv_start_step`` without the discriminators
    at all (their params and optimizer state pass through; their metrics are 0). With ``gan`` True the GAN terms
    are still masked before ``adv_start_step``, so either program gives the same generator update there; the
    training loop runs the lean one while the GAN is off (``vae_train.VAEStage``)."""
    wave = batch["wave"].astype(jnp.float32)
    b, n = wave.shape
    lengths = batch.get("lengths")
    lengths = jnp.full((b,), n, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    real = L.mask_waveform(wave, lengths)
    rng, k_fwd = jax.random.split(state["rng"])
    weights = dict(cfg.weights)
    if not gan:
        return _reconstruction_step(state, real, lengths, rng, k_fwd, cfg, opt_cfg, weights)
    gan_on = (state["step"] >= cfg.adv_start_step).astype(jnp.float32)

    (fake, kl), pullback = jax.vjp(lambda p: generator_forward(p, cfg, real, lengths, k_fwd), state["gen_params"])

    # --- discriminator step on (real, fake.detach)
    d_opt = disc_optimizer(opt_cfg)

    def d_loss_fn(dp):
        logits, _ = apply_discriminators(dp, disc_cfg, jnp.concatenate([real, jax.lax.stop_gradient(fake)]))
        r, f = [lg[:b] for lg in logits], [lg[b:] for lg in logits]
        loss = L.discriminator_loss(r, f, cfg.gan_loss)
        return loss, (jnp.mean(jnp.stack([jnp.mean(x) for x in r])), jnp.mean(jnp.stack([jnp.mean(x) for x in f])))

    (loss_d, (d_real, d_fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state["disc_params"])
    d_grads = jax.tree_util.tree_map(lambda g: g * gan_on, d_grads)

    def d_update():
        d_updates, d_opt_state = d_opt.update(d_grads, state["disc_opt_state"], state["disc_params"])
        return optax.apply_updates(state["disc_params"], d_updates), d_opt_state

    # before adv_start_step the discriminators stay as they are (one branch, no select over their leaves)
    disc_params, d_opt_state = update_if(gan_on > 0, d_update, (state["disc_params"], state["disc_opt_state"]))

    # --- generator step against the updated discriminator
    def g_loss_fn(fake_, kl_):
        mel = L.multi_resolution_mel_loss(real, fake_, lengths, cfg.mel)
        logits, feats = apply_discriminators(disc_params, disc_cfg, jnp.concatenate([real, fake_]))
        adv = L.generator_adv_loss([lg[b:] for lg in logits], cfg.gan_loss)
        fm = L.feature_matching_loss([[f[:b] for f in fs] for fs in feats], [[f[b:] for f in fs] for fs in feats])
        total = L.generator_loss(mel, gan_on * adv, gan_on * fm, kl_, weights)
        return total, {"mel": mel, "adv": adv, "fm": fm, "kl": kl_}

    (loss_g, parts), (g_fake, g_kl) = jax.value_and_grad(g_loss_fn, argnums=(0, 1), has_aux=True)(fake, kl)
    (g_grads,) = pullback((g_fake, g_kl))
    ok = all_finite(loss_d, loss_g, d_grads, g_grads)

    def update():
        g_updates, g_opt_state = gen_optimizer(cfg, opt_cfg).update(g_grads, state["gen_opt_state"],
                                                                    state["gen_params"])
        return optax.apply_updates(state["gen_params"], g_updates), disc_params, g_opt_state, d_opt_state

    gen_params, disc_params, g_opt_state, d_opt_state = update_if(
        ok, update, (state["gen_params"], state["disc_params"], state["gen_opt_state"], state["disc_opt_state"]))
    new_state = {
        "step": state["step"] + 1,
        "gen_params": gen_params,
        "disc_params": disc_params,
        "gen_opt_state": g_opt_state,
        "disc_opt_state": d_opt_state,
        "rng": rng,
        "num_skipped": state["num_skipped"] + (1 - ok.astype(jnp.int32)),
    }
    metrics = {
        "loss_d": loss_d, "loss_g": loss_g, **parts, "d_real": d_real, "d_fake": d_fake,
        "grad_norm_d": optax.tree.norm(d_grads), "grad_norm_g": optax.tree.norm(g_grads),
        "skipped": 1 - ok.astype(jnp.int32),
    }
    return new_state, metrics


def _reconstruction_step(state, real, lengths, rng, k_fwd, cfg: VAETrainConfig, opt_cfg: OptConfig, weights):
    """``vae_train_step`` with the GAN off: generator update on w_mel * mel + w_kl * KL only."""

    def loss_fn(gp):
        fake, kl = generator_forward(gp, cfg, real, lengths, k_fwd)
        mel = L.multi_resolution_mel_loss(real, fake, lengths, cfg.mel)
        zero = jnp.zeros((), jnp.float32)
        return L.generator_loss(mel, zero, zero, kl, weights), {"mel": mel, "kl": kl}

    (loss_g, parts), g_grads = jax.value_and_grad(loss_fn, has_aux=True)(state["gen_params"])
    ok = all_finite(loss_g, g_grads)

    def update():
        g_updates, g_opt_state = gen_optimizer(cfg, opt_cfg).update(g_grads, state["gen_opt_state"],
                                                                    state["gen_params"])
        return optax.apply_updates(state["gen_params"], g_updates), g_opt_state

    gen_params, g_opt_state = update_if(ok, update, (state["gen_params"], state["gen_opt_state"]))
    zero = jnp.zeros((), jnp.float32)
    new_state = {**state, "step": state["step"] + 1, "gen_params": gen_params, "gen_opt_state": g_opt_state,
                 "rng": rng, "num_skipped": state["num_skipped"] + (1 - ok.astype(jnp.int32))}
    metrics = {"loss_d": zero, "loss_g": loss_g, "mel": parts["mel"], "adv": zero, "fm": zero, "kl": parts["kl"],
               "d_real": zero, "d_fake": zero, "grad_norm_d": zero, "grad_norm_g": optax.tree.norm(g_grads),
               "skipped": 1 - ok.astype(jnp.int32)}
    return new_state, metrics
