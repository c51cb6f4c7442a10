"""LLM-stage training sequences (spec §5.2, §5.4, §5.7, §5.8): numpy builders from examples to fixed-shape batches.

An *example* is one sequence, a dict of numpy arrays (unpadded) plus ``task`` ("tts" / "asr" / "edit", see
:func:`edit_example` for the edit layout):

* ``input_ids`` [S] int32 — the token ids, ``<audioPatch>`` at the audio positions.
* ``audio_patch_mask`` [S] bool — the ``<audioPatch>`` positions; their inputs are the pooled ground-truth patches
  (patch j goes to the j-th true position, which is ``patch_start + j``).
* ``audio_gate`` [S] bool — positions routed through the LLM's ``audio_gate`` (``multi_gate`` configs): the audio
  patches of ASR (understanding) inputs; all false for TTS, as the reference (spec §9 #11).
* ``text_labels`` [S] int32 — **already shifted**: ``text_labels[i]`` is the token the logits at position ``i`` must
  predict, i.e. ``input_ids[i + 1]`` when position ``i + 1`` holds a target token, else -100. The loss compares the
  logits at ``i`` with ``text_labels[i]`` directly, with no shift. All -100 for TTS; for ASR the labels sit on the
  positions from the last prompt token (``<role>ASSISTANT</role>``'s last token) to the one before ``<|endoftext|>``.
* ``latents`` [P * p, C] float32 — the posterior-sampled VAE latents, truncated to whole patches (spec §5.2).
* ``patch_start`` (int) — index of the first ``<audioPatch>``; ``num_patches`` P.
* ``gen_patches`` (int) — patches that are generation targets (flow + stop losses): P for TTS, 0 for ASR.
* ``patch_cond_index`` [P] int32 — the position whose final hidden conditions target patch j (and feeds the stop
  head): ``patch_start - 1 + j``, the ``<audio>`` token for j = 0, then the previous patch position (spec §5.8).
  Zeros for ASR (no targets).

:func:`make_batch` pads a list of examples to ``[B, max_len]`` / ``[B, max_patches, ...]`` with everything padded
masked (``valid`` false, labels -100, masks false, ``gen_patches`` counting only real patches); batch rows may be
padded too (all-invalid rows). :func:`mix_examples` draws a TTS/ASR mixture by ratio with a numpy RNG.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from unitok_jax import text as text_lib
from unitok_jax.shapes import bucket  # one length-bucket rule for generation and training

IGNORE = -100
LEN_BUCKETS: tuple = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
PATCH_BUCKETS: tuple = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)

# The keys of a batch (see make_batch) and their padding values.
_SEQ_KEYS = {"input_ids": 0, "audio_patch_mask": False, "audio_gate": False, "text_labels": IGNORE}


def _patches(latents, patch_size: int, what: str) -> tuple[np.ndarray, int]:
    lat = np.asarray(latents, np.float32)
    if lat.ndim != 2:
        raise ValueError(f"{what}: latents must be [T, C], got shape {lat.shape}")
    p = lat.shape[0] // patch_size
    if p < 1:
        raise ValueError(f"{what}: {lat.shape[0]} latent frames is less than one patch of {patch_size}")
    return lat[: p * patch_size], p


def tts_example(tok: text_lib.TextTokenizer, text: str, latents, patch_size: int = 5) -> dict:
    """A TTS training sequence (spec §5.8): ``<role>HUMAN</role>`` + enc(instruction + text) +
    ``<role>ASSISTANT</role><audio>`` + ``<audioPatch>`` x P, with P = T // patch_size patches of ``latents`` [T, C]
    (the VAE posterior sample of the utterance; trailing frames dropped). Flow / stop targets: all P patches."""
    lat, p = _patches(latents, patch_size, "tts_example")
    ids = np.asarray(text_lib.tts_training_sequence(tok, text, p), np.int32)
    s = len(ids)
    start = s - p
    if ids[start - 1] != tok.id("audio"):
        raise AssertionError("tts_training_sequence layout changed: <audio> is not right before the patches")
    mask = np.zeros(s, bool)
    mask[start:] = True
    return {
        "task": "tts",
        "input_ids": ids,
        "audio_patch_mask": mask,
        "audio_gate": np.zeros(s, bool),
        "text_labels": np.full(s, IGNORE, np.int32),
        "latents": lat,
        "patch_start": start,
        "num_patches": p,
        "gen_patches": p,
        "gen_start": 0,
        "patch_cond_index": (start - 1 + np.arange(p)).astype(np.int32),
    }


def asr_example(tok: text_lib.TextTokenizer, latents, transcript: str, lang: str = "English", patch_size: int = 5,
                *, context_words: Optional[Sequence[str]] = None,
                instruction: str = text_lib.DEFAULT_ASR_INSTRUCTION) -> dict:
    """An ASR training sequence (spec §5.4): :func:`text.asr_prompt` with P = T // patch_size audio patches, then
    :func:`text.asr_target` (``"{lang}\\t{transcript}<|endoftext|>"``). Next-token labels only on the target tokens
    (shifted: the label at position i is the target token at i + 1); the audio positions go through the audio gate."""
    lat, p = _patches(latents, patch_size, "asr_example")
    prompt, start = text_lib.asr_prompt(tok, p, context_words=context_words, instruction=instruction)
    target = text_lib.asr_target(tok, transcript, lang)
    ids = np.asarray(prompt + target, np.int32)
    s = len(ids)
    mask = np.zeros(s, bool)
    mask[start:start + p] = True
    labels = np.full(s, IGNORE, np.int32)
    n = len(prompt)
    labels[n - 1:s - 1] = ids[n:]
    return {
        "task": "asr",
        "input_ids": ids,
        "audio_patch_mask": mask,
        "audio_gate": mask.copy(),
        "text_labels": labels,
        "latents": lat,
        "patch_start": start,
        "num_patches": p,
        "gen_patches": 0,
        "gen_start": 0,
        "patch_cond_index": np.zeros(p, np.int32),
    }


def edit_example(tok: text_lib.TextTokenizer, source_latents, instruction: str, target_latents,
                 target_markup: Optional[str] = None, patch_size: int = 5) -> dict:
    """An edit training sequence (spec §1.4, §7.3): :func:`text.edit_prompt` over the P_s source patches, then the
    assistant's text, then P_t ``<audioPatch>`` target patches:

    * semantic edit (``target_markup`` given: the target transcript with its ``<edit>`` span):
      ``<answer>`` (in the prompt) + ``<cot_text>{target_markup}</cot_text><gen_audio>``;
    * acoustic edit (``target_markup`` None): ``<gen_audio>``.

    Labels (shifted, as ASR): the assistant's text tokens, ``<gen_audio>`` included. Flow / stop targets: the P_t
    target patches only (``gen_start`` = P_s), the first conditioned on the ``<gen_audio>`` hidden with a zero
    history (as the edit loop). ``latents`` is source then target, so the causal semantic module over the row runs
    over the target with its context continuing from the source, as at inference. ``patch_start`` is the first
    *target* patch position (stop labels). No audio gate (the edit loop prefills without it)."""
    src, ps = _patches(source_latents, patch_size, "edit_example source")
    tgt, pt = _patches(target_latents, patch_size, "edit_example target")
    semantic = target_markup is not None
    prompt, src_start = text_lib.edit_prompt(tok, ps, instruction, semantic=semantic)
    sp = text_lib.SPECIAL_TOKENS
    answer = (sp["cot_text"] + text_lib._require_text(target_markup, "target_markup") + sp["cot_text_end"]
              if semantic else "") + sp["gen_audio"]
    assist = tok.encode(answer)
    if assist[-1] != tok.id("gen_audio"):
        raise AssertionError("<gen_audio> did not encode as its special token")
    ids = np.asarray(prompt + assist + [tok.id("audio_patch")] * pt, np.int32)
    s = len(ids)
    n = len(prompt)
    tgt_start = n + len(assist)
    mask = np.zeros(s, bool)
    mask[src_start:src_start + ps] = True
    mask[tgt_start:] = True
    labels = np.full(s, IGNORE, np.int32)
    labels[n - 1:tgt_start - 1] = ids[n:tgt_start]
    cond = np.zeros(ps + pt, np.int32)
    cond[ps:] = tgt_start - 1 + np.arange(pt)
    return {
        "task": "edit",
        "input_ids": ids,
        "audio_patch_mask": mask,
        "audio_gate": np.zeros(s, bool),
        "text_labels": labels,
        "latents": np.concatenate([src, tgt]),
        "patch_start": tgt_start,
        "num_patches": ps + pt,
        "gen_patches": pt,
        "gen_start": ps,
        "patch_cond_index": cond,
    }


def batch_shapes(batch: int, seq: int, patches: int, patch_size: int, latent_dim: int) -> dict:
    """``{key: (shape, dtype)}`` of a TTS / ASR batch as :func:`make_batch` builds it (without its optional
    ``gen_start`` and the host-only ``is_tts``): for abstract batches (``jax.ShapeDtypeStruct``), e.g. to lower a
    train step without data."""
    b, s, n, p, c = batch, seq, patches, patch_size, latent_dim
    return {"input_ids": ((b, s), np.int32), "valid": ((b, s), np.bool_), "text_labels": ((b, s), np.int32),
            "audio_patch_mask": ((b, s), np.bool_), "audio_gate": ((b, s), np.bool_),
            "latents": ((b, n * p, c), np.float32), "latent_valid": ((b, n * p), np.bool_),
            "patch_start": ((b,), np.int32), "num_patches": ((b,), np.int32), "gen_patches": ((b,), np.int32),
            "patch_cond_index": ((b, n), np.int32), "flow_mask": ((b, n), np.bool_)}


def make_batch(examples: Sequence[dict], max_len: Optional[int] = None, max_patches: Optional[int] = None, *,
               batch_size: Optional[int] = None, pad_id: int = 0,
               len_buckets: Optional[Sequence[int]] = LEN_BUCKETS,
               patch_buckets: Optional[Sequence[int]] = PATCH_BUCKETS) -> dict:
    """Pad examples into one fixed-shape batch (numpy). ``max_len`` / ``max_patches`` / ``batch_size`` default to the
    bucket (``len_buckets`` / ``patch_buckets``) of the longest example / the number of examples. An example longer
    than a given size raises ValueError (filter or bucket upstream; nothing is cropped here).

    Returns (B = batch_size, S = max_len, N = max_patches, p = patch size, C = latent channels):

    * ``input_ids`` [B, S] int32, ``valid`` [B, S] bool, ``text_labels`` [B, S] int32 (-100 = no loss),
      ``audio_patch_mask`` [B, S] bool, ``audio_gate`` [B, S] bool;
    * ``latents`` [B, N * p, C] float32, ``latent_valid`` [B, N * p] bool;
    * ``patch_start`` [B], ``num_patches`` [B], ``gen_patches`` [B] int32; ``patch_cond_index`` [B, N] int32;
      ``gen_start`` [B] int32 (first generated patch: 0 for TTS, P_s for edits); ``flow_mask`` [B, N] bool (the
      generation targets: ``gen_start <= j < gen_start + gen_patches``); ``is_tts`` [B] bool.
    """
    if not examples:
        raise ValueError("make_batch needs at least one example")
    lat_shapes = {e["latents"].shape[1] for e in examples}
    if len(lat_shapes) != 1:
        raise ValueError(f"examples have different latent channel counts {sorted(lat_shapes)}")
    c = lat_shapes.pop()
    patch = {e["latents"].shape[0] // max(e["num_patches"], 1) for e in examples}
    if len(patch) != 1:
        raise ValueError(f"examples disagree on the patch size: {sorted(patch)}")
    p = patch.pop()
    longest = max(len(e["input_ids"]) for e in examples)
    most = max(e["num_patches"] for e in examples)
    s = bucket(longest, len_buckets) if max_len is None else int(max_len)
    n = bucket(most, patch_buckets) if max_patches is None else int(max_patches)
    b = len(examples) if batch_size is None else int(batch_size)
    if longest > s:
        raise ValueError(f"an example has {longest} tokens > max_len={s}")
    if most > n:
        raise ValueError(f"an example has {most} patches > max_patches={n}")
    if len(examples) > b:
        raise ValueError(f"{len(examples)} examples > batch_size={b}")

    out = {k: np.full((b, s), v, np.int32 if k in ("input_ids", "text_labels") else bool)
           for k, v in _SEQ_KEYS.items()}
    out["input_ids"][:] = pad_id
    out["valid"] = np.zeros((b, s), bool)
    out["latents"] = np.zeros((b, n * p, c), np.float32)
    out["latent_valid"] = np.zeros((b, n * p), bool)
    for k in ("patch_start", "num_patches", "gen_patches", "gen_start"):
        out[k] = np.zeros((b,), np.int32)
    out["patch_cond_index"] = np.zeros((b, n), np.int32)
    out["is_tts"] = np.zeros((b,), bool)
    for i, e in enumerate(examples):
        L, P = len(e["input_ids"]), int(e["num_patches"])
        for k in _SEQ_KEYS:
            out[k][i, :L] = e[k]
        out["valid"][i, :L] = True
        out["latents"][i, : P * p] = e["latents"]
        out["latent_valid"][i, : P * p] = True
        out["patch_start"][i] = e["patch_start"]
        out["num_patches"][i] = P
        out["gen_patches"][i] = e["gen_patches"]
        out["gen_start"][i] = e.get("gen_start", 0)
        out["patch_cond_index"][i, :P] = e["patch_cond_index"]
        out["is_tts"][i] = e["task"] == "tts"
    j = np.arange(n)[None, :]
    out["flow_mask"] = (j >= out["gen_start"][:, None]) & (j < (out["gen_start"] + out["gen_patches"])[:, None])
    return out


def mix_examples(tts: Sequence[dict], asr: Sequence[dict], batch_size: int, tts_fraction: float,
                 rng: np.random.Generator) -> list:
    """A TTS/ASR mixture of ``batch_size`` examples: each slot is TTS with probability ``tts_fraction`` (so the
    expected ratio is tts_fraction : 1 - tts_fraction, e.g. 0.75 for the reference's gen:und = 3:1), drawn with
    replacement from the pools. With ``tts_fraction`` 0 or 1 (whole steps of one task, as the reference's step
    ratio) only that pool is needed. Deterministic given ``rng``."""
    if not 0.0 <= tts_fraction <= 1.0:
        raise ValueError(f"tts_fraction={tts_fraction} is not in [0, 1]")
    is_tts = rng.random(batch_size) < tts_fraction
    if is_tts.any() and not tts:
        raise ValueError("tts_fraction > 0 but there are no TTS examples")
    if (~is_tts).any() and not asr:
        raise ValueError("tts_fraction < 1 but there are no ASR examples")
    return [tts[rng.integers(len(tts))] if t else asr[rng.integers(len(asr))] for t in is_tts]


def packed_shapes(rows: int, seq_len: int, patches: int, patch_size: int, latent_dim: int) -> dict:
    """``{key: (shape, dtype)}`` of a packed batch (:func:`pack_examples`), e.g. to lower a train step without
    data."""
    r, s, n, p = rows, seq_len, patches, patch_size
    out = {k: v for k, v in batch_shapes(r, s, n, p, latent_dim).items()
           if k not in ("patch_start", "num_patches", "gen_patches")}
    out.update({"positions": ((r, s), np.int32), "segment_ids": ((r, s), np.int32),
                "seg_patch_start": ((r, s), np.int32), "seg_gen_patches": ((r, s), np.int32),
                "latent_positions": ((r, n * p), np.int32), "latent_segment_ids": ((r, n * p), np.int32),
                "history_reset": ((r, n), np.bool_), "patch_ids": ((r, n), np.int32)})
    return out


def pack_examples(examples: Sequence[dict], rows: int, seq_len: int, max_patches: int, *, pad_id: int = 0,
                  where: Optional[Sequence[int]] = None, ids: Optional[Sequence[int]] = None,
                  text_cap: int = 0, max_example_patches: int = 4096, latent_dim: Optional[int] = None,
                  patch_size: Optional[int] = None) -> tuple[dict, list[int]]:
    """Pack examples into ``rows`` rows of ``seq_len`` tokens and ``max_patches`` audio patches each (training
    with one batch shape). Example j goes to row ``where[j]`` when given, else to the first row with room (in the
    given order). Returns (batch, indices of the examples that did not fit: a row's tokens, patches, or with
    ``text_cap`` > 0 its labelled positions, which :func:`unitok_jax.training.lm_step.text_loss_at_labels` keeps
    to ``text_cap`` per row).

    Within a row the examples follow each other (tokens and latents in the same order, so the j-th
    ``<audioPatch>`` of the row takes the row's j-th latent patch); each is a *segment* (ids 1, 2, ... in its row,
    0 = padding) whose positions restart at 0, and attention (LLM and semantic module) stays inside a segment, so
    every segment is computed as if it were alone in its row. Keys: those of :func:`make_batch` except the per-row
    ``patch_start`` / ``num_patches`` / ``gen_patches`` / ``gen_start`` / ``is_tts``, plus ``positions``,
    ``segment_ids``, ``seg_patch_start`` / ``seg_gen_patches`` (per position, its segment's first target patch
    position in the row and target count: the stop labels) [rows, seq_len]; ``latent_positions``,
    ``latent_segment_ids`` [rows, max_patches * p]; ``history_reset`` [rows, max_patches] (patches whose flow
    history is zero: each segment's first patch and first generated patch); ``patch_ids`` [rows, max_patches]
    (example id x ``max_example_patches`` + patch index, ``ids`` default 0, 1, ...: the per-patch flow noise).
    ``latent_dim`` / ``patch_size``: the latent shape when there may be no example (an all-padding batch)."""
    if examples:
        c = examples[0]["latents"].shape[1]
        p = examples[0]["latents"].shape[0] // max(int(examples[0]["num_patches"]), 1)
    elif latent_dim is None or patch_size is None:
        raise ValueError("pack_examples needs at least one example, or latent_dim and patch_size")
    else:
        c, p = int(latent_dim), int(patch_size)
    r, s, n = int(rows), int(seq_len), int(max_patches)
    out = {k: np.full((r, s), v, np.int32 if k in ("input_ids", "text_labels") else bool) for k, v in _SEQ_KEYS.items()}
    out["input_ids"][:] = pad_id
    out["valid"] = np.zeros((r, s), bool)
    for k in ("positions", "segment_ids", "seg_patch_start", "seg_gen_patches"):
        out[k] = np.zeros((r, s), np.int32)
    out["latents"] = np.zeros((r, n * p, c), np.float32)
    out["latent_valid"] = np.zeros((r, n * p), bool)
    out["latent_positions"] = np.zeros((r, n * p), np.int32)
    out["latent_segment_ids"] = np.zeros((r, n * p), np.int32)
    for k in ("patch_cond_index", "patch_ids"):
        out[k] = np.zeros((r, n), np.int32)
    out["flow_mask"] = np.zeros((r, n), bool)
    out["history_reset"] = np.zeros((r, n), bool)
    used = np.zeros((r, 3), np.int64)  # tokens, patches, labelled positions per row
    unfit = []
    for j, e in enumerate(examples):
        if e["latents"].shape[1] != c or e["latents"].shape[0] != int(e["num_patches"]) * p:
            raise ValueError(f"example {j} disagrees on the latent channels / patch size")
        L, P = len(e["input_ids"]), int(e["num_patches"])
        need = np.array([L, P, int(np.sum(e["text_labels"] != IGNORE))])
        cap = np.array([s, n, text_cap if text_cap > 0 else np.iinfo(np.int64).max])
        room = np.all(used + need <= cap, axis=1)
        row = (int(where[j]) if room[int(where[j])] else -1) if where is not None else \
            (int(np.argmax(room)) if room.any() else -1)
        if row < 0:
            unfit.append(j)
            continue
        if P > max_example_patches:
            raise ValueError(f"example {j} has {P} patches > max_example_patches={max_example_patches}")
        o, q = (int(x) for x in used[row, :2])
        seg = int(np.max(out["segment_ids"][row])) + 1
        used[row] += need
        for k in _SEQ_KEYS:
            out[k][row, o:o + L] = e[k]
        out["valid"][row, o:o + L] = True
        out["positions"][row, o:o + L] = np.arange(L)
        out["segment_ids"][row, o:o + L] = seg
        out["seg_patch_start"][row, o:o + L] = o + int(e["patch_start"])
        out["seg_gen_patches"][row, o:o + L] = int(e["gen_patches"])
        f0, f1 = q * p, (q + P) * p
        out["latents"][row, f0:f1] = e["latents"]
        out["latent_valid"][row, f0:f1] = True
        out["latent_positions"][row, f0:f1] = np.arange(P * p)
        out["latent_segment_ids"][row, f0:f1] = seg
        out["patch_cond_index"][row, q:q + P] = o + np.asarray(e["patch_cond_index"])
        g0 = int(e.get("gen_start", 0))
        out["flow_mask"][row, q + g0:q + g0 + int(e["gen_patches"])] = True
        out["history_reset"][row, q] = out["history_reset"][row, q + g0] = True
        out["patch_ids"][row, q:q + P] = (j if ids is None else int(ids[j])) * max_example_patches + np.arange(P)
    return out, unfit
