"""The small heads around the LLM: LinearPooling (audio features -> one LLM input per patch) and the stop head
with its training loss (spec §5.1, §5.7)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unitok_jax.nn import RMSNorm, dense

IGNORE = -100  # stop label of positions that take no part in the stop loss


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """Dims of LinearPooling (U -> D over ``patch_size`` frames) and the stop head (D -> 2)."""

    semantic_dim: int = 1280  # U
    llm_dim: int = 2048  # D
    patch_size: int = 5
    norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict) -> "HeadsConfig":
        return cls(**d)

    def pooling(self, **kwargs) -> "LinearPooling":
        return LinearPooling(self.llm_dim, self.patch_size, self.norm_eps, **kwargs)


class LinearPooling(nn.Module):
    """RMSNorm(U, eps 1e-6) -> Linear(U -> D) per frame, then the mean over the ``patch_size`` frames of a patch.

    x [..., T, U] with T a multiple of ``patch_size`` -> [..., T / patch_size, D] (so a [N, p, U] batch of patches
    gives [N, 1, D], as the reference). Sows the per-frame projections ``pre_mean`` [..., T, D] into
    ``intermediates`` when that collection is mutable. Fresh params: the Linear is zero-initialised (spec §5.1).
    """

    llm_dim: int
    patch_size: int = 5
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        t = x.shape[-2]
        if t % self.patch_size:
            raise ValueError(f"{t} frames is not a multiple of patch_size={self.patch_size}")
        h = RMSNorm(self.eps, param_dtype=self.param_dtype, name="norm")(x.astype(self.dtype))
        h = nn.Dense(
            self.llm_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("semantic", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="linear",
        )(h)
        self.sow("intermediates", "pre_mean", h)
        h = h.reshape(*h.shape[:-2], t // self.patch_size, self.patch_size, self.llm_dim)
        return jnp.mean(h.astype(jnp.float32), axis=-2).astype(h.dtype)


class StopHead(nn.Module):
    """Linear(D -> 2, bias) on the flow condition hidden: h [..., D] -> logits [..., 2] (float32); class 1 = stop."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        logits = dense(2, True, ("embed", "classes"), "linear", self.dtype, self.param_dtype)(h.astype(self.dtype))
        return logits.astype(jnp.float32)


def stop_probability(logits: jax.Array) -> jax.Array:
    """softmax(logits)[..., 1]: the probability of stopping (the reference stops when it is > 0.5)."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]


def stop_labels(patch_start: jax.Array, num_patches: jax.Array, seq_len: int, num_ignored: int = 3) -> jax.Array:
    """Stop targets [B, seq_len] int32 for TTS training sequences (spec §5.7, the reference's data builder).

    ``patch_start`` [B]: index of the first ``<audioPatch>`` input (the ``<audio>`` token is just before it);
    ``num_patches`` [B]: P. The hidden at the last patch input (``patch_start + P - 1``) gets 1, the
    ``num_ignored`` before it are ignored (-100), the earlier patch inputs are candidate negatives (0), everything
    else, ``<audio>`` included, is ignored. A sequence with P = 0 has no positive.

    Packed rows: ``patch_start`` / ``num_patches`` [B, seq_len], per position the values of the segment the
    position belongs to (in row coordinates).
    """
    pos = jnp.arange(seq_len)[None, :]
    start, count = jnp.asarray(patch_start), jnp.asarray(num_patches)
    if start.ndim == 1:
        start, count = start[:, None], count[:, None]
    last = start + count - 1
    labels = jnp.where((pos >= start) & (pos < last - num_ignored), 0, IGNORE)
    labels = jnp.where((pos == last) & (count > 0), 1, labels)
    return labels.astype(jnp.int32)


def stop_loss(logits: jax.Array, labels: jax.Array,
              segment_ids: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """L_stop = 1/2 CE(positives) + 1/2 CE(one hard negative per sequence) (spec §5.7; weight 0.01 is the caller's).

    logits [B, S, 2], labels [B, S] in {1, 0, -100}. The positive term averages the cross-entropy over all label-1
    positions of the batch. For each sequence the hard negative is the label-0 position with the highest predicted
    stop probability (chosen under stop-gradient); the negative term averages its cross-entropy (target 0) over the
    sequences that have a candidate. A term with nothing to average is 0 (the reference would give NaN, and would
    label position 0 of a sequence without candidates as a negative). Returns ``(loss, aux)`` with the mean stop
    probability at the positives (``likely_pos``) and the mean no-stop probability at the chosen negatives
    (``likely_neg``).

    ``segment_ids`` [B, S] int in [0, S] (packed rows): one hard negative per segment instead of per row, so a
    packed row gives the loss of its segments laid out one per row. ``hard_negative`` / ``has_negative`` are then
    [B, S + 1], indexed by segment id.
    """
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    pos = labels == 1
    cand = labels == 0
    n_pos = jnp.sum(pos)
    ce_pos = jnp.sum(jnp.where(pos, -logp[..., 1], 0.0)) / jnp.maximum(n_pos, 1)
    p_stop = jax.lax.stop_gradient(jnp.exp(logp[..., 1]))
    score = jnp.where(cand, p_stop, -1.0)
    if segment_ids is None:
        idx = jnp.argmax(score, axis=-1)[:, None]  # [B, 1]
        has_neg = jnp.any(cand, axis=-1)[:, None]
    else:
        idx, has_neg = _segment_argmax(score, cand, segment_ids)  # [B, S + 1]
    neg_logp0 = jnp.take_along_axis(logp[..., 0], idx, axis=-1)
    n_neg = jnp.sum(has_neg)
    ce_neg = jnp.sum(jnp.where(has_neg, -neg_logp0, 0.0)) / jnp.maximum(n_neg, 1)
    loss = 0.5 * ce_pos + 0.5 * ce_neg
    probs = jax.lax.stop_gradient(jnp.exp(logp))
    likely_pos = jnp.sum(jnp.where(pos, probs[..., 1], 0.0)) / jnp.maximum(n_pos, 1)
    neg_p0 = jnp.take_along_axis(probs[..., 0], idx, axis=-1)
    likely_neg = jnp.sum(jnp.where(has_neg, neg_p0, 0.0)) / jnp.maximum(n_neg, 1)
    if segment_ids is None:
        idx, has_neg = idx[:, 0], has_neg[:, 0]
    return loss, {"likely_pos": likely_pos, "likely_neg": likely_neg, "hard_negative": idx, "has_negative": has_neg}


def _segment_argmax(score: jax.Array, cand: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per (row, segment id k in [0, S]): the first position of the highest ``score`` among the ``cand`` positions
    ([B, S + 1] index into the row, 0 where there is none) and whether there is one ([B, S + 1])."""
    b, s = score.shape
    k = s + 1
    flat = (jnp.arange(b)[:, None] * k + segment_ids).reshape(-1)
    best = jax.ops.segment_max(jnp.where(cand, score, -jnp.inf).reshape(-1), flat, num_segments=b * k)
    first = jnp.where(cand & (score == best[flat].reshape(b, s)), jnp.arange(s)[None, :], s)
    idx = jax.ops.segment_min(first.reshape(-1), flat, num_segments=b * k).reshape(b, k)
    has = idx < s
    return jnp.where(has, idx, 0), has
