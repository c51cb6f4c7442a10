"""Losses of the VAE (tokenizer) stage: multi-resolution log-mel L1, GAN losses, feature matching, the generator
total, and RAE-style noise augmentation of the decoder input. Spec: ``shared/spec/ARCHITECTURE.md`` §7.1, §7.4(a).

All functions are pure jnp (float32) and jit-friendly; configs are frozen dataclasses (hashable, pass as static).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unitok_jax.vae import hann_window

GAN_KINDS = ("hinge", "lsgan")
DEFAULT_WEIGHTS = (("mel", 15.0), ("adv", 1.0), ("fm", 1.0), ("kl", 1e-4))


@dataclasses.dataclass(frozen=True)
class MelLossConfig:
    """Multi-resolution log-mel L1. ``resolutions``: (n_fft, hop, n_mels) triples; the loss is their mean."""

    sample_rate: int = 16000
    resolutions: tuple[tuple[int, int, int], ...] = ((512, 128, 64), (1024, 256, 80), (2048, 512, 128))
    fmin: float = 0.0
    fmax: float | None = None  # None: sample_rate / 2
    log_floor: float = 1e-5  # log(max(mel, floor))

    def __post_init__(self):
        object.__setattr__(self, "resolutions", tuple(tuple(int(v) for v in r) for r in self.resolutions))
        for n_fft, hop, n_mels in self.resolutions:
            if n_fft <= 0 or hop <= 0 or n_mels <= 0 or hop > n_fft:
                raise ValueError(f"bad mel resolution (n_fft={n_fft}, hop={hop}, n_mels={n_mels}): "
                                 "need positive values with hop <= n_fft")


# ---------------------------------------------------------------------------------------------------------------
# STFT and mel


@functools.cache
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Slaney mel filterbank from librosa, transposed: [n_fft // 2 + 1, n_mels] float32 (computed once, cached)."""
    import librosa

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Empty filters detected" for very small n_fft
        fb = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    return np.ascontiguousarray(fb.T.astype(np.float32))


def frame_signal(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """Centred framing: [B, L] -> [B, T, n_fft], T = L // hop + 1; frame t covers samples
    [t*hop - n_fft/2, t*hop + n_fft/2) with zeros outside [0, L). Uses shifted block slices (no gather) when
    hop divides n_fft."""
    b, L = x.shape
    t = L // hop + 1
    half = n_fft // 2
    total = (t - 1) * hop + n_fft
    x = jnp.pad(x, ((0, 0), (half, max(total - L - half, 0))))[:, :total]
    if n_fft % hop == 0:
        r = n_fft // hop
        x = jnp.pad(x, ((0, 0), (0, (t + r - 1) * hop - total)))
        blocks = x.reshape(b, t + r - 1, hop)
        return jnp.concatenate([blocks[:, j : j + t] for j in range(r)], axis=-1)
    idx = np.arange(t)[:, None] * hop + np.arange(n_fft)[None, :]
    return x[:, idx]


def stft_magnitude(x: jax.Array, n_fft: int, hop: int, eps: float = 1e-9) -> jax.Array:
    """|STFT| with a periodic Hann window: [B, L] -> [B, T, n_fft // 2 + 1] (float32). ``eps`` inside the sqrt
    keeps the gradient finite at zero."""
    frames = frame_signal(x.astype(jnp.float32), n_fft, hop) * jnp.asarray(hann_window(n_fft))
    spec = jnp.fft.rfft(frames, axis=-1)
    return jnp.sqrt(jnp.square(spec.real) + jnp.square(spec.imag) + eps)


def stft_frame_mask(lengths: jax.Array, num_samples: int, hop: int) -> jax.Array:
    """[B] valid samples -> [B, T] bool: frame t (centred at t*hop) is valid when t*hop < length."""
    t = num_samples // hop + 1
    return (jnp.arange(t)[None, :] * hop) < lengths[:, None]


def log_mel(x: jax.Array, n_fft: int, hop: int, n_mels: int, cfg: MelLossConfig) -> jax.Array:
    """[B, L] -> log-mel [B, T, n_mels]: log(max(mel(|STFT|), floor))."""
    fb = jnp.asarray(mel_filterbank(cfg.sample_rate, n_fft, n_mels, cfg.fmin, cfg.fmax))
    mel = jnp.einsum("btf,fm->btm", stft_magnitude(x, n_fft, hop), fb, precision=jax.lax.Precision.HIGHEST)
    return jnp.log(jnp.maximum(mel, cfg.log_floor))


def mask_waveform(x: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Zero samples at or past each item's length: [B, L], [B] -> [B, L]."""
    if lengths is None:
        return x
    return jnp.where(jnp.arange(x.shape[1])[None, :] < lengths[:, None], x, 0.0)


def multi_resolution_mel_loss(real: jax.Array, fake: jax.Array, lengths: jax.Array | None = None,
                              cfg: MelLossConfig = MelLossConfig()) -> jax.Array:
    """Mean over resolutions of the L1 between log-mels of ``real`` and ``fake`` ([B, L] each, same shape).

    With ``lengths`` [B], samples past each item's length are zeroed in both signals and only frames centred
    inside the item count (mean over all valid frames of the batch and mel bins), so a padded batch gives the same
    value as its items cropped (for one item) and garbage in the padding never changes the loss.
    """
    if real.shape != fake.shape:
        raise ValueError(f"mel loss: real {real.shape} and fake {fake.shape} must have the same [B, L] shape")
    L = real.shape[1]
    real = mask_waveform(real.astype(jnp.float32), lengths)
    fake = mask_waveform(fake.astype(jnp.float32), lengths)
    total = jnp.zeros((), jnp.float32)
    for n_fft, hop, n_mels in cfg.resolutions:
        diff = jnp.abs(log_mel(real, n_fft, hop, n_mels, cfg) - log_mel(fake, n_fft, hop, n_mels, cfg))
        if lengths is None:
            total = total + jnp.mean(diff)
        else:
            m = stft_frame_mask(lengths, L, hop).astype(jnp.float32)
            total = total + jnp.sum(diff * m[..., None]) / jnp.maximum(jnp.sum(m) * n_mels, 1.0)
    return total / len(cfg.resolutions)


# ---------------------------------------------------------------------------------------------------------------
# GAN losses (summed over sub-discriminators)


def _check_kind(kind: str):
    if kind not in GAN_KINDS:
        raise ValueError(f"GAN loss kind {kind!r} is not one of {GAN_KINDS}")


def discriminator_loss(real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array], kind: str = "hinge"):
    """Discriminator loss, summed over sub-discriminators (each term a mean over its logits).

    hinge: relu(1 - D(real)) + relu(1 + D(fake)); lsgan: (1 - D(real))^2 + D(fake)^2.
    """
    _check_kind(kind)
    loss = jnp.zeros((), jnp.float32)
    for r, f in zip(real_logits, fake_logits, strict=True):
        r, f = r.astype(jnp.float32), f.astype(jnp.float32)
        if kind == "hinge":
            loss = loss + jnp.mean(jax.nn.relu(1.0 - r)) + jnp.mean(jax.nn.relu(1.0 + f))
        else:
            loss = loss + jnp.mean(jnp.square(1.0 - r)) + jnp.mean(jnp.square(f))
    return loss


def generator_adv_loss(fake_logits: Sequence[jax.Array], kind: str = "hinge") -> jax.Array:
    """Generator adversarial loss, summed over sub-discriminators. hinge: -D(fake); lsgan: (1 - D(fake))^2."""
    _check_kind(kind)
    loss = jnp.zeros((), jnp.float32)
    for f in fake_logits:
        f = f.astype(jnp.float32)
        loss = loss + (jnp.mean(-f) if kind == "hinge" else jnp.mean(jnp.square(1.0 - f)))
    return loss


def feature_matching_loss(real_feats: Sequence[Sequence[jax.Array]],
                          fake_feats: Sequence[Sequence[jax.Array]]) -> jax.Array:
    """L1 between discriminator feature maps: sum over sub-discriminators of the mean over layers of mean |r - f|.
    The real features are treated as constants (stop_gradient)."""
    loss = jnp.zeros((), jnp.float32)
    for rs, fs in zip(real_feats, fake_feats, strict=True):
        per = [jnp.mean(jnp.abs(jax.lax.stop_gradient(r).astype(jnp.float32) - f.astype(jnp.float32)))
               for r, f in zip(rs, fs, strict=True)]
        loss = loss + sum(per) / max(len(per), 1)
    return loss


def loss_weights(weights: Mapping[str, float] | Sequence[tuple[str, float]] | None = None) -> dict[str, float]:
    """Default generator weights {mel 15, adv 1, fm 1, kl 1e-4} updated with ``weights`` (dict or pairs)."""
    out = dict(DEFAULT_WEIGHTS)
    if weights is not None:
        given = dict(weights)
        unknown = set(given) - set(out)
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; expected some of {sorted(out)}")
        out.update({k: float(v) for k, v in given.items()})
    return out


def generator_loss(mel: jax.Array, adv: jax.Array, fm: jax.Array, kl: jax.Array,
                   weights: Mapping[str, float] | Sequence[tuple[str, float]] | None = None) -> jax.Array:
    """L_G = w_mel * mel + w_adv * adv + w_fm * fm + w_kl * KL (defaults 15, 1, 1, 1e-4; spec §7.1 S0)."""
    w = loss_weights(weights)
    return w["mel"] * mel + w["adv"] * adv + w["fm"] * fm + w["kl"] * kl


# ---------------------------------------------------------------------------------------------------------------
# RAE-style decoder-input noise augmentation (spec §7.4a)


def noise_augment(z: jax.Array, key: jax.Array, tau: float) -> jax.Array:
    """z~ = z + sigma * eps, sigma = tau * u, u ~ U(0, 1) drawn once per sample (leading axis), eps ~ N(0, I)
    (RAE's released code). ``tau`` may be a float or a traced scalar; tau = 0 returns z unchanged."""
    k_u, k_eps = jax.random.split(key)
    u = jax.random.uniform(k_u, (z.shape[0],) + (1,) * (z.ndim - 1), jnp.float32)
    eps = jax.random.normal(k_eps, z.shape, jnp.float32)
    return (z.astype(jnp.float32) + tau * u * eps).astype(z.dtype)
