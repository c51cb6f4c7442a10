"""Discriminators of the VAE stage (spec §7.1): a HiFi-GAN multi-period waveform discriminator (MPD) and a
multi-resolution STFT discriminator over log-magnitude spectrograms, as in X-Codec-2.0.

Flax Linen, functional params. Every sub-discriminator returns (logits, feature maps); :class:`Discriminators`
returns a flat list of logits and a list of feature-map lists, one per sub-discriminator, MPD first.
Layouts are NHWC: the MPD sees [B, L / p, p, 1]; the STFT discriminator sees [B, T, F, 1].
Weight/spectral norm is left out (plain convs).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from unitok_jax.training.vae_losses import stft_magnitude


@dataclasses.dataclass(frozen=True)
class DiscConfig:
    """Sizes of both discriminators. HiFi-GAN MPD: channels (32, 128, 512, 1024, 1024); use tiny ones on CPU."""

    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    mpd_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)
    mpd_kernel: int = 5
    mpd_stride: int = 3
    stft_resolutions: tuple[tuple[int, int], ...] = ((2048, 512), (1024, 256), (512, 128))  # (n_fft, hop)
    stft_channels: int = 32
    stft_layers: int = 4  # strided (over frequency) conv layers after the first one
    negative_slope: float = 0.1
    use_mpd: bool = True
    use_stft: bool = True

    def __post_init__(self):
        object.__setattr__(self, "periods", tuple(int(p) for p in self.periods))
        object.__setattr__(self, "mpd_channels", tuple(int(c) for c in self.mpd_channels))
        object.__setattr__(self, "stft_resolutions", tuple(tuple(int(v) for v in r) for r in self.stft_resolutions))
        if not (self.use_mpd and self.periods) and not (self.use_stft and self.stft_resolutions):
            raise ValueError("DiscConfig enables no discriminator: set use_mpd with periods or use_stft with "
                             "stft_resolutions")

    @classmethod
    def tiny(cls) -> DiscConfig:
        return cls(periods=(2, 3, 5), mpd_channels=(4, 8, 16), stft_resolutions=((512, 128), (256, 64)),
                   stft_channels=4, stft_layers=2)

    @property
    def num_discriminators(self) -> int:
        return (len(self.periods) if self.use_mpd else 0) + (len(self.stft_resolutions) if self.use_stft else 0)


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN period discriminator: [B, L] -> reflect-pad to a multiple of p -> [B, L/p, p, 1] -> (k, 1) convs
    with stride (s, 1), leaky ReLU -> (3, 1) conv to 1024-ish channels -> (3, 1) conv to 1 logit channel."""

    period: int
    channels: tuple[int, ...]
    kernel: int = 5
    stride: int = 3
    negative_slope: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array):
        b, L = x.shape
        p = self.period
        if L % p:
            pad = p - L % p
            x = jnp.pad(x, ((0, 0), (0, pad)), mode="reflect" if pad < L else "constant")
        x = x.reshape(b, -1, p, 1).astype(jnp.float32)
        feats = []
        pad_k = (self.kernel - 1) // 2
        for i, c in enumerate(self.channels):
            stride = self.stride if i < len(self.channels) - 1 else 1
            x = nn.Conv(c, (self.kernel, 1), (stride, 1), padding=((pad_k, pad_k), (0, 0)), name=f"conv{i}")(x)
            x = nn.leaky_relu(x, self.negative_slope)
            feats.append(x)
        x = nn.Conv(1, (3, 1), padding=((1, 1), (0, 0)), name="post")(x)
        feats.append(x)
        return x.reshape(b, -1), feats


class STFTDiscriminator(nn.Module):
    """Log-magnitude STFT discriminator: [B, L] -> log|STFT| [B, T, F, 1] -> (3, 9) conv -> ``layers`` x (3, 9)
    convs with stride (1, 2) over frequency -> (3, 3) conv -> (3, 3) conv to 1 logit channel."""

    n_fft: int
    hop: int
    channels: int = 32
    layers: int = 4
    negative_slope: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array):
        b = x.shape[0]
        mag = stft_magnitude(x, self.n_fft, self.hop)
        h = jnp.log(jnp.maximum(mag, 1e-5))[..., None]  # [B, T, F, 1]
        feats = []
        h = nn.Conv(self.channels, (3, 9), padding="SAME", name="conv_in")(h)
        h = nn.leaky_relu(h, self.negative_slope)
        feats.append(h)
        for i in range(self.layers):
            h = nn.Conv(self.channels, (3, 9), (1, 2), padding="SAME", name=f"conv{i}")(h)
            h = nn.leaky_relu(h, self.negative_slope)
            feats.append(h)
        h = nn.Conv(self.channels, (3, 3), padding="SAME", name="conv_out")(h)
        h = nn.leaky_relu(h, self.negative_slope)
        feats.append(h)
        h = nn.Conv(1, (3, 3), padding="SAME", name="post")(h)
        feats.append(h)
        return h.reshape(b, -1), feats


class Discriminators(nn.Module):
    """All sub-discriminators. [B, L] waveform -> (list of logits [B, N_i], list of feature-map lists)."""

    cfg: DiscConfig

    @nn.compact
    def __call__(self, x: jax.Array):
        cfg = self.cfg
        logits, feats = [], []
        if cfg.use_mpd:
            for p in cfg.periods:
                lg, fm = PeriodDiscriminator(p, cfg.mpd_channels, cfg.mpd_kernel, cfg.mpd_stride,
                                             cfg.negative_slope, name=f"mpd_{p}")(x)
                logits.append(lg)
                feats.append(fm)
        if cfg.use_stft:
            for n_fft, hop in cfg.stft_resolutions:
                lg, fm = STFTDiscriminator(n_fft, hop, cfg.stft_channels, cfg.stft_layers, cfg.negative_slope,
                                           name=f"stft_{n_fft}")(x)
                logits.append(lg)
                feats.append(fm)
        return logits, feats


def init_disc_params(cfg: DiscConfig, key: jax.Array, num_samples: int = 4096) -> dict:
    """Random discriminator params (conv weights do not depend on the waveform length)."""
    n = max([num_samples] + [2 * r[0] for r in cfg.stft_resolutions])
    return jax.jit(Discriminators(cfg).init)(key, jnp.zeros((1, n), jnp.float32))["params"]


def apply_discriminators(params: dict, cfg: DiscConfig, wave: jax.Array):
    """[B, L] -> (logits list, feature-map lists) with ``params`` from :func:`init_disc_params`."""
    return Discriminators(cfg).apply({"params": params}, wave)
