"""The flow head: a small DiT velocity model, its rectified-flow training loss and the EPSS/sway/SDE sampler.

Shapes (spec §4): N patches (a flat batch), p = ``patch_size`` frames per patch, C = ``z_channels`` latent channels,
D = ``llm_cond_dim`` (the LLM hidden that conditions a patch), H = ``hidden_size``.

* :class:`DiT` maps ``(x_t [N, p, C], t [N], c [N, 1, D], hist [N, p, C])`` to the velocity ``v [N, p, C]``. The
  sequence it runs is ``[t_emb + c_emb ; x_embed(hist) ; x_embed(x_t)]`` (1 + 2p tokens) through bidirectional
  pre-norm blocks (the shared :class:`unitok_jax.nn.Stack`) with rotary positions 0..2p over all tokens; the final
  layer (RMSNorm -> Linear) gives C channels per token and the last p tokens are the velocity.
* :func:`flow_matching_loss` / :func:`dit_loss`: x_t = (1 - t) x0 + t x1, target x1 - x0, one t per patch, MSE
  averaged over the valid (patch, frame, channel) entries. Convention: t = 0 is noise, t = 1 is data.
* :func:`sample`: Euler steps on the EPSS grid warped by sway, SDE-like noise after every step but the last,
  classifier-free guidance in one DiT call on a doubled batch; jittable, one key per call.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unitok_jax.nn import RMSNorm, Stack, TransformerConfig, dense

T_SAMPLINGS = ("uniform", "logit_normal")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Static configuration of the flow head (dims as in ``FlowLoss(z_channels, llm_cond_dim, **ditar_config)``).

    Class defaults are the reference class defaults except ``depth``; read the real values from the checkpoint's
    ``ditar_config`` (see :func:`unitok_jax.convert.flow.flow_config_from_reference`).
    """

    z_channels: int = 64  # C
    llm_cond_dim: int = 2048  # D
    hidden_size: int = 1024  # H
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 5  # p
    cfg_dropout_prob: float = 0.1  # training: per-patch probability of replacing the raw condition by zeros
    dropout: float = 0.1  # training: attention-output and MLP-hidden dropout in every block
    qk_norm: bool = False  # RMSNorm(d_h) on q and k before rotary ("rms_norm" in the reference config)
    pe_attn_head: Optional[int] = None  # rotary on the first n heads only (None: all)
    rope_layout: str = "interleaved"  # x_transformers >= 1.30.1; "half" for 1.26.0-1.30.0 (spec §10.5)
    rope_theta: float = 10000.0
    freq_embed_dim: int = 256  # sinusoidal timestep features
    time_scale: float = 1000.0  # the sinusoid sees time_scale * t
    norm_eps: float = 1e-6
    # Training-time t sampling: "uniform" (released) or "logit_normal" (sigmoid of N(mean, std)); then an optional
    # shift towards noise, t' = t / (t + s (1 - t)), with s = time_shift, or s = sqrt(p*C / time_shift_base_dim)
    # (the dimension-dependent shift) when time_shift_base_dim is set.
    t_sampling: str = "uniform"
    t_logit_mean: float = 0.0
    t_logit_std: float = 1.0
    time_shift: float = 1.0
    time_shift_base_dim: Optional[int] = None
    dtype: str = "float32"  # compute dtype (params are param_dtype; time features, norms, losses stay float32)
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head_dim={self.hidden_size // self.num_heads} must be even for rotary")
        if self.freq_embed_dim % 2 or self.freq_embed_dim < 4:
            raise ValueError(f"freq_embed_dim must be even and >= 4, got {self.freq_embed_dim}")
        if self.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling={self.t_sampling!r}; expected one of {T_SAMPLINGS}")
        if not 0.0 <= self.cfg_dropout_prob <= 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout probabilities out of range: cfg {self.cfg_dropout_prob}, block {self.dropout}")

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        return cls(**d)

    @classmethod
    def from_reference(cls, kwargs: dict, patch_size: int = 5, **overrides) -> "FlowConfig":
        """From the reference ``FlowLoss`` kwargs: ``z_channels``, ``llm_cond_dim`` and the ``ditar_config`` entries
        (``hidden_size``, ``depth``, ``num_heads``, optional ``mlp_ratio``, ``cfg_dropout_prob``, ``dropout``,
        ``qk_norm`` (None / "rms_norm"), ``pe_attn_head``, ``attn_backend`` (ignored: no numerical effect)).
        Raises ValueError on a missing or unknown entry. ``overrides`` set any other field (e.g. ``rope_layout``)."""
        known = {"z_channels", "llm_cond_dim", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                 "cfg_dropout_prob", "dropout", "qk_norm", "pe_attn_head", "attn_backend"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown flow-head config entries {unknown}; known: {sorted(known)}")
        missing = [k for k in ("hidden_size", "depth", "num_heads") if k not in kwargs]
        if "z_channels" not in kwargs and "in_channels" not in kwargs:
            missing.append("z_channels")
        if "llm_cond_dim" not in kwargs:
            missing.append("llm_cond_dim")
        if missing:
            raise ValueError(f"flow-head config lacks {missing}")
        qk = kwargs.get("qk_norm")
        if qk not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={qk!r} is not supported (None or 'rms_norm')")
        pe = kwargs.get("pe_attn_head")
        fields = dict(
            z_channels=int(kwargs.get("z_channels", kwargs.get("in_channels"))),
            llm_cond_dim=int(kwargs["llm_cond_dim"]),
            hidden_size=int(kwargs["hidden_size"]),
            depth=int(kwargs["depth"]),
            num_heads=int(kwargs["num_heads"]),
            mlp_ratio=float(kwargs.get("mlp_ratio", 4.0)),
            cfg_dropout_prob=float(kwargs.get("cfg_dropout_prob", 0.1)),
            dropout=float(kwargs.get("dropout", 0.1)),
            qk_norm=qk == "rms_norm",
            pe_attn_head=None if pe is None else int(pe),
            patch_size=int(patch_size),
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)  # int() truncation, as the reference

    @property
    def shift(self) -> float:
        if self.time_shift_base_dim is not None:
            return math.sqrt(self.patch_size * self.z_channels / self.time_shift_base_dim)
        return self.time_shift

    def transformer_config(self, deterministic: bool = True) -> TransformerConfig:
        """The DiT blocks as a shared pre-norm stack: RMSNorm, biased q/k/v/o, rotary, bidirectional, tanh-GELU."""
        return TransformerConfig(
            width=self.hidden_size,
            num_layers=self.depth,
            num_heads=self.num_heads,
            num_kv_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            mlp_kind="gelu_tanh",
            mlp_bias=True,
            norm="rms",
            norm_eps=self.norm_eps,
            q_bias=True,
            k_bias=True,
            v_bias=True,
            o_bias=True,
            rope=self.rope_layout,
            rope_theta=self.rope_theta,
            rope_heads=self.pe_attn_head,
            qk_norm=self.qk_norm,
            causal=False,
            final_norm=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat=self.remat,
            dropout=self.dropout,
            deterministic=deterministic,
        )


# --------------------------------------------------------------------------------------------------------------
# The model


def timestep_features(t: jax.Array, dim: int = 256, scale: float = 1000.0) -> jax.Array:
    """t [N] -> [N, dim] float32: [sin(scale*t*f_j) | cos(scale*t*f_j)], f_j = exp(-ln(1e4) j / (dim/2 - 1)).

    Computed in float32 in the reference's order ((scale * t) * f), since sin/cos see arguments up to ``scale``.
    """
    half = dim // 2
    step = np.float32(math.log(10000) / (half - 1))
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)
    args = (jnp.float32(scale) * t.astype(jnp.float32))[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of 1000 t, then Linear(256 -> H) -> SiLU -> Linear(H -> H). [N] -> [N, H]."""

    hidden_size: int
    freq_embed_dim: int = 256
    scale: float = 1000.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        h = timestep_features(t, self.freq_embed_dim, self.scale).astype(self.dtype)
        h = dense(self.hidden_size, True, ("freq", "mlp"), "fc1", self.dtype, self.param_dtype)(h)
        h = jax.nn.silu(h)
        return dense(self.hidden_size, True, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(h)


class DiT(nn.Module):
    """The flow head's velocity model (spec §4.1). Not adaLN: the condition is a prefix token.

    Call: ``x`` [N, p, C] noisy patch, ``t`` [N] or scalar time, ``c`` [N, 1, D] (or [N, D]) LLM hidden, ``history``
    [N, p', C] previous clean patch. Returns the velocity [N, p, C] (the last p tokens), or with ``all_tokens`` the
    final layer on every token [N, 1 + p' + p, C].

    ``deterministic=False`` (training) applies the block dropout and the CFG condition dropout (per patch, with
    probability ``cfg_dropout_prob`` the raw condition is replaced by zeros before ``c_embedder``); it needs a
    ``"dropout"`` rng. ``cond_keep`` [N] bool overrides the random CFG dropout (False = drop).

    With the ``intermediates`` collection mutable it sows ``t_emb`` [N, H] and ``block_outputs`` [L, N, T, H]
    (the residual stream after each block).

    Padding: every patch is its own sequence, so padded patches never affect valid ones; the reference's zeroing
    of padded rows after attention is therefore not needed and padding is handled by the loss mask alone.
    """

    config: FlowConfig

    @nn.compact
    def __call__(self, x, t, c, history, deterministic: bool = True, cond_keep=None, all_tokens: bool = False):
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        n, p = x.shape[0], x.shape[1]
        if x.shape[-1] != cfg.z_channels or history.shape[-1] != cfg.z_channels:
            raise ValueError(
                f"x {x.shape} / history {history.shape}: last dim must be z_channels={cfg.z_channels}"
            )
        if c.ndim == 2:
            c = c[:, None, :]
        if c.shape[0] != n or c.shape[1:] != (1, cfg.llm_cond_dim):
            raise ValueError(f"condition shape {c.shape}, expected [{n}, 1, {cfg.llm_cond_dim}]")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (n,))

        e_t = TimestepEmbedder(cfg.hidden_size, cfg.freq_embed_dim, cfg.time_scale, dtype, pdtype, name="t_embedder")(t)
        self.sow("intermediates", "t_emb", e_t)
        if cond_keep is None and not deterministic and cfg.cfg_dropout_prob > 0.0:
            cond_keep = jax.random.uniform(self.make_rng("dropout"), (n,)) >= cfg.cfg_dropout_prob
        if cond_keep is not None:
            c = jnp.where(cond_keep[:, None, None], c, jnp.zeros_like(c))
        e_c = dense(cfg.hidden_size, True, ("cond", "embed"), "c_embedder", dtype, pdtype)(c.astype(dtype))
        x_embedder = dense(cfg.hidden_size, True, ("latent", "embed"), "x_embedder", dtype, pdtype)
        seq = jnp.concatenate(
            [e_t[:, None, :] + e_c, x_embedder(history.astype(dtype)), x_embedder(x.astype(dtype))], axis=1
        )
        seq = nn.with_logical_constraint(seq, ("batch", "length", "embed"))
        emit = self.is_mutable_collection("intermediates")
        h, _, block_outputs = Stack(cfg.transformer_config(deterministic), emit_hidden=emit, name="blocks")(seq)
        if emit:
            self.sow("intermediates", "block_outputs", block_outputs)
        if not all_tokens:
            h = h[:, -p:, :]
        h = RMSNorm(cfg.norm_eps, param_dtype=pdtype, axis_name="embed", name="final_norm")(h)
        out = dense(cfg.z_channels, True, ("embed", "latent"), "final_linear", dtype, pdtype)(h)
        return out


def init_dit(config: FlowConfig, key: jax.Array) -> dict:
    """Random DiT params (the inner ``params`` dict, one compiled call), for training from scratch or benchmarks."""
    return _init_dit(config, key)


@functools.partial(jax.jit, static_argnums=0)
def _init_dit(config: FlowConfig, key: jax.Array) -> dict:
    x = jnp.zeros((1, config.patch_size, config.z_channels), jnp.float32)
    c = jnp.zeros((1, 1, config.llm_cond_dim), jnp.float32)
    variables = DiT(config).init(key, x, jnp.zeros((1,)), c, x)
    return nn.meta.unbox(variables["params"])


def dit_apply(params, config: FlowConfig, x, t, c, history, **kwargs):
    """Functional shorthand for ``DiT(config).apply({"params": params}, x, t, c, history, **kwargs)``."""
    return DiT(config).apply({"params": params}, x, t, c, history, **kwargs)


def cfg_velocities(params, config: FlowConfig, x, t, c, history) -> jax.Array:
    """ONE DiT call on the doubled batch: rows 0..N-1 conditional (c), rows N..2N-1 unconditional (c = 0), same
    x, t and history. x [N, p, C], t [N] or scalar, c [N, 1, D] -> [2N, p, C]."""
    n = x.shape[0]
    if c.ndim == 2:
        c = c[:, None, :]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (n,))
    return dit_apply(
        params,
        config,
        jnp.concatenate([x, x], axis=0),
        jnp.concatenate([t, t], axis=0),
        jnp.concatenate([c, jnp.zeros_like(c)], axis=0),
        jnp.concatenate([history, history], axis=0),
    )


def guided_velocity(params, config: FlowConfig, x, t, c, history, cfg=2.0) -> jax.Array:
    """Classifier-free guided velocity v_c + cfg (v_c - v_u), [N, p, C].

    For ``cfg`` > 0 (or any traced value) the conditional and unconditional (c = 0) velocities come from ONE DiT
    call on the doubled batch ``[x; x]``; a Python ``cfg == 0`` runs the conditional model only.
    """
    n = x.shape[0]
    if isinstance(cfg, (int, float)) and cfg == 0:
        if c.ndim == 2:
            c = c[:, None, :]
        return dit_apply(params, config, x, jnp.broadcast_to(jnp.asarray(t, jnp.float32), (n,)), c, history)
    v = cfg_velocities(params, config, x, t, c, history)
    v_c, v_u = v[:n], v[n:]
    return v_c + (v_c - v_u) * jnp.asarray(cfg, v.dtype)


# --------------------------------------------------------------------------------------------------------------
# Training loss

def sample_time(key: jax.Array, n: int, config: FlowConfig) -> jax.Array:
    """Training times t [n] float32 in (0, 1) as configured (uniform / logit-normal, then the optional shift)."""
    if config.t_sampling == "uniform":
        t = jax.random.uniform(key, (n,), jnp.float32)
    else:
        t = jax.nn.sigmoid(config.t_logit_mean + config.t_logit_std * jax.random.normal(key, (n,), jnp.float32))
    s = config.shift
    if s != 1.0:
        t = t / (t + s * (1.0 - t))
    return t


def _patch_weights(mask, shape) -> jax.Array:
    """mask None / [N] / [N, p] (bool or 0-1) -> float32 weights [N, p, 1]."""
    n, p = shape[:2]
    if mask is None:
        return jnp.ones((n, p, 1), jnp.float32)
    m = jnp.asarray(mask).astype(jnp.float32)
    if m.ndim == 1:
        m = jnp.broadcast_to(m[:, None], (n, p))
    if m.shape != (n, p):
        raise ValueError(f"mask shape {mask.shape}; expected [{n}] (per patch) or [{n}, {p}] (per frame)")
    return m[..., None]


def flow_matching_loss(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    key: jax.Array,
    target: jax.Array,
    mask=None,
    config: Optional[FlowConfig] = None,
    t: Optional[jax.Array] = None,
    noise: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict]:
    """Rectified-flow loss for any velocity model ``velocity_fn(x_t [N, p, C], t [N]) -> v [N, p, C]``.

    x1 = ``target`` [N, p, C]; x0 ~ N(0, I) (or ``noise``); t [N] one per patch (drawn as ``config`` says, or given);
    x_t = (1 - t) x0 + t x1; loss = mean over valid (patch, frame, channel) of (v - (x1 - x0))^2 in float32.
    ``mask``: [N] per patch or [N, p] per frame, true = valid; masked entries contribute nothing (0 if none valid).
    Returns ``(loss, aux)`` with ``aux = {"t": t, "mse_per_patch": [N]}``.
    """
    config = config or FlowConfig()
    k_t, k_x = jax.random.split(key)
    n = target.shape[0]
    x1 = target.astype(jnp.float32)
    x0 = jax.random.normal(k_x, x1.shape, jnp.float32) if noise is None else noise.astype(jnp.float32)
    if t is None:
        t = sample_time(k_t, n, config)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (n,))
    tb = t[:, None, None]
    x_t = (1.0 - tb) * x0 + tb * x1
    u = x1 - x0
    v = velocity_fn(x_t.astype(target.dtype), t).astype(jnp.float32)
    w = _patch_weights(mask, target.shape)
    se = (v - u) ** 2 * w
    count = jnp.sum(w) * target.shape[-1]
    loss = jnp.sum(se) / jnp.maximum(count, 1.0)
    per_patch = jnp.sum(se, axis=(1, 2)) / jnp.maximum(jnp.sum(w, axis=(1, 2)) * target.shape[-1], 1.0)
    return loss, {"t": t, "mse_per_patch": per_patch}


def dit_loss(
    params,
    config: FlowConfig,
    key: jax.Array,
    cond: jax.Array,
    target: jax.Array,
    history: jax.Array,
    mask=None,
    deterministic: bool = False,
    t: Optional[jax.Array] = None,
    noise: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict]:
    """The flow head's training loss (spec §4.6): :func:`flow_matching_loss` with the DiT as velocity model.

    cond [N, 1, D] (or [N, D]), target / history [N, p, C], mask [N] or [N, p]. In training mode
    (``deterministic=False``) the block dropout and the CFG condition dropout (``config.cfg_dropout_prob``) are
    drawn from ``key`` as well. ``t`` [N] / ``noise`` [N, p, C] replace the random draws (tests, evaluation).
    """
    k_loss, k_drop = jax.random.split(key)

    def velocity(x_t, t):
        return dit_apply(params, config, x_t, t, cond, history, deterministic=deterministic, rngs={"dropout": k_drop})

    return flow_matching_loss(velocity, k_loss, target, mask, config, t=t, noise=noise)


# --------------------------------------------------------------------------------------------------------------
# Sampler

EPSS_TABLES = {
    5: [0, 2, 4, 8, 16, 32],
    6: [0, 2, 4, 6, 8, 16, 32],
    7: [0, 2, 4, 6, 8, 16, 24, 32],
    10: [0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32],
    12: [0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32],
    16: [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32],
}


def time_grid(steps: int, use_epss: bool = True, sway=-1.0) -> jax.Array:
    """The steps + 1 time points [steps + 1] float32: the EPSS table (x 1/32) when one exists for ``steps`` (else
    linspace(0, 1, steps + 1)), then the sway warp t + s (cos(pi t / 2) - 1 + t) unless ``sway`` is None.
    ``sway`` may be a traced scalar."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if use_epss and steps in EPSS_TABLES:
        grid = np.float32(1.0 / 32) * np.asarray(EPSS_TABLES[steps], np.float32)
    else:
        grid = np.linspace(0, 1, steps + 1, dtype=np.float32)
    t = jnp.asarray(grid, jnp.float32)
    if sway is not None:
        s = jnp.asarray(sway, jnp.float32)
        t = t + s * (jnp.cos(jnp.float32(jnp.pi / 2) * t) - 1.0 + t)
    return t


def _is_key_batch(key: jax.Array) -> bool:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2


def _normal(key: jax.Array, shape: tuple) -> jax.Array:
    """Standard normal draws; a batch of keys [N] gives one independent draw per sample (leading axis N)."""
    if _is_key_batch(key):
        return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(key)
    return jax.random.normal(key, shape, jnp.float32)


def _split(key: jax.Array, num: int):
    if _is_key_batch(key):
        ks = jax.vmap(lambda k: jax.random.split(k, num))(key)
        return [ks[:, i] for i in range(num)]
    ks = jax.random.split(key, num)
    return [ks[i] for i in range(num)]


def sample(
    params,
    config: FlowConfig,
    key: jax.Array,
    cond: jax.Array,
    history: jax.Array,
    steps: int = 10,
    cfg=2.0,
    sigma=0.25,
    temperature=1.5,
    sway=-1.0,
    use_epss: bool = True,
    init_noise: Optional[jax.Array] = None,
    step_noise: Optional[jax.Array] = None,
    return_trajectory: bool = False,
):
    """Draw one patch per condition with the reference CFM sampler (spec §4.5), fully on device.

    cond [N, 1, D] (or [N, D]), history [N, p, C] -> x [N, p, C]. x_0 ~ N(0, I); for k = 0..steps-1 with
    dt_k = t_{k+1} - t_k: x_{k+1} = x_k + dt_k v(t_k, x_k) with v the guided velocity (:func:`guided_velocity`),
    then, except after the last step, x_{k+1} += sigma sqrt(temperature) sqrt(|dt_k|) eps_k. ``sigma = 0`` gives the
    deterministic Euler ODE path from x_0.

    ``key``: one key for the call (split into the initial noise and the steps - 1 step noises), or a batch of keys
    [N] for per-sample draws that do not depend on the batch composition. ``init_noise`` [N, p, C] and
    ``step_noise`` [>= steps - 1, N, p, C] replace the draws (parity with recorded noise; only the first
    steps - 1 step noises are used). ``steps``, ``use_epss`` and ``return_trajectory`` are static; ``cfg``,
    ``sigma``, ``temperature`` and ``sway`` may be traced. With ``return_trajectory`` it returns
    ``(x, trajectory [steps + 1, N, p, C])`` where entry 0 is x_0 and entry k the Euler result of step k before its
    noise.
    """
    if cond.ndim == 2:
        cond = cond[:, None, :]
    n = cond.shape[0]
    shape = (n, config.patch_size, config.z_channels)
    if history.shape[0] != n:
        raise ValueError(f"history batch {history.shape[0]} != condition batch {n}")
    k_init, k_steps = _split(key, 2)
    x0 = _normal(k_init, shape) if init_noise is None else jnp.asarray(init_noise, jnp.float32)
    if x0.shape != shape:
        raise ValueError(f"init_noise shape {x0.shape}, expected {shape}")
    n_noise = steps - 1
    if n_noise > 0:
        if step_noise is None and _is_key_batch(k_steps):
            eps = jnp.stack([_normal(k, shape) for k in _split(k_steps, n_noise)])
        elif step_noise is None:
            eps = jax.random.normal(k_steps, (n_noise,) + shape, jnp.float32)
        else:
            eps = jnp.asarray(step_noise, jnp.float32)
            if eps.shape[0] < n_noise or eps.shape[1:] != shape:
                raise ValueError(f"step_noise shape {eps.shape}, expected [>= {n_noise}, {', '.join(map(str, shape))}]")
            eps = eps[:n_noise]
    grid = time_grid(steps, use_epss, sway)
    coef = jnp.asarray(sigma, jnp.float32) * jnp.sqrt(jnp.asarray(temperature, jnp.float32))

    def body(x, k):
        t0, t1 = grid[k], grid[k + 1]
        dt = t1 - t0
        v = guided_velocity(params, config, x.astype(config.dtype), t0, cond, history, cfg).astype(jnp.float32)
        x_euler = x + dt * v
        x_next = x_euler
        if n_noise > 0:
            noise = coef * jnp.sqrt(jnp.abs(dt)) * eps[jnp.minimum(k, n_noise - 1)]
            x_next = x_euler + jnp.where(k < n_noise, noise, jnp.zeros_like(noise))
        return x_next, (x_euler if return_trajectory else None)

    x, traj = jax.lax.scan(body, x0, jnp.arange(steps))
    if return_trajectory:
        return x, jnp.concatenate([x0[None], traj], axis=0)
    return x
