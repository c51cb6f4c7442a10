"""Edit generation end to end through the path ``sample.py edit`` uses (``UniAudio.edit`` -> ``generate.edit``) on a
tiny model whose greedy text is steered: the text phase must write the ``<cot_text>`` chain, switch to audio exactly
at ``<gen_audio>`` (the steered model would write another word after it if the loop kept decoding text) and return
both the text and the audio. (Mixed TTS / ASR / edit training: tests/test_lm_training.py
``test_short_training_run_reduces_loss``.)"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from conftest import SHARED_DATA, tiny_uniaudio
from unitok_jax import generate, text
from unitok_jax.api import UniAudio

SENTENCES = ["he hoped there would be stew for dinner", "turnips and carrots and bruised potatoes",
             "fat mutton pieces to be ladled out", "please translate the text to speech"]
MAX_PATCHES = 6


def _steer(params, chain: list[tuple[int, int]]):
    """Make greedy decoding follow ``chain`` (token a -> token b): token a's embedding is a large one-hot on its own
    dimension (it dominates the residual stream over the one random layer) and the LM head maps that dimension to
    b only. Other tokens keep their random embeddings; every other head column is zero."""
    emb = np.array(params["model"]["embed"]["embedding"])
    head = np.zeros_like(np.asarray(params["model"]["lm_head"]))
    assert len(chain) <= emb.shape[1] and len({a for a, _ in chain}) == len(chain)
    for d, (a, b) in enumerate(chain):
        emb[a] = 0.0
        emb[a, d] = 100.0
        head[d, b] = 10.0
    m = {**params["model"], "embed": {"embedding": jnp.asarray(emb)}, "lm_head": jnp.asarray(head)}
    return {**params, "model": m}


@pytest.fixture(scope="module")
def steered():
    tok, cfg, params = tiny_uniaudio(SENTENCES * 4)
    sp = tok.id
    words = tok.encode("he") + tok.encode(" stew")
    assert len(set(words)) == len(words)
    markup = [words[0], sp("edit"), sp("frame_patch"), sp("edit_end"), *words[1:]]
    # after <gen_audio> the steered text would go on with a stray word (for ever): a loop that missed the switch, or
    # switched late, writes it into the text; one that switched early never writes <gen_audio> or the end of the CoT
    stray = next(t for t in tok.encode(" dinner") if t not in words)
    # semantic prompts end with <answer>, acoustic ones with </role>
    cot = [sp("answer"), sp("cot_text"), *markup, sp("cot_text_end"), sp("gen_audio"), stray]
    chain = list(zip(cot[:-1], cot[1:])) + [(stray, stray), (sp("role_end"), sp("gen_audio"))]
    return UniAudio(cfg, _steer(params, chain), tok), cot[1:-1], markup


def test_edit_writes_the_cot_switches_at_gen_audio_and_returns_text_and_audio(steered):
    m, expected, markup = steered
    tok = m.tok
    wav, sr = sf.read(str(SHARED_DATA / "librispeech-1089-134686-0000.flac"), frames=4000, dtype="float32")
    src = [wav, wav[:2600]]
    instructions = ["Insert 'hot' before 'stew'.", "Make it louder."]
    out = m.edit(src, instructions, semantic=[True, False], max_text_tokens=16, max_patches=MAX_PATCHES,
                 sampler=generate.Sampler(steps=2))
    spp = m.cfg.patch_size * m.cfg.vae.hop
    sem, aco = out
    # semantic: the chain up to <gen_audio>, nothing after it; then the audio budget of patches
    assert sem.markup == tok.decode(markup, skip_special_tokens=False)
    assert sem.target_transcript == "he stew" and sem.text == "he stew"
    assert sem.wave.shape == (MAX_PATCHES * spp,) and np.all(np.isfinite(sem.wave)) and np.abs(sem.wave).max() > 0
    # acoustic: <gen_audio> right away, no text, audio
    assert aco.markup is None and aco.target_transcript is None and aco.text == ""
    assert aco.wave.shape == (MAX_PATCHES * spp,) and np.abs(aco.wave).max() > 0

    # the same request through generate.edit: the text stops exactly at <gen_audio> (the last text token), each row
    # switched to audio there and emitted its whole audio budget
    lat, counts = m._patched(m.encode(src, jax.random.split(jax.random.key(0))[0]))
    ids = [text.edit_prompt(tok, int(c), ins, semantic=s)[0] for c, ins, s in zip(counts, instructions, [True, False])]
    ids_p, lengths = generate.pad_sequences(ids, dtype=np.int32)
    res = generate.edit(m.params, m.cfg, ids_p, lengths, lat, counts, jax.random.key(1), eos_id=tok.id("eos"),
                        gen_audio_id=tok.id("gen_audio"), audio_patch_id=tok.id("audio_patch"), max_text_tokens=16,
                        max_patches=MAX_PATCHES, sampler=generate.Sampler(steps=2), pad_id=tok.id("eos"))
    assert list(res.n) == [len(expected), 1]
    assert list(res.tokens[0, : res.n[0]]) == expected and res.tokens[1, 0] == tok.id("gen_audio")
    assert res.switched.all() and not res.eos.any() and list(res.counts) == [MAX_PATCHES, MAX_PATCHES]
    assert np.all(np.abs(res.latents[:, :MAX_PATCHES]).sum(axis=(2, 3)) > 0)
    assert not np.any(res.latents[:, MAX_PATCHES:])

