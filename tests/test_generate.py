"""Compiled batched generation on a tiny random model: loop == Python loop of the same jitted steps, batch == each
request alone, early stop freezes a row, budgets cap, streaming == offline, ASR and edit loops."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitok_jax import generate as G
from unitok_jax import model

P = 5
ATOL = 1e-5
SAMPLER = G.Sampler(steps=3)
NEVER = -6.0  # stop-head bias for class 1: stop prob ~ 0.0025, never fires
ALWAYS = 12.0  # stop prob ~ 1: fires as soon as min_steps allows


def _with_stop_bias(params, bias1: float):
    sh = params["stop_head"]["linear"]
    new = {"kernel": jnp.zeros_like(sh["kernel"]), "bias": jnp.array([0.0, bias1], jnp.float32)}
    return {**params, "stop_head": {"linear": new}}


@pytest.fixture(scope="module")
def tiny():
    cfg = G.tiny_config()
    params = model.init_params(cfg, jax.random.key(0))
    # LinearPooling is zero-initialised for training; give it weights so the audio feedback matters here.
    lin = params["linear_proj_audio"]["linear"]
    lin = {"kernel": 0.5 * jax.random.normal(jax.random.key(1), lin["kernel"].shape), "bias": lin["bias"] + 0.1}
    params = {**params, "linear_proj_audio": {**params["linear_proj_audio"], "linear": lin}}
    return cfg, _with_stop_bias(params, NEVER)


@pytest.fixture(scope="module")
def tts_req(tiny):
    cfg, _ = tiny
    rng = np.random.default_rng(0)
    b, c = 3, cfg.vae.latent_dim
    ids = rng.integers(1, cfg.llm.vocab_size, (b, 9)).astype(np.int32)
    lengths = np.array([9, 4, 6], np.int32)
    prompt = rng.standard_normal((b, 4 * P, c)).astype(np.float32)
    prompt_patches = np.array([2, 4, 0], np.int32)  # different prompt lengths, one row without a voice prompt
    budgets = np.array([6, 9, 4], np.int32)
    return dict(ids=ids, lengths=lengths, prompt=prompt, prompt_patches=prompt_patches, budgets=budgets)


def _tts(params, cfg, req, **kw):
    kw.setdefault("sampler", SAMPLER)
    kw.setdefault("min_steps", 2)
    return G.tts(params, cfg, req["ids"], req["lengths"], req["prompt"], req["prompt_patches"], req["budgets"],
                 jax.random.key(7), **kw)


def _row(req, i):
    return {k: v[i:i + 1] for k, v in req.items()}


def _hop(cfg):
    return cfg.vae.hop


def test_tts_compiled_loop_equals_python_loop(tiny, tts_req):
    cfg, params = tiny
    params = _with_stop_bias(params, 0.0)  # stop prob exactly 0.5 never exceeds the threshold ...
    a = _tts(params, cfg, tts_req, stop_threshold=0.45, min_steps=np.array([1, 3, 100]))  # ... so it fires here
    b = _tts(params, cfg, tts_req, stop_threshold=0.45, min_steps=np.array([1, 3, 100]), mode="python")
    np.testing.assert_array_equal(a.counts, [3, 5, 4])
    np.testing.assert_array_equal(a.stopped, [True, True, False])
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.stopped, b.stopped)
    np.testing.assert_allclose(a.latents, b.latents, atol=ATOL, rtol=0)
    np.testing.assert_allclose(a.waves, b.waves, atol=ATOL, rtol=0)
    assert np.abs(a.latents).max() > 0.1


def test_tts_batch_equals_each_request_alone(tiny, tts_req):
    cfg, params = tiny
    full = _tts(params, cfg, tts_req)
    np.testing.assert_array_equal(full.counts, tts_req["budgets"])
    for i in range(3):
        req = _row(tts_req, i)
        req["ids"] = req["ids"][:, : req["lengths"][0]]  # alone: its own (shorter) padding
        req["prompt"] = req["prompt"][:, : max(req["prompt_patches"][0], 1) * P]
        alone = _tts(params, cfg, req, request_ids=[i])
        n = full.counts[i]
        assert alone.counts[0] == n
        np.testing.assert_allclose(alone.latents[0, :n], full.latents[i, :n], atol=ATOL, rtol=0)
        w = n * P * _hop(cfg)
        np.testing.assert_allclose(alone.waves[0, :w], full.waves[i, :w], atol=ATOL, rtol=0)
        assert np.all(alone.waves[0, w:] == 0) and np.all(full.waves[i, w:] == 0)
    # the request id (not the row) picks the randomness: another id gives another sample
    other = _tts(params, cfg, _row(tts_req, 0), request_ids=[5])
    assert np.abs(other.latents[0, :6] - full.latents[0, :6]).max() > 1e-3


def test_tts_early_stop_freezes_the_row_while_others_continue(tiny, tts_req):
    cfg, params = tiny
    stop_params = _with_stop_bias(params, ALWAYS)
    job = G._tts_job(cfg, tts_req["ids"], tts_req["lengths"], tts_req["prompt"], tts_req["prompt_patches"],
                     tts_req["budgets"], jax.random.key(7), None, SAMPLER, np.array([1, 100, 100]), 0.5, None,
                     G.DEFAULT_BUCKETS)
    state = G.tts_init(stop_params, cfg, **job.batch(np.arange(3), 4, G._Mesh.of(None, None)), **job.statics)
    snap = None
    while not bool(jnp.all(state.done)):
        state = G.tts_step(stop_params, cfg, state, steps=SAMPLER.steps, emit_stop_patch=True)
        if snap is None and bool(state.done[0]):
            assert not bool(state.done[1])
            snap = jax.tree_util.tree_map(np.asarray, state.replace(keys=None))
    np.testing.assert_array_equal(np.asarray(state.count)[:3], [3, 9, 4])  # k = 2 > min_steps 1: 3 patches
    np.testing.assert_array_equal(np.asarray(state.stopped)[:3], [True, False, False])
    for name in ("out", "hidden", "history", "count"):
        np.testing.assert_array_equal(np.asarray(getattr(state, name))[0], getattr(snap, name)[0])
    for c in ("cache", "sem"):
        assert int(getattr(state, c)["length"][0]) == int(getattr(snap, c)["length"][0])
        assert int(getattr(state, c)["length"][1]) > int(getattr(snap, c)["length"][1])
    # the stop changes nothing before it: row 0 equals the first 3 patches of the run without a stop
    free = _tts(params, cfg, tts_req)
    np.testing.assert_allclose(np.asarray(state.out)[0, :3], free.latents[0, :3], atol=ATOL, rtol=0)
    assert np.all(np.asarray(state.out)[0, 3:] == 0)
    # emit_stop_patch=False drops the patch of the stopping step
    res = _tts(stop_params, cfg, tts_req, min_steps=np.array([1, 100, 100]), emit_stop_patch=False)
    np.testing.assert_array_equal(res.counts, [2, 9, 4])


def test_tts_budget_caps_length(tiny, tts_req):
    cfg, params = tiny
    res = _tts(params, cfg, tts_req)
    np.testing.assert_array_equal(res.counts, tts_req["budgets"])
    assert not res.stopped.any()
    hop = _hop(cfg)
    for i, n in enumerate(res.counts):
        assert np.all(res.latents[i, n:] == 0) and np.all(np.abs(res.latents[i, :n]).max(axis=(1, 2)) > 0)
        assert np.all(res.waves[i, n * P * hop:] == 0)
        assert np.abs(res.waves[i, (n * P - 1) * hop: n * P * hop]).max() > 0  # the tail is flushed
    # a zero budget gives nothing
    req = dict(tts_req, budgets=np.array([0, 2, 1], np.int32))
    np.testing.assert_array_equal(_tts(params, cfg, req).counts, [0, 2, 1])


def test_tts_streaming_equals_offline(tiny, tts_req):
    """A batch of 3 rows of different lengths (one ended by the stop head inside a chunk, two by their budgets):
    per row, the streamed audio is the offline waveform, and one compiled program serves the whole stream."""
    cfg, params = tiny
    params = _with_stop_bias(params, ALWAYS)
    kw = dict(sampler=SAMPLER, min_steps=np.array([100, 3, 100]))
    offline = _tts(params, cfg, tts_req, **kw)
    np.testing.assert_array_equal(offline.counts, [6, 5, 4])
    gen = G.tts_stream(params, cfg, tts_req["ids"], tts_req["lengths"], tts_req["prompt"], tts_req["prompt_patches"],
                       tts_req["budgets"], jax.random.key(7), chunk_patches=2, **kw)
    chunks = [next(gen)]
    programs = G.tts_stream_run._cache_size()
    chunks += list(gen)
    assert G.tts_stream_run._cache_size() == programs  # no recompilation mid-stream
    assert len(chunks) == 3 and chunks[-1].done.all()
    assert [int(c.new_patches[0]) for c in chunks] == [2, 2, 2]
    assert [int(c.new_patches[1]) for c in chunks] == [2, 2, 1]
    assert [bool(c.done[2]) for c in chunks] == [False, True, True]
    hop = _hop(cfg)
    for i, n in enumerate(offline.counts):
        wave = np.concatenate([c.audio[i] for c in chunks])
        assert wave.shape == (n * P * hop,)
        np.testing.assert_allclose(wave, offline.waves[i, : n * P * hop], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------- ASR / edit

APATCH = 63  # the tiny vocab's <audioPatch> id (random text ids avoid it)


@pytest.fixture(scope="module")
def text_req(tiny):
    cfg, _ = tiny
    rng = np.random.default_rng(1)
    patches = np.array([3, 1, 2], np.int32)
    seqs = []
    for i, pch in enumerate(patches):
        pre, post = rng.integers(1, APATCH, 2 + i), rng.integers(1, APATCH, 3)
        seqs.append(np.concatenate([pre, np.full(pch, APATCH), post]))
    ids, lengths = G.pad_sequences(seqs, dtype=np.int32)
    audio = rng.standard_normal((3, 3 * P, cfg.vae.latent_dim)).astype(np.float32)
    return dict(ids=ids, lengths=lengths, audio=audio, audio_patches=patches)


def _first(tokens, tok, limit):
    hits = np.flatnonzero(tokens[:limit] == tok)
    return int(hits[0]) if hits.size else None


def _asr(params, cfg, req, **kw):
    kw.setdefault("max_new_tokens", 6)
    return G.asr(params, cfg, req["ids"], req["lengths"], req["audio"], req["audio_patches"],
                 audio_patch_id=APATCH, **kw)


def test_asr_loop_python_loop_batch_and_eos(tiny, text_req):
    cfg, params = tiny
    free = _asr(params, cfg, text_req, eos_id=-1)
    np.testing.assert_array_equal(free.n, [6, 6, 6])
    assert not free.eos.any()
    eos = int(free.tokens[0, 2])
    res = _asr(params, cfg, text_req, eos_id=eos)
    py = _asr(params, cfg, text_req, eos_id=eos, mode="python")
    for r in (res, py):
        for i in range(3):
            j = _first(free.tokens[i], eos, 6)
            n = 6 if j is None else j + 1
            assert r.n[i] == n and r.eos[i] == (j is not None)
            np.testing.assert_array_equal(r.tokens[i, :n], free.tokens[i, :n])
            assert np.all(r.tokens[i, n:] == 0)
    assert res.n[0] <= 3 and res.eos[0]
    for i in range(3):
        req = {k: v[i:i + 1] for k, v in text_req.items()}
        req["ids"] = req["ids"][:, : req["lengths"][0]]
        alone = _asr(params, cfg, req, eos_id=eos)
        assert alone.n[0] == res.n[i]
        np.testing.assert_array_equal(alone.tokens[0], res.tokens[i])
    # the audio matters (its pooled patches replace the <audioPatch> embeddings)
    other = _asr(params, cfg, dict(text_req, audio=text_req["audio"] * -3.0), eos_id=-1)
    assert np.any(other.tokens != free.tokens)


def _edit(params, cfg, req, **kw):
    kw.setdefault("sampler", SAMPLER)
    kw.setdefault("max_text_tokens", 6)
    kw.setdefault("max_patches", 5)
    return G.edit(params, cfg, req["ids"], req["lengths"], req["audio"], req["audio_patches"], jax.random.key(3),
                  audio_patch_id=APATCH, **kw)


def test_edit_switches_at_gen_audio_and_matches_python_loop_and_single(tiny, text_req):
    cfg, params = tiny
    free = _edit(params, cfg, text_req, eos_id=-1, gen_audio_id=-1)
    np.testing.assert_array_equal(free.n, [6, 6, 6])
    assert not free.switched.any() and np.all(free.counts == 0) and np.all(free.waves == 0)
    gen = int(free.tokens[0, 1])
    eos = next(int(t) for t in free.tokens[1] if t != gen)
    kw = dict(eos_id=eos, gen_audio_id=gen, audio_budgets=np.array([4, 3, 5]), min_steps=100)
    res = _edit(params, cfg, text_req, **kw)
    py = _edit(params, cfg, text_req, mode="python", **kw)
    for r in (res, py):
        for i in range(3):
            jg, je = _first(free.tokens[i], gen, 6), _first(free.tokens[i], eos, 6)
            if jg is not None and (je is None or jg < je):
                n, switched, count = jg + 1, True, kw["audio_budgets"][i]
            else:
                n, switched, count = (6 if je is None else je + 1), False, 0
            assert (r.n[i], r.switched[i], r.counts[i]) == (n, switched, count)
            assert r.eos[i] == (not switched and je is not None)
            np.testing.assert_array_equal(r.tokens[i, :n], free.tokens[i, :n])
            assert np.all(r.latents[i, count:] == 0)
    assert res.switched[0] and res.tokens[0, res.n[0] - 1] == gen and res.counts[0] == 4
    assert np.abs(res.latents[0, :4]).max() > 0.1
    np.testing.assert_allclose(res.latents, py.latents, atol=ATOL, rtol=0)
    np.testing.assert_allclose(res.waves, py.waves, atol=ATOL, rtol=0)
    for i in range(3):
        req = {k: v[i:i + 1] for k, v in text_req.items()}
        req["ids"] = req["ids"][:, : req["lengths"][0]]
        alone = _edit(params, cfg, req, request_ids=[i], **{**kw, "audio_budgets": kw["audio_budgets"][i:i + 1]})
        assert (alone.n[0], alone.counts[0]) == (res.n[i], res.counts[i])
        np.testing.assert_array_equal(alone.tokens[0], res.tokens[i])
        np.testing.assert_allclose(alone.latents[0], res.latents[i], atol=ATOL, rtol=0)
