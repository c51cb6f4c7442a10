"""``Sampler(cfg=0)`` compiles a no-guidance step: the DiT runs once per flow step on the batch (not on the doubled
batch [x; x] of classifier-free guidance), and the output equals the guided program's with a zero strength (which
is the unguided velocity v_c + 0 * (v_c - v_u)). The DiT calls are counted as traced (``lax.cond`` traces the edit's
audio branch whether or not a row reaches it)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from conftest import rel_err, tiny_uniaudio
from unitok_jax import flow, generate, text


@pytest.fixture(scope="module")
def tiny():
    return tiny_uniaudio(["he hoped there would be stew for dinner", "turnips and carrots"] * 4)


def _run(tok, cfg, params, sampler, kind):
    ids, lengths = generate.pad_sequences([text.tts_prompt(tok, t, "", 2) for t in ("he hoped", "turnips and")],
                                          dtype=np.int32)
    lat = np.random.default_rng(0).standard_normal((2, 10, cfg.vae.latent_dim)).astype(np.float32)
    key = jax.random.key(4)
    if kind == "tts":
        r = generate.tts(params, cfg, ids, lengths, lat, np.array([2, 2], np.int32), np.array([4, 3], np.int32), key,
                         sampler=sampler, min_steps=100, decode=False)
        return r.latents, r.counts
    r = generate.edit(params, cfg, ids, lengths, lat, np.array([2, 2], np.int32), key, eos_id=-1,
                      gen_audio_id=int(ids[0, 0]), audio_patch_id=-1, max_text_tokens=2, max_patches=3,
                      sampler=sampler, min_steps=100, decode=False)
    return r.latents, r.counts


@pytest.mark.parametrize("kind", ["tts", "edit"])
def test_cfg_zero_is_one_dit_call_on_the_batch_with_the_unguided_output(tiny, monkeypatch, kind):
    tok, cfg, params = tiny
    rows = []
    real = flow.dit_apply

    def counting(params, config, x, *a, **k):  # records the batch of every DiT call traced
        rows.append(x.shape[0])
        return real(params, config, x, *a, **k)

    monkeypatch.setattr(flow, "dit_apply", counting)
    jax.clear_caches()  # trace anew so the counter sees the calls
    zero = generate.Sampler(steps=2, cfg=0.0)
    assert not zero.guided and generate.Sampler(cfg=1e-3).guided
    lat0, n0 = _run(tok, cfg, params, zero, kind)
    unguided_rows = sorted(set(rows))
    rows.clear()
    # (almost) the same value through the guided program: the output the static path must reproduce
    lat1, n1 = _run(tok, cfg, params, dataclasses.replace(zero, cfg=1e-30), kind)
    guided_rows = sorted(set(rows))
    assert unguided_rows and guided_rows
    assert max(guided_rows) == 2 * max(unguided_rows)  # doubled batch with guidance, the batch itself without
    assert np.array_equal(n0, n1)
    assert kind == "edit" or n0.sum() > 0  # TTS generates; an edit row reaches audio only if the model says so
    assert rel_err(lat0, lat1) <= 1e-5 if np.abs(lat1).sum() else np.array_equal(lat0, lat1)
