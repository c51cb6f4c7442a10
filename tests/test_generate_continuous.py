"""Continuous batching (``slots`` < requests): the host refills finished slots between rounds of the compiled loop.
A request's output must not depend on its slot, its neighbours or the batching: continuous == static == alone, for
TTS, ASR and edit, with mixed lengths, more requests than slots and stops that fire inside a round."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from test_generate import APATCH, ATOL, P, SAMPLER, _first, _with_stop_bias, tiny  # noqa: F401  (fixture)
from unitok_jax import generate as G

N = 7  # requests


@pytest.fixture
def inserts(monkeypatch):
    """Counts the refills (``_insert`` calls) of the driver."""
    calls = []
    real = G._insert

    def counting(state, new, slots):
        calls.append(int(np.sum(np.asarray(slots) < state.done.shape[0])))
        return real(state, new, slots)

    monkeypatch.setattr(G, "_insert", counting)
    return calls


@pytest.fixture(scope="module")
def mixed(tiny):  # noqa: F811
    cfg, _ = tiny
    rng = np.random.default_rng(5)
    lengths = rng.integers(3, 10, N).astype(np.int32)
    ids = rng.integers(1, APATCH, (N, int(lengths.max()))).astype(np.int32)
    prompt_patches = np.array([2, 0, 3, 1, 4, 2, 0], np.int32)
    prompt = rng.standard_normal((N, 4 * P, cfg.vae.latent_dim)).astype(np.float32)
    budgets = np.array([2, 9, 4, 12, 3, 7, 5], np.int32)
    min_steps = np.array([100, 2, 100, 5, 100, 100, 0], np.int32)  # rows 1, 3, 6 stop by the stop head
    return dict(ids=ids, lengths=lengths, prompt=prompt, prompt_patches=prompt_patches, budgets=budgets,
                min_steps=min_steps, request_ids=np.arange(N, dtype=np.int32) + 10)


def _tts(params, cfg, r, rows=slice(None), **kw):
    return G.tts(params, cfg, r["ids"][rows], r["lengths"][rows], r["prompt"][rows], r["prompt_patches"][rows],
                 r["budgets"][rows], jax.random.key(11), sampler=SAMPLER, stop_threshold=0.45,
                 min_steps=r["min_steps"][rows], request_ids=r["request_ids"][rows], **kw)


def _same_tts(a, b, rows=slice(None)):
    np.testing.assert_array_equal(a.counts, b.counts[rows])
    np.testing.assert_array_equal(a.stopped, b.stopped[rows])
    n, w = min(a.latents.shape[1], b.latents.shape[1]), min(a.waves.shape[1], b.waves.shape[1])  # own buckets
    np.testing.assert_allclose(a.latents[:, :n], b.latents[rows, :n], atol=ATOL, rtol=0)
    np.testing.assert_allclose(a.waves[:, :w], b.waves[rows, :w], atol=ATOL, rtol=0)


def test_tts_continuous_equals_static_equals_alone(tiny, mixed, inserts):  # noqa: F811
    cfg, params = tiny
    params = _with_stop_bias(params, 0.0)  # stop prob 0.5 > 0.45: fires as soon as k > min_steps
    static = _tts(params, cfg, mixed)
    assert not inserts
    np.testing.assert_array_equal(static.counts, [2, 4, 4, 7, 3, 7, 2])  # stop at k = min_steps + 1, emitted
    np.testing.assert_array_equal(static.stopped, [False, True, False, True, False, False, True])
    cont = _tts(params, cfg, mixed, slots=3, rounds=2)
    assert len(inserts) >= 2 and sum(inserts) == N - 3  # every request after the first 3 went into a freed slot
    _same_tts(cont, static)
    py = _tts(params, cfg, mixed, slots=2, rounds=3, mode="python")
    _same_tts(py, static)
    for i in (1, 3, 6):
        _same_tts(_tts(params, cfg, mixed, rows=slice(i, i + 1)), static, slice(i, i + 1))


def test_continuous_rejects_bad_settings(tiny, mixed):  # noqa: F811
    cfg, params = tiny
    for bad in (dict(slots=0), dict(slots=2.5), dict(rounds=0)):
        with pytest.raises(ValueError, match="slots|rounds"):
            _tts(params, cfg, mixed, **bad)


@pytest.fixture(scope="module")
def audio_req(tiny):  # noqa: F811
    cfg, _ = tiny
    rng = np.random.default_rng(6)
    patches = np.array([3, 1, 2, 4, 1, 2], np.int32)
    seqs = [np.concatenate([rng.integers(1, APATCH, 2 + i % 3), np.full(pch, APATCH), rng.integers(1, APATCH, 2)])
            for i, pch in enumerate(patches)]
    ids, lengths = G.pad_sequences(seqs, dtype=np.int32)
    audio = rng.standard_normal((len(seqs), 4 * P, cfg.vae.latent_dim)).astype(np.float32)
    return dict(ids=ids, lengths=lengths, audio=audio, audio_patches=patches)


def _rows(req, i):
    r = {k: v[i:i + 1] for k, v in req.items()}
    r["ids"] = r["ids"][:, : r["lengths"][0]]
    return r


def test_asr_continuous_equals_static_equals_alone(tiny, audio_req, inserts):  # noqa: F811
    cfg, params = tiny
    budgets = np.array([6, 2, 5, 3, 6, 4], np.int32)

    def asr(req, bud, **kw):
        return G.asr(params, cfg, req["ids"], req["lengths"], req["audio"], req["audio_patches"],
                     audio_patch_id=APATCH, max_new_tokens=6, budgets=bud, **kw)

    free = asr(audio_req, budgets, eos_id=-1)
    eos = int(free.tokens[0, 2])
    static = asr(audio_req, budgets, eos_id=eos)
    assert static.eos.any() and (static.n == budgets).any()  # some rows end at eos, some at their budget
    cont = asr(audio_req, budgets, eos_id=eos, slots=2, rounds=1)
    assert sum(inserts) == len(budgets) - 2
    for f in ("tokens", "n", "eos"):
        np.testing.assert_array_equal(getattr(cont, f), getattr(static, f))
    for i in (1, 3):
        alone = asr(_rows(audio_req, i), budgets[i:i + 1], eos_id=eos)
        np.testing.assert_array_equal(alone.tokens[0], static.tokens[i])


def test_edit_continuous_equals_static_equals_alone(tiny, audio_req, inserts):  # noqa: F811
    cfg, params = tiny
    ab = np.array([4, 3, 5, 2, 4, 3], np.int32)

    def edit(req, **kw):
        return G.edit(params, cfg, req["ids"], req["lengths"], req["audio"], req["audio_patches"],
                      jax.random.key(3), audio_patch_id=APATCH, sampler=SAMPLER, max_text_tokens=6, max_patches=5,
                      min_steps=100, **kw)

    free = edit(audio_req, eos_id=-1, gen_audio_id=-1)
    gen = int(free.tokens[0, 1])
    eos = next(int(t) for t in free.tokens[1] if t != gen)
    kw = dict(eos_id=eos, gen_audio_id=gen, audio_budgets=ab, request_ids=np.arange(6) + 3)
    static = edit(audio_req, **kw)
    assert static.switched.any() and static.counts.sum() > 0
    cont = edit(audio_req, slots=2, rounds=2, **kw)
    assert sum(inserts) == 4
    for f in ("tokens", "n", "switched", "counts", "stopped", "eos"):
        np.testing.assert_array_equal(getattr(cont, f), getattr(static, f))
    np.testing.assert_allclose(cont.latents, static.latents, atol=ATOL, rtol=0)
    np.testing.assert_allclose(cont.waves, static.waves, atol=ATOL, rtol=0)
    i = int(np.flatnonzero(static.switched)[0])
    alone = edit(_rows(audio_req, i), **{**kw, "audio_budgets": ab[i:i + 1], "request_ids": [i + 3]})
    np.testing.assert_allclose(alone.latents[0], static.latents[i], atol=ATOL, rtol=0)
