"""Issue 18 (item 2): sequences packed to one fixed row length.

A packed row holds several training sequences (segments); attention in the LLM and in the semantic module stays
inside a segment, positions restart per segment, and the flow / stop losses are taken per segment, so a packed
batch gives the same losses and gradients as the same sequences one per row (flow noise drawn per patch id).
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import tiny_uniaudio
from test_lm_lean import P, SENTENCES

from unitok_jax.training import lm_data, lm_step


@pytest.fixture(scope="module")
def setup():
    tok, cfg, params = tiny_uniaudio(SENTENCES * 4)
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((500, cfg.vae.latent_dim)).astype(np.float32)
    exs = [lm_data.tts_example(tok, SENTENCES[0], lat[:60]),
           lm_data.asr_example(tok, lat[60:140], SENTENCES[1]),
           lm_data.tts_example(tok, SENTENCES[3], lat[400:480]),
           lm_data.asr_example(tok, lat[140:200], SENTENCES[2] + " " + SENTENCES[3]),
           lm_data.edit_example(tok, lat[200:260], "Delete the word 'there'.", lat[260:330],
                                "he hoped <edit></edit> would be stew", P),
           lm_data.tts_example(tok, SENTENCES[2], lat[330:395])]
    # one jitted function for the module: a batch shape seen before is not compiled again
    fn = jax.jit(jax.value_and_grad(lambda prm, batch: lm_step.lm_loss(
        prm, cfg, batch, jax.random.key(3), deterministic=True, aux_weight=0.1, z_weight=0.01), has_aux=True))
    return tok, cfg, params, exs, fn


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_packed_batch_equals_one_sequence_per_row(setup):
    tok, cfg, params, exs, loss_and_grads = setup
    flat = lm_data.make_batch(exs, max_len=160, max_patches=32)
    flat.pop("is_tts")
    flat["patch_ids"] = (np.arange(len(exs))[:, None] * 4096 + np.arange(32)[None, :]).astype(np.int32)
    packed, unfit = lm_data.pack_examples(exs, rows=2, seq_len=400, max_patches=96, pad_id=tok.id("eos"))
    assert unfit == []
    assert packed["segment_ids"].max(axis=1).tolist() == [4, 2]  # first fit: four sequences, then two
    (l0, m0), g0 = loss_and_grads(params, flat)
    (l1, m1), g1 = loss_and_grads(params, packed)
    for k in ("loss", "text_ce", "flow", "stop", "text_acc", "stop_likely_pos", "stop_likely_neg", "moe_aux",
              "moe_z"):
        assert abs(float(m1[k]) - float(m0[k])) <= 1e-5 * max(1.0, abs(float(m0[k]))), (k, m0[k], m1[k])
    for k in ("text_tokens", "flow_patches", "tokens"):
        assert int(m1[k]) == int(m0[k]), k
    assert float(m0["flow"]) > 0 and float(m0["stop"]) > 0 and int(m0["text_tokens"]) > 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        if np.linalg.norm(np.asarray(a)) > 0:
            assert _rel(b, a) < 1e-4, jax.tree_util.keystr(path)
    # the padding share of the packed rows is lower than one sequence per row
    assert float(m1["padding"]) < float(m0["padding"]) - 0.1


def test_without_segments_the_rows_would_mix(setup):
    """The segment mask is what keeps a packed row equal: the same row seen as one sequence gives another loss."""
    tok, cfg, params, exs, loss_and_grads = setup
    packed, _ = lm_data.pack_examples(exs, rows=2, seq_len=400, max_patches=96, pad_id=tok.id("eos"))
    (l1, _), _ = loss_and_grads(params, packed)
    mixed = {**packed, "segment_ids": np.minimum(packed["segment_ids"], 1),
             "latent_segment_ids": np.minimum(packed["latent_segment_ids"], 1)}
    (l2, _), _ = loss_and_grads(params, mixed)
    assert abs(float(l2) - float(l1)) > 1e-4


def test_pack_layout_and_what_does_not_fit(setup):
    tok, cfg, params, exs, loss_and_grads = setup
    lens = [len(e["input_ids"]) for e in exs]
    b, unfit = lm_data.pack_examples(exs, rows=1, seq_len=lens[0] + lens[1], max_patches=64)
    assert unfit == [2, 3, 4, 5] or all(lens[0] + lens[1] + lens[j] > lens[0] + lens[1] for j in unfit)
    assert b["valid"].sum() == lens[0] + lens[1]
    # positions restart at each segment; the TTS segment's first target is conditioned on its <audio> token
    assert b["positions"][0, lens[0]] == 0 and b["positions"][0, lens[0] - 1] == lens[0] - 1
    assert b["input_ids"][0, b["patch_cond_index"][0, 0]] == tok.id("audio")
    assert b["history_reset"][0, 0] and b["history_reset"][0, exs[0]["num_patches"]]
    assert b["flow_mask"][0].sum() == exs[0]["num_patches"]  # the ASR segment has no generation targets
    # explicit rows, and a per-row cap on labelled positions
    asr_labels = int(np.sum(exs[1]["text_labels"] != lm_data.IGNORE))
    b, unfit = lm_data.pack_examples(exs[:4], rows=2, seq_len=400, max_patches=96, where=[0, 0, 1, 0],
                                     text_cap=asr_labels)
    assert unfit == [3]  # its labels would pass the row's cap
    assert b["segment_ids"][1].max() == 1 and b["segment_ids"][0].max() == 2
    with pytest.raises(ValueError, match="at least one"):
        lm_data.pack_examples([], rows=1, seq_len=8, max_patches=8)
