"""AudioVAE (MingTok-Audio): 16 kHz waveform <-> 50 Hz, 64-dim continuous latents.

Encoder: frames [B, T, input_dim] -> fc1 (no bias) -> fc2 -> causal Qwen2-style stack -> fc3 -> posterior
parameters [B, T, 2C] (mean | pre-softplus scale). Decoder, low-level path (what the release's ``decode`` uses):
fc1 -> causal Qwen2-style stack -> ISTFT head. Semantic path: fc2(GELU(fc1(z))) -> causal Whisper-style stack ->
unified embedding [B, T, U] (the LLM's audio input). Full decoder path (training stage S2): ... -> fc3 -> stack ->
head. Spec: ``shared/spec/ARCHITECTURE.md`` section 2.

Every entry point is a pure function of ``(params, cfg, arrays...)`` and is jitted with ``cfg`` static.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unitok_jax.nn import Stack, TransformerConfig, cache_size_for, dense, init_cache

# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    encoder: TransformerConfig
    decoder: TransformerConfig
    semantic: TransformerConfig
    input_dim: int = 320  # samples per encoder frame
    hop: int = 320  # samples between frames (also the ISTFT hop)
    latent_dim: int = 64
    n_fft: int = 1280  # ISTFT size (4 * hop in the release)
    sample_rate: int = 16000

    def __post_init__(self):
        if self.n_fft % self.hop or (self.n_fft - self.hop) % 2:
            raise ValueError(f"n_fft={self.n_fft} must be a multiple of hop={self.hop} with an even overlap")

    @property
    def unified_dim(self) -> int:
        return self.semantic.width

    @property
    def overlap(self) -> int:
        """Overlap-add tail carried between streaming chunks: n_fft - hop samples."""
        return self.n_fft - self.hop

    @property
    def pad(self) -> int:
        """'same' padding trimmed from each end of the overlap-add: (n_fft - hop) / 2."""
        return (self.n_fft - self.hop) // 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        d = dict(d)
        for k in ("encoder", "decoder", "semantic"):
            d[k] = TransformerConfig(**d[k])
        return cls(**d)

    @classmethod
    def from_reference(cls, kwargs: dict, **overrides) -> "VAEConfig":
        """Build from the reference ``AudioVAEconfig`` kwargs (``audio_tokenizer_config`` of a full checkpoint)."""
        try:
            enc, dec = kwargs["enc_kwargs"], kwargs["dec_kwargs"]
            whisper = kwargs["semantic_module_kwargs"]["whisper_encoder"]
        except KeyError as e:
            raise ValueError(f"AudioVAE config lacks {e}: expected enc_kwargs, dec_kwargs, semantic_module_kwargs") from e
        hop = int(enc.get("hop_size", 320))
        dec_hop = int(dec.get("output_dim", hop))
        if int(enc.get("latent_dim", 64)) != int(dec.get("latent_dim", 64)):
            raise ValueError("enc_kwargs.latent_dim and dec_kwargs.latent_dim differ")
        return cls(
            encoder=qwen2_backbone(enc["backbone"], **overrides),
            decoder=qwen2_backbone(dec["backbone"], **overrides),
            semantic=whisper_backbone(whisper, **overrides),
            input_dim=int(enc.get("input_dim", 320)),
            hop=dec_hop,
            latent_dim=int(enc.get("latent_dim", 64)),
            n_fft=4 * dec_hop,
        )


def qwen2_backbone(b: dict, **overrides) -> TransformerConfig:
    """TransformerConfig of a transformers ``Qwen2Config`` dict (defaults as in transformers 4.52.4).

    Sliding window (spec 2.6): with the sdpa/eager backends (the default when ``_attn_implementation`` is absent)
    every layer sees ``sliding_window`` keys (i - W < j <= i); with flash-attention-2 only layers
    >= ``max_window_layers`` are windowed and they see W + 1 keys (i - W <= j <= i).
    """
    act = b.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"Qwen2 backbone hidden_act {act!r} is not supported (expected 'silu')")
    width = int(b["hidden_size"])
    heads = int(b["num_attention_heads"])
    window, from_layer = None, 0
    if b.get("use_sliding_window", False):
        w = int(b.get("sliding_window") or 4096)
        if b.get("_attn_implementation") == "flash_attention_2":
            window, from_layer = w + 1, int(b.get("max_window_layers", 28))
        else:
            window = w
    return TransformerConfig(
        width=width,
        num_layers=int(b["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(b.get("num_key_value_heads") or heads),
        head_dim=int(b.get("head_dim") or width // heads),
        mlp_dim=int(b["intermediate_size"]),
        mlp_kind="swiglu",
        norm="rms",
        norm_eps=float(b.get("rms_norm_eps", 1e-6)),
        q_bias=True,
        k_bias=True,
        v_bias=True,
        o_bias=False,
        rope="half",
        rope_theta=float(b.get("rope_theta", 10000.0)),
        causal=True,
        sliding_window=window,
        window_from_layer=from_layer,
        final_norm=True,
        **overrides,
    )


def whisper_backbone(w: dict, **overrides) -> TransformerConfig:
    """TransformerConfig of the semantic module (Whisper encoder blocks with interleaved rotary, causal)."""
    n_state, n_head = int(w["n_state"]), int(w["n_head"])
    if n_state % n_head:
        raise ValueError(f"semantic module n_state={n_state} is not divisible by n_head={n_head}")
    return TransformerConfig(
        width=n_state,
        num_layers=int(w["n_layer"]),
        num_heads=n_head,
        num_kv_heads=n_head,
        head_dim=n_state // n_head,
        mlp_dim=4 * n_state,
        mlp_kind="gelu",
        mlp_bias=True,
        norm="layer",
        norm_eps=1e-5,
        q_bias=True,
        k_bias=False,
        v_bias=True,
        o_bias=True,
        rope="interleaved",
        rope_theta=10000.0,
        causal=True,
        final_norm=True,
        **overrides,
    )


# ---------------------------------------------------------------------------------------------------------------
# Framing, posterior and the ISTFT head (pure jnp)


def num_frames(num_samples, hop: int):
    """Frames for ``num_samples`` samples: ceil(L / hop) (works on ints and integer arrays)."""
    if isinstance(num_samples, (int, np.integer)):
        return -(-int(num_samples) // hop)
    return (num_samples + hop - 1) // hop


def frame_waveform(wave: jax.Array, lengths: Optional[jax.Array], input_dim: int, hop: int) -> jax.Array:
    """[B, L] -> frames [B, T, input_dim], T = ceil(L / hop): right zero-pad to (T-1)*hop + input_dim samples and
    take windows of input_dim every hop. Samples at or beyond ``lengths`` are zeroed first."""
    b, L = wave.shape
    if lengths is not None:
        wave = jnp.where(jnp.arange(L)[None, :] < lengths[:, None], wave, 0)
    t = num_frames(L, hop)
    total = (t - 1) * hop + input_dim
    wave = jnp.pad(wave, ((0, 0), (0, max(total - L, 0))))[:, :total]
    if hop == input_dim:
        return wave.reshape(b, t, input_dim)
    idx = np.arange(t)[:, None] * hop + np.arange(input_dim)[None, :]
    return wave[:, idx]


class Posterior(NamedTuple):
    mean: jax.Array  # [B, T, C]
    std: jax.Array  # [B, T, C]


def posterior(params_2c: jax.Array) -> Posterior:
    """Diagonal Gaussian from [B, T, 2C]: mean = first C channels, std = softplus(last C) + 1e-4."""
    c = params_2c.shape[-1] // 2
    return Posterior(params_2c[..., :c], jax.nn.softplus(params_2c[..., c:]) + 1e-4)


def kl_divergence(post: Posterior, frame_mask: Optional[jax.Array] = None) -> jax.Array:
    """Oobleck KL (no 1/2 factor): sum over channels of mu^2 + sigma^2 - log sigma^2 - 1, mean over valid frames."""
    var = jnp.square(post.std.astype(jnp.float32))
    kl = jnp.sum(jnp.square(post.mean.astype(jnp.float32)) + var - jnp.log(var) - 1.0, axis=-1)
    if frame_mask is None:
        return jnp.mean(kl)
    m = frame_mask.astype(jnp.float32)
    return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window of length n (float32)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def istft_frames(x_pred: jax.Array, n_fft: int) -> jax.Array:
    """ISTFT-head output [B, T, n_fft + 2] (log-magnitudes | phases) -> windowed frames [B, T, n_fft] (float32).

    magnitude = min(exp(m), 100); spectrum = mag * (cos phi + i sin phi); inverse real FFT with 1/n normalisation
    (imaginary parts of the DC and Nyquist bins are ignored), times a periodic Hann window.
    """
    f = n_fft // 2 + 1
    x = x_pred.astype(jnp.float32)
    mag = jnp.minimum(jnp.exp(x[..., :f]), 100.0)
    phase = x[..., f:]
    spec = jax.lax.complex(mag * jnp.cos(phase), mag * jnp.sin(phase))
    return jnp.fft.irfft(spec, n=n_fft, axis=-1) * jnp.asarray(hann_window(n_fft))


def overlap_add(frames: jax.Array, hop: int) -> jax.Array:
    """[B, T, n] with n a multiple of hop -> [B, (T - 1) * hop + n]: sum of frames placed every hop samples.

    Written as n/hop shifted adds of hop-sized blocks (no scatter), which XLA fuses well.
    """
    b, t, n = frames.shape
    r = n // hop
    blocks = frames.reshape(b, t, r, hop)
    out = jnp.zeros((b, t + r - 1, hop), frames.dtype)
    for j in range(r):
        out = out.at[:, j : j + t].add(blocks[:, :, j])
    return out.reshape(b, (t + r - 1) * hop)


def _envelope(batch_mask: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """Overlap-added squared window for frames flagged in ``batch_mask`` [B or 1, T] -> [B or 1, (T-1)*hop+n]."""
    w2 = jnp.asarray(np.square(hann_window(n_fft)))
    return overlap_add(batch_mask[..., None].astype(jnp.float32) * w2, hop)


def _normalise(y: jax.Array, env: jax.Array) -> jax.Array:
    return jnp.where(env > 1e-11, y / jnp.where(env > 1e-11, env, 1.0), 0.0)


def istft(x_pred: jax.Array, hop: int, n_fft: int, frame_mask: Optional[jax.Array] = None) -> jax.Array:
    """Offline ISTFT head: [B, T, n_fft + 2] -> waveform [B, T * hop] ("same" padding).

    ``frame_mask`` [B, T] (optional) removes padding frames from both the signal and the envelope, so a padded
    batch decodes exactly like its items one by one.
    """
    b, t, _ = x_pred.shape
    frames = istft_frames(x_pred, n_fft)
    mask = jnp.ones((1, t), jnp.float32) if frame_mask is None else frame_mask.astype(jnp.float32)
    y = overlap_add(frames * mask[..., None], hop)
    env = _envelope(mask, n_fft, hop)
    pad = (n_fft - hop) // 2
    return _normalise(y[:, pad : pad + t * hop], env[:, pad : pad + t * hop])


# ---------------------------------------------------------------------------------------------------------------
# Modules


class Encoder(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, frames: jax.Array, cache: Optional[dict] = None):
        """Frames [B, T, input_dim] -> (posterior params [B, T, 2C], new encoder cache or None)."""
        c = self.cfg.encoder
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        h = dense(c.width, False, ("frame", "embed"), "fc1", dt, pdt)(frames.astype(dt))
        h = dense(c.width, True, ("embed_in", "embed"), "fc2", dt, pdt)(h)
        h, cache, _ = Stack(c, name="backbone")(h, cache=cache)
        self.sow("intermediates", "backbone_out", h)
        return dense(2 * self.cfg.latent_dim, True, ("embed", "latent2"), "fc3", dt, pdt)(h), cache


class Decoder(nn.Module):
    cfg: VAEConfig
    capture_layers: bool = False

    def setup(self):
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.decoder.dtype), jnp.dtype(cfg.decoder.param_dtype)
        sdt = jnp.dtype(cfg.semantic.dtype)
        hd, u = cfg.decoder.width, cfg.semantic.width
        self.fc1 = dense(hd, True, ("latent", "embed"), "fc1", dt, pdt)
        self.fc2 = dense(u, True, ("embed", "unified"), "fc2", sdt, pdt)
        self.fc3 = dense(hd, True, ("unified", "embed"), "fc3", dt, pdt)
        self.semantic = Stack(cfg.semantic, emit_hidden=self.capture_layers)
        self.backbone = Stack(cfg.decoder)
        self.head = dense(cfg.n_fft + 2, True, ("embed", "spectrum"), "head", jnp.float32, pdt)

    def unified(self, z, cache=None, valid=None, positions=None, segment_ids=None):
        """Latents [B, T, C] -> unified embedding [B, T, U] (and the new semantic cache). ``positions`` /
        ``segment_ids`` [B, T]: packed rows (each segment's frames attend within the segment, positions restarting
        per segment)."""
        h = self.fc2(jax.nn.gelu(self.fc1(z), approximate=False))
        self.sow("intermediates", "semantic_in", h)
        y, cache, layers = self.semantic(h, positions=positions, cache=cache, valid=valid, segment_ids=segment_ids)
        if self.capture_layers:
            self.sow("intermediates", "semantic_layers", layers)
        return y, cache

    def spectrum(self, z, cache=None, valid=None):
        """Low-level path: latents -> fc1 -> stack -> head output [B, T, n_fft + 2] (and the new decoder cache).
        ``valid`` [B, T]: real frames of a right-padded chunk (the cache advances by them only)."""
        h, cache, _ = self.backbone(self.fc1(z), cache=cache, valid=valid)
        self.sow("intermediates", "hidden", h)
        return self.head(h), cache

    def full_spectrum(self, z):
        """Full path: latents -> unified embedding -> fc3 -> stack -> head output; returns (x_pred, unified)."""
        emb, _ = self.unified(z)
        h, _, _ = self.backbone(self.fc3(emb))
        return self.head(h), emb

    def __call__(self, z):  # used by init: touches every parameter
        x, emb = self.full_spectrum(z)
        return x, self.spectrum(z)[0], emb


class AudioVAE(nn.Module):
    cfg: VAEConfig
    capture_layers: bool = False

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg, self.capture_layers)

    def __call__(self, frames):
        h, _ = self.encoder(frames)
        return self.decoder(h[..., : self.cfg.latent_dim])

    def encode_frames(self, frames, cache=None):
        return self.encoder(frames, cache)

    def unified(self, z, cache=None, valid=None, positions=None, segment_ids=None):
        return self.decoder.unified(z, cache, valid, positions, segment_ids)

    def spectrum(self, z, cache=None, valid=None):
        return self.decoder.spectrum(z, cache, valid)

    def full_spectrum(self, z):
        return self.decoder.full_spectrum(z)


# ---------------------------------------------------------------------------------------------------------------
# Params


def init_params(cfg: VAEConfig, key: jax.Array) -> dict:
    """Random params (plain arrays, no partitioning boxes)."""
    frames = jnp.zeros((1, 2, cfg.input_dim), jnp.float32)
    variables = jax.jit(AudioVAE(cfg).init)(key, frames)
    return nn.unbox(variables["params"])


def param_logical_axes(cfg: VAEConfig) -> Any:
    """Pytree of logical axis names (PartitionSpec of names) matching :func:`init_params`."""
    frames = jax.ShapeDtypeStruct((1, 2, cfg.input_dim), jnp.float32)
    abstract = jax.eval_shape(AudioVAE(cfg).init, jax.random.key(0), frames)
    return nn.get_partition_spec(abstract)["params"]


def _apply(params, cfg, method, *args, capture=False, **kwargs):
    model = AudioVAE(cfg, capture_layers=capture)
    if capture:
        return model.apply({"params": params}, *args, method=method, mutable=["intermediates"], **kwargs)
    return model.apply({"params": params}, *args, method=method, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Entry points


class Encoded(NamedTuple):
    posterior: jax.Array  # [B, T, 2C] mean | pre-softplus scale
    latent: jax.Array  # [B, T, C] sample (or the mean)
    mean: jax.Array  # [B, T, C]
    std: jax.Array  # [B, T, C]
    frame_num: jax.Array  # [B] int32 valid frames per item: ceil(length / input_dim)


@functools.partial(jax.jit, static_argnames=("cfg", "sample"))
def encode(
    params,
    cfg: VAEConfig,
    wave: jax.Array,
    lengths: Optional[jax.Array] = None,
    *,
    key: Optional[jax.Array] = None,
    noise: Optional[jax.Array] = None,
    sample: bool = True,
) -> Encoded:
    """Waveform [B, L] (16 kHz, right-padded; ``lengths`` [B] valid samples) -> :class:`Encoded`.

    ``sample=True`` (the reference's behaviour) draws latent = mean + std * eps with eps from ``noise`` [B, T, C]
    if given, else from ``key``; ``sample=False`` returns the mean. Causal: right padding never changes earlier
    frames.
    """
    b, L = wave.shape
    if lengths is None:
        lengths = jnp.full((b,), L, jnp.int32)
    frames = frame_waveform(wave.astype(jnp.float32), lengths, cfg.input_dim, cfg.hop)
    h = _apply(params, cfg, AudioVAE.encode_frames, frames)[0].astype(jnp.float32)
    return _finish_encode(h, lengths, cfg, key, noise, sample)


def _finish_encode(h, lengths, cfg, key, noise, sample) -> "Encoded":
    post = posterior(h)
    if sample:
        if noise is None:
            if key is None:
                raise ValueError("encode(sample=True) needs a PRNG `key` or explicit `noise`")
            noise = jax.random.normal(key, post.mean.shape, jnp.float32)
        latent = post.mean + post.std * noise
    else:
        latent = post.mean
    frame_num = num_frames(lengths.astype(jnp.int32), cfg.input_dim).astype(jnp.int32)
    return Encoded(h, latent, post.mean, post.std, frame_num)


def init_semantic_cache(cfg: VAEConfig, batch: int, max_frames: int) -> dict:
    """Empty KV cache for :func:`unified_embedding`, for up to ``max_frames`` frames per sequence."""
    return init_cache(cfg.semantic, batch, max_frames)


@functools.partial(jax.jit, static_argnames=("cfg",))
def unified_embedding(params, cfg: VAEConfig, latent: jax.Array, cache: Optional[dict] = None, valid=None,
                      positions=None, segment_ids=None):
    """Latents [B, T, C] -> (unified embedding [B, T, U], new cache or None).

    Whole-sequence with ``cache=None``; incremental when given a cache from :func:`init_semantic_cache` (chunks
    continue at the cache length; chunk-by-chunk equals whole-sequence). ``valid`` [B, T] marks real frames of a
    right-padded chunk. ``positions`` / ``segment_ids`` [B, T] (no cache): packed rows of several utterances, each
    computed as if alone.
    """
    emb, cache = _apply(params, cfg, AudioVAE.unified, latent, cache, valid, positions, segment_ids)
    return emb, cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode(params, cfg: VAEConfig, latent: jax.Array, frame_num: Optional[jax.Array] = None) -> jax.Array:
    """Latents [B, T, C] -> waveform [B, T * hop] through the low-level path (fc1 -> stack -> ISTFT head), as the
    release's ``decode``. ``frame_num`` [B] (optional) marks valid frames; samples past ``frame_num * hop`` are 0
    and padding frames do not leak into the overlap-add, so a padded batch equals its items one by one."""
    x_pred, _ = _apply(params, cfg, AudioVAE.spectrum, latent)
    t = latent.shape[1]
    mask = None if frame_num is None else jnp.arange(t)[None, :] < frame_num[:, None]
    wave = istft(x_pred, cfg.hop, cfg.n_fft, mask)
    if frame_num is not None:
        wave = jnp.where(jnp.arange(t * cfg.hop)[None, :] < (frame_num * cfg.hop)[:, None], wave, 0.0)
    return wave


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_full(params, cfg: VAEConfig, latent: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Full decoder path (training stage S2): latents -> unified embedding -> fc3 -> stack -> ISTFT head.
    Returns (waveform [B, T * hop], unified embedding [B, T, U])."""
    x_pred, emb = _apply(params, cfg, AudioVAE.full_spectrum, latent)
    return istft(x_pred, cfg.hop, cfg.n_fft), emb


# ---------------------------------------------------------------------------------------------------------------
# Streaming decode


@flax.struct.dataclass
class StreamState:
    """Explicit state of :func:`decode_stream` / :func:`decode_stream_rows`: the decoder KV cache and the
    overlap-add tails.

    ``audio_buf`` [B, n_fft - hop]: un-normalised signal tail; ``env_buf`` [1, n_fft - hop] (every row has the same
    frames, as the reference keeps it) or [B, n_fft - hop] (per row, :func:`decode_stream_rows`): envelope tail;
    ``first`` (static, :func:`decode_stream` only) is True until the first chunk has been decoded.
    """

    cache: dict
    audio_buf: jax.Array
    env_buf: jax.Array
    first: bool = flax.struct.field(pytree_node=False, default=True)


def init_stream_state(cfg: VAEConfig, batch: int, max_frames: int, max_chunk: int = 5, *,
                      rows: bool = False) -> StreamState:
    """Fresh streaming state for up to ``max_frames`` frames in chunks of at most ``max_chunk`` frames. With a
    sliding-window decoder the KV cache is a ring of ``window + max_chunk - 1`` slots (bounded memory). ``rows``:
    for :func:`decode_stream_rows` (a per-row envelope tail)."""
    size = cache_size_for(max_frames, cfg.decoder.sliding_window, max_chunk)
    if cfg.decoder.window_from_layer > 0:  # some layers attend fully: keep the whole history
        size = max_frames
    return StreamState(
        cache=init_cache(cfg.decoder, batch, size),
        audio_buf=jnp.zeros((batch, cfg.overlap), jnp.float32),
        env_buf=jnp.zeros((batch if rows else 1, cfg.overlap), jnp.float32),
        first=not rows,
    )


def _stream_chunk(params, cfg: VAEConfig, chunk, state: StreamState, valid=None):
    """The decoder on a chunk [B, T, C] continuing the cache (``valid`` [B] frames per row, default all T: the cache
    of row b advances by valid[b]), then the ISTFT frames overlap-added onto the tails. Frames past a row's valid
    count contribute nothing (masked), so a row's new tails sit at valid * hop. Returns (signal, envelope) [B,
    T * hop + overlap] (un-normalised, tails added), the new tails and the new cache."""
    b, t = chunk.shape[:2]
    ov = cfg.overlap
    mask = jnp.ones((1, t), jnp.float32) if valid is None else (jnp.arange(t)[None] < valid[:, None])
    frame_valid = None if valid is None else jnp.broadcast_to(mask, (b, t))
    x_pred, cache = _apply(params, cfg, AudioVAE.spectrum, chunk, state.cache, frame_valid)
    frames = istft_frames(x_pred, cfg.n_fft)
    if valid is not None:
        frames = frames * mask[..., None]
    y = overlap_add(frames, cfg.hop).at[:, :ov].add(state.audio_buf)  # [B, t*hop + overlap]
    env = _envelope(mask, cfg.n_fft, cfg.hop).at[:, :ov].add(state.env_buf)  # [1 or B, t*hop + overlap]
    if valid is None:
        tails = y[:, -ov:], env[:, -ov:]
    else:
        at = lambda a: jax.vmap(lambda r, v: jax.lax.dynamic_slice_in_dim(r, v * cfg.hop, ov))(a, valid)  # noqa: E731
        tails = at(y), at(env)
    return y, env, tails, cache


@functools.partial(jax.jit, static_argnames=("cfg", "last"))
def _stream_step(params, cfg: VAEConfig, chunk, state: StreamState, last: bool):
    t = chunk.shape[1]
    if state.first and t * cfg.hop < cfg.pad:
        raise ValueError(f"the first streaming chunk needs at least {cfg.pad / cfg.hop:.2f} frames, got {t}")
    y, env, (audio_buf, env_buf), cache = _stream_chunk(params, cfg, chunk, state)
    end = y.shape[1] - (cfg.pad if last else cfg.overlap)
    start = cfg.pad if state.first else 0
    out = _normalise(y[:, start:end], env[:, start:end])
    return out, StreamState(cache, audio_buf, env_buf, first=False)


def decode_stream(params, cfg: VAEConfig, chunk: jax.Array, state: StreamState, *, last: bool = False):
    """Decode one chunk of latents [B, T_c, C] continuing ``state``; returns (samples, new state).

    Emits hop*T_c - pad samples for the first chunk, hop*T_c for middle chunks and hop*T_c + pad for the last one
    (``last=True`` flushes the tail); the concatenation equals :func:`decode` of all chunks. The decoder cache starts
    empty: earlier (prompt) latents are not pre-filled.
    """
    return _stream_step(params, cfg, chunk, state, last)


def decode_stream_rows(params, cfg: VAEConfig, chunk, valid, started, last, state: StreamState):
    """Streaming decode of a batch whose rows advance by different amounts, with every per-row choice as data (one
    program for a whole stream; traceable inside a larger jitted program).

    ``chunk`` [B, T, C] with ``valid`` [B] new frames per row (0: the row has nothing new), ``started`` [B]: the row
    has emitted audio before (else this is its first chunk: the "same"-padding head of ``pad`` samples is
    dropped), ``last`` [B]: flush the row's tail. Returns (samples [B, T * hop + overlap], start [B], stop [B], new
    state): the row's new audio is ``samples[b, start[b]:stop[b]]`` (hop*valid - pad on its first chunk, hop*valid
    in the middle, + pad on its last). Per row, the pieces concatenate to :func:`decode` of its frames; a row's
    first chunk needs valid * hop >= pad (one patch is plenty). The cache needs room for T frames past the longest
    row (:func:`init_stream_state` with ``max_frames + T`` and ``rows=True``)."""
    y, env, (audio_buf, env_buf), cache = _stream_chunk(params, cfg, chunk, state, valid)
    end = valid * cfg.hop
    start = jnp.where(started, 0, cfg.pad)
    stop = jnp.where(last, end + cfg.overlap - cfg.pad, end)
    has = started | (valid > 0)
    start = jnp.where(has, start, 0)
    stop = jnp.where(has, jnp.maximum(stop, start), 0)
    return _normalise(y, env), start, stop, state.replace(cache=cache, audio_buf=audio_buf, env_buf=env_buf)


# ---------------------------------------------------------------------------------------------------------------
# Long inputs: bounded attention memory by running the causal stacks chunk by chunk with their KV caches


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode_chunk(params, cfg: VAEConfig, frames, cache):
    return _apply(params, cfg, AudioVAE.encode_frames, frames, cache)


def encode_chunked(params, cfg: VAEConfig, wave, lengths=None, *, chunk_frames: int = 1500, key=None,
                   noise=None, sample: bool = True) -> Encoded:
    """Same result as :func:`encode` (the encoder is causal), computed ``chunk_frames`` frames at a time with the
    encoder KV cache, so attention memory grows linearly rather than quadratically with the input length."""
    wave = jnp.asarray(wave, jnp.float32)
    b, L = wave.shape
    if lengths is None:
        lengths = jnp.full((b,), L, jnp.int32)
    frames = frame_waveform(wave, jnp.asarray(lengths), cfg.input_dim, cfg.hop)
    t = frames.shape[1]
    n_chunks = -(-t // chunk_frames)
    frames = jnp.pad(frames, ((0, 0), (0, n_chunks * chunk_frames - t), (0, 0)))
    size = cache_size_for(n_chunks * chunk_frames, cfg.encoder.sliding_window, chunk_frames)
    if cfg.encoder.window_from_layer > 0:
        size = n_chunks * chunk_frames
    cache = init_cache(cfg.encoder, b, size)
    outs = []
    for i in range(n_chunks):
        h, cache = _encode_chunk(params, cfg, frames[:, i * chunk_frames : (i + 1) * chunk_frames], cache)
        outs.append(h)
    h = jnp.concatenate(outs, axis=1)[:, :t].astype(jnp.float32)
    if sample and noise is None:
        if key is None:
            raise ValueError("encode_chunked(sample=True) needs a PRNG `key` or explicit `noise`")
        noise = jax.random.normal(key, (b, t, cfg.latent_dim), jnp.float32)
    return _finish_encode(h, jnp.asarray(lengths), cfg, None, noise, sample)


def decode_chunked(params, cfg: VAEConfig, latent, *, chunk_frames: int = 1500) -> jax.Array:
    """Same result as :func:`decode` for [B, T, C] latents (all T frames valid), computed with
    :func:`decode_stream` ``chunk_frames`` frames at a time (bounded attention memory)."""
    b, t = latent.shape[:2]
    if t <= chunk_frames:
        return decode(params, cfg, latent)
    state = init_stream_state(cfg, b, t, chunk_frames)
    outs, start = [], 0
    while start < t:
        end = min(start + chunk_frames, t)
        y, state = decode_stream(params, cfg, latent[:, start:end], state, last=end == t)
        outs.append(y)
        start = end
    return jnp.concatenate(outs, axis=1)
