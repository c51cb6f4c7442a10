"""LLM-stage loss and train step (spec §4.6, §5.7, §5.8, §7.2).

:func:`lm_loss` runs one batch from :func:`unitok_jax.training.lm_data.make_batch`:

1. the semantic module over the ground-truth latents (one causal pass per row; ``freeze_semantic`` stops its
   gradient), LinearPooling to one embedding per patch;
2. the pooled patches replace the word embeddings at the ``<audioPatch>`` positions; one LLM forward (ASR audio
   positions through ``audio_gate`` on ``multi_gate`` configs);
3. losses: text cross-entropy (float32) averaged over the labelled tokens (labels are pre-shifted, see lm_data);
   flow matching (:func:`unitok_jax.flow.dit_loss`, block dropout and CFG condition dropout from the flow config)
   on every target patch j, conditioned on the final hidden at ``patch_cond_index`` with ground-truth patch j - 1
   as history (zeros for j = 0); the stop loss (:func:`unitok_jax.heads.stop_labels` / ``stop_loss``) on the same
   hiddens; optionally the MoE load-balancing / router z losses.

``total = text_weight * text_ce + flow_weight * flow + stop_weight * stop + aux_weight * aux + z_weight * z``
(+ ``mel_weight * mel`` with ``mel_weight`` > 0: the tokenizer's unified stage S2, spec §7.1, where the latents
also go through the decoder's full path, wav = head(stack(fc3(Z_uni))), and a multi-resolution log-mel L1 compares
it with the batch's ``wave`` over ``wave_lengths``). The frozen VAE encoder is not part of it: latents are inputs.

:func:`make_lm_train_step` gives a pure ``step(state, batch) -> (state, metrics)`` over
``{"step", "params", "opt_state", "rng", "skipped"}``; only the trainable subtrees (:func:`trainable_labels`) are
updated, and a step whose loss or gradients are not finite leaves params and optimizer state unchanged and is
counted in ``skipped``.
"""
from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from unitok_jax import flow, heads, model, vae
from unitok_jax.llm import BailingMoeLM
from unitok_jax.model import UniAudioConfig
from unitok_jax.training.trees import all_finite, label_tree, update_if

IGNORE = -100
TRAINABLE = ("model", "flowloss", "linear_proj_audio", "stop_head")
# Parts of params["audio"]["decoder"] that make the unified (semantic) embedding beyond the frozen fc1 (the
# reference's optional unfreezing: ``decoder.fc2`` + ``semantic_model``).
SEMANTIC = ("fc2", "semantic")
# Stage S2 also trains fc3, the entry of the full decoder path from Z_uni: stage S0 never uses (so never trains) it.
SEMANTIC_S2 = SEMANTIC + ("fc3",)


def text_cross_entropy(logits, labels, valid=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean float32 CE of ``logits`` [B, S, V] against pre-shifted ``labels`` [B, S] (-100 = none) ->
    (loss, number of labelled tokens, number predicted correctly by argmax). 0 when nothing is labelled."""
    mask = labels != IGNORE
    if valid is not None:
        mask = mask & valid
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(mask, labels, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    count = jnp.sum(mask)
    loss = jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(count, 1)
    correct = jnp.sum(mask & (jnp.argmax(logits, axis=-1) == safe))
    return loss, count, correct


def labelled_positions(labels, valid, count: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The first ``count`` labelled positions of each row: (index [B, count] into the sequence, whether each slot
    holds a labelled position [B, count], number of labelled positions beyond ``count`` in the batch). Slots
    without one point at an unlabelled position and are masked."""
    mask = (labels != IGNORE) & valid
    order = jnp.argsort(~mask, axis=1, stable=True)[:, :count]  # labelled positions first, in sequence order
    taken = jnp.take_along_axis(mask, order, axis=1)
    dropped = jnp.sum(jnp.maximum(jnp.sum(mask, axis=1) - count, 0))
    return order, taken, dropped


def text_loss_at_labels(params, cfg: UniAudioConfig, hidden, labels, valid, count: int):
    """:func:`text_cross_entropy` with logits only at the first ``count`` labelled positions of each row: the
    final hiddens of those positions [B, count, D] go through the LM head, so the float32 logits are
    [B, count, V] instead of [B, S, V] (equal to the full computation, values and gradients, when no row has more
    than ``count`` labels). Returns (loss, labelled tokens, correct, labels beyond ``count``: not in the loss)."""
    count = min(int(count), labels.shape[1])
    idx, taken, dropped = labelled_positions(labels, valid, count)
    h = jnp.take_along_axis(hidden, idx[:, :, None], axis=1)
    logits = model.llm_module(cfg).apply(model.llm_vars(params), h, method=BailingMoeLM.head)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    loss, n, correct = text_cross_entropy(logits, jnp.take_along_axis(labels, idx, axis=1), taken)
    return loss, n, correct, dropped


def flow_draws(key: jax.Array, patch_ids: jax.Array, shape: tuple, config: flow.FlowConfig):
    """Flow-matching time [N] (:func:`flow.sample_time`) and noise [N, *shape] of N patches, each drawn from
    ``fold_in(key, patch id)``: the same draw for a patch wherever the batch puts it (packed or one sequence per
    row)."""
    def one(i):
        kt, kn = jax.random.split(jax.random.fold_in(key, i))
        return flow.sample_time(kt, 1, config)[0], jax.random.normal(kn, shape, jnp.float32)

    return jax.vmap(one)(patch_ids)


def lm_loss(params, cfg: UniAudioConfig, batch: dict, key: jax.Array, *, stop_weight: float = 0.01,
            flow_weight: float = 1.0, text_weight: float = 1.0, aux_weight: float = 0.0, z_weight: float = 0.0,
            freeze_semantic: bool = True, deterministic: bool = False, mel_weight: float = 0.0,
            text_positions: int = 0) -> tuple[jax.Array, dict]:
    """(total loss, metrics) of one LM-stage batch (see the module docstring; batch keys from ``make_batch``).

    ``key`` drives the flow noise / times and the DiT's dropout and CFG condition dropout (``deterministic=True``
    turns both dropouts off, e.g. for evaluation). ``aux_weight`` / ``z_weight`` multiply the mean over MoE layers
    of the raw load-balancing and router z losses (the LLM config's own coefficients are not used here).

    ``text_positions`` > 0: text logits only at the first that many labelled positions of each row
    (:func:`text_loss_at_labels`; labels beyond them are left out of the loss and counted in the ``text_dropped``
    metric, which the training loop keeps at 0 by skipping such rows); 0: logits at every position."""
    ids = batch["input_ids"]
    valid = batch["valid"]
    b, s = ids.shape
    p = cfg.patch_size

    # 1. semantic module (frozen by default) + pooling
    latents = batch["latents"].astype(jnp.float32)
    packed = "segment_ids" in batch  # rows of several sequences (lm_data.pack_examples)
    if mel_weight > 0:  # stage S2: the full decoder path from the same unified embedding
        if packed:
            raise ValueError("the full-path mel loss (stage S2) takes unpacked batches")
        recon, unified = vae.decode_full(params["audio"], cfg.vae, latents)
    elif packed:
        unified, _ = vae.unified_embedding(params["audio"], cfg.vae, latents, positions=batch["latent_positions"],
                                           segment_ids=batch["latent_segment_ids"])
    else:
        unified, _ = vae.unified_embedding(params["audio"], cfg.vae, latents)
    if freeze_semantic:
        unified = jax.lax.stop_gradient(unified)
    pooled = model.pool(params, cfg, unified)  # [B, N, D]
    n = pooled.shape[1]

    # 2. splice + one LLM forward
    embeds = model.splice_by_mask(model.embed_tokens(params, cfg, ids), pooled, batch["audio_patch_mask"])
    gate = batch["audio_gate"] & valid if cfg.llm.multi_gate else None
    seq = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]} if packed else {}
    out = model.llm_module(cfg).apply(model.llm_vars(params), inputs_embeds=embeds, valid=valid, audio_mask=gate,
                                      return_logits=text_positions <= 0, **seq)
    hidden = out["hidden"]  # [B, S, D], final-normed

    # 3a. text CE
    if text_positions > 0:
        text_ce, n_text, n_correct, text_dropped = text_loss_at_labels(params, cfg, hidden, batch["text_labels"],
                                                                       valid, text_positions)
    else:
        text_ce, n_text, n_correct = text_cross_entropy(out["logits"], batch["text_labels"], valid)
        text_dropped = jnp.zeros((), jnp.int32)

    # 3b. flow matching on the target patches
    cond = jnp.take_along_axis(hidden, batch["patch_cond_index"][:, :, None], axis=1)  # [B, N, D]
    target = latents.reshape(b, n, p, latents.shape[-1])
    history = jnp.concatenate([jnp.zeros_like(target[:, :1]), target[:, :-1]], axis=1)
    if packed:  # each segment's first patch and first generated patch have a zero history
        history = jnp.where(batch["history_reset"][:, :, None, None], 0.0, history)
    elif "gen_start" in batch:  # the first generated patch (an edit's first target patch) has a zero history
        first = jnp.arange(n)[None, :] == batch["gen_start"][:, None]
        history = jnp.where(first[:, :, None, None], 0.0, history)
    flow_mask = batch["flow_mask"]
    t = noise = None
    if "patch_ids" in batch:  # noise and time drawn per patch id: independent of the batch layout
        t, noise = flow_draws(key, batch["patch_ids"].reshape(b * n), target.shape[2:], cfg.flow)
    flow_loss, _ = flow.dit_loss(params["flowloss"], cfg.flow, key, cond.reshape(b * n, 1, -1),
                                 target.reshape(b * n, p, -1), history.reshape(b * n, p, -1),
                                 flow_mask.reshape(b * n), deterministic=deterministic, t=t, noise=noise)

    # 3c. stop loss on the hiddens at the patch positions (TTS rows only: gen_patches is 0 for ASR)
    if packed:
        labels = heads.stop_labels(batch["seg_patch_start"], batch["seg_gen_patches"], s)
    else:
        labels = heads.stop_labels(batch["patch_start"], batch["gen_patches"], s)
    labels = jnp.where(valid, labels, IGNORE)
    stop, stop_aux = heads.stop_loss(model.stop_logits(params, cfg, hidden), labels,
                                     batch["segment_ids"] if packed else None)

    # 3d. MoE aux losses
    moe = out.get("moe")
    aux = jnp.mean(moe["aux_loss"]) if moe is not None else jnp.zeros((), jnp.float32)
    zl = jnp.mean(moe["z_loss"]) if moe is not None else jnp.zeros((), jnp.float32)

    total = text_weight * text_ce + flow_weight * flow_loss + stop_weight * stop + aux_weight * aux + z_weight * zl
    extra = {}
    if mel_weight > 0:
        from unitok_jax.training import vae_losses

        n_wave = recon.shape[1]
        real = batch["wave"].astype(jnp.float32)[:, :n_wave]
        real = jnp.pad(real, ((0, 0), (0, n_wave - real.shape[1])))
        lengths = jnp.minimum(batch["wave_lengths"].astype(jnp.int32), n_wave)
        mel = vae_losses.multi_resolution_mel_loss(vae_losses.mask_waveform(real, lengths),
                                                   vae_losses.mask_waveform(recon, lengths), lengths,
                                                   vae_losses.MelLossConfig())
        total = total + mel_weight * mel
        extra["mel"] = mel
    metrics = {**extra,
        "loss": total, "text_ce": text_ce, "flow": flow_loss, "stop": stop, "moe_aux": aux, "moe_z": zl,
        "text_tokens": n_text, "text_dropped": text_dropped, "text_acc": n_correct / jnp.maximum(n_text, 1),
        "flow_patches": jnp.sum(flow_mask), "stop_likely_pos": stop_aux["likely_pos"],
        "stop_likely_neg": stop_aux["likely_neg"], "tokens": jnp.sum(valid),
        "padding": 1.0 - jnp.mean(valid.astype(jnp.float32)),  # the batch's padding positions, a fraction
    }
    return total, metrics


# ------------------------------------------------------------------------------------------------ optimizer / step


def trainable_labels(params, train_semantic: bool = False, unified_stage: bool = False) -> dict:
    """Label tree for ``optax.multi_transform``: ``"train"`` for the LLM, flow head, pooling and stop head,
    ``"semantic"`` for ``audio.decoder.{fc2, semantic}`` when ``train_semantic``, ``"frozen"`` for the rest of the
    VAE (and the semantic module otherwise). ``unified_stage`` (stage S2): the LLM, flow head, pooling and stop head
    are frozen too, and ``audio.decoder.{fc2, semantic, fc3}`` are ``"semantic"``."""
    unknown = [name for name in params if name not in TRAINABLE and name != "audio"]
    if unknown:
        raise ValueError(f"unknown params component {unknown[0]!r}; expected {model.COMPONENTS}")
    rules = dict.fromkeys(TRAINABLE, "frozen" if unified_stage else "train")
    if train_semantic or unified_stage:
        rules.update(dict.fromkeys((f"audio/decoder/{k}" for k in (SEMANTIC_S2 if unified_stage else SEMANTIC)),
                                   "semantic"))
    return label_tree(params, rules, "frozen")


def adamw(learning_rate=1e-5, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-5, weight_decay: float = 0.02,
          clip_norm: Optional[float] = 1.0, warmup_steps: int = 100) -> optax.GradientTransformation:
    """The reference SFT optimiser (spec §5.8): AdamW (0.9, 0.95), eps 1e-5, weight decay 0.02, grad-norm clip 1.0,
    constant learning rate after a linear warmup (``learning_rate`` may also be an optax schedule)."""
    if not callable(learning_rate) and warmup_steps > 0:
        learning_rate = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
            [warmup_steps])
    tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


def masked_optimizer(params, optimizer: optax.GradientTransformation, *, train_semantic: bool = False,
                     semantic_optimizer: Optional[optax.GradientTransformation] = None, unified_stage: bool = False):
    """``optimizer`` on the trainable subtrees only (frozen leaves get zero updates and no optimizer state). With
    ``train_semantic`` the semantic module is updated by ``semantic_optimizer`` (default: ``optimizer``). The grad
    clipping inside ``optimizer`` sees the trainable gradients only."""
    transforms = {"train": optimizer, "frozen": optax.set_to_zero(),
                  "semantic": semantic_optimizer or optimizer}
    return optax.multi_transform(transforms, trainable_labels(params, train_semantic, unified_stage))


def init_lm_state(params, optimizer: optax.GradientTransformation, rng: jax.Array) -> dict:
    """Train state ``{step, params, opt_state, rng, skipped}`` (``optimizer`` as passed to the step, i.e. already
    masked by :func:`masked_optimizer`)."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params), "rng": rng,
            "skipped": jnp.zeros((), jnp.int32)}


_SUMMED = ("text_tokens", "text_dropped", "flow_patches", "tokens")  # metrics that are counts: summed over micro-batches


def _micro_batches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B / n, ...] with micro-batch i = rows i, i + n, i + 2n, ... (each device keeps its rows when
    the batch dim is sharded)."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible into {n} micro-batches")
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_lm_train_step(cfg: UniAudioConfig, optimizer: optax.GradientTransformation, *,
                       train_semantic: bool = False, accum_steps: int = 1, unified_stage: bool = False,
                       **loss_kwargs) -> Callable:
    """A pure ``step(state, batch) -> (state, metrics)`` (jit it, donating ``state``).

    ``optimizer`` must be the masked one (:func:`masked_optimizer`, built with the same ``train_semantic`` and ``unified_stage``), so that
    only the trainable subtrees move. ``loss_kwargs`` go to :func:`lm_loss` (weights, ``deterministic``);
    ``freeze_semantic`` follows ``not train_semantic``. The key of step k is ``fold_in(state["rng"], k)``, so a
    resumed run draws the same noise. If the loss or any gradient is not finite, params and optimizer state stay as
    they were, ``skipped`` is incremented and ``metrics["skipped_step"]`` is 1; ``step`` advances in both cases.
    Metrics also carry ``grad_norm`` (trainable gradients, before clipping).

    ``accum_steps`` > 1 accumulates gradients over that many micro-batches of the batch (rows i::accum_steps, one
    ``lax.scan``): the update uses the mean of the micro-batch gradients (so the loss is the mean of micro-batch
    means, each averaged over its own labelled tokens / patches); count metrics are summed, the others averaged."""
    loss_kwargs = {"freeze_semantic": not (train_semantic or unified_stage), **loss_kwargs}
    if accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps} must be >= 1")

    def grads_and_metrics(params, batch, key):
        grad_fn = jax.value_and_grad(lambda p, b, k: lm_loss(p, cfg, b, k, **loss_kwargs), has_aux=True)
        if accum_steps == 1:
            return grad_fn(params, batch, key)
        micro = _micro_batches(batch, accum_steps)

        def body(carry, xs):
            i, mb = xs
            out = grad_fn(params, mb, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, out), None

        zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                            jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), key))
        total, _ = jax.lax.scan(body, zero, (jnp.arange(accum_steps), micro))
        (loss, metrics), grads = total
        metrics = {k: v if k in _SUMMED else v / accum_steps for k, v in metrics.items()}
        return (loss / accum_steps, metrics), jax.tree.map(lambda g: g / accum_steps, grads)

    def step(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        params = state["params"]
        (loss, metrics), grads = grads_and_metrics(params, batch, key)
        labels = trainable_labels(params, train_semantic, unified_stage)
        trainable_grads = jax.tree.map(lambda g, lab: g if lab != "frozen" else jnp.zeros_like(g), grads, labels)
        finite = all_finite(loss, trainable_grads)

        def update():
            updates, new_opt = optimizer.update(grads, state["opt_state"], params)
            return optax.apply_updates(params, updates), new_opt

        new_params, new_opt = update_if(finite, update, (params, state["opt_state"]))
        new_state = {
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": new_opt,
            "rng": state["rng"],
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = {**metrics, "grad_norm": optax.tree.norm(trainable_grads),
                   "skipped_step": (~finite).astype(jnp.int32)}
        return new_state, metrics

    return step
