"""AudioVAE parity against the reference fixtures (audio_vae*.npz). Dimensions and flags come from the fixture
configs; the weights go through our own converter."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, load_fixture, rel_err
from unitok_jax import vae
from unitok_jax.convert.common import read_weights
from unitok_jax.convert.vae import convert_vae

TOL = 1e-4
pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def base():
    cfg_json, arrays = load_fixture("audio_vae")
    cfg, params = convert_vae(read_weights(str(FIXTURES / "audio_vae.safetensors")), cfg_json["kwargs"])
    return cfg, params, arrays


@pytest.fixture(scope="module")
def swa():
    cfg_json, arrays = load_fixture("audio_vae_swa")
    weights = cfg_json.get("weights", "audio_vae.safetensors")
    cfg, params = convert_vae(read_weights(str(FIXTURES / weights)), cfg_json["kwargs"])
    return cfg, params, arrays


def _capture(params, cfg, method, *args, **kwargs):
    out, state = vae._apply(params, cfg, method, *args, capture=True, **kwargs)
    return out, state["intermediates"]


def test_vae_framing(base):
    cfg, _, d = base
    frames = vae.frame_waveform(jnp.asarray(d["enc_waveform"]), jnp.asarray(d["enc_waveform_length"]),
                                cfg.input_dim, cfg.hop)
    assert rel_err(frames, d["enc_frames"]) <= TOL


def test_vae_encoder_and_posterior(base):
    cfg, params, d = base
    frames = jnp.asarray(d["enc_frames"])
    (h, _), inter = _capture(params, cfg, vae.AudioVAE.encode_frames, frames)
    assert rel_err(inter["encoder"]["backbone_out"][0], d["enc_backbone_out"]) <= TOL
    assert rel_err(h, d["enc_h"]) <= TOL
    enc = vae.encode(params, cfg, jnp.asarray(d["enc_waveform"]), jnp.asarray(d["enc_waveform_length"]),
                     noise=jnp.asarray(d["enc_eps"]))
    assert rel_err(enc.posterior, d["enc_h"]) <= TOL
    assert rel_err(enc.mean, d["enc_mean"]) <= TOL
    assert rel_err(enc.std, d["enc_std"]) <= TOL
    assert rel_err(enc.latent, d["enc_latent"]) <= TOL
    np.testing.assert_array_equal(np.asarray(enc.frame_num), d["enc_frame_num"])


def test_vae_decode(base):
    cfg, params, d = base
    z = jnp.asarray(d["dec_latent"])
    x_pred, inter = _capture(params, cfg, vae.AudioVAE.spectrum, z)
    assert rel_err(inter["decoder"]["hidden"][0], d["dec_hidden"]) <= TOL
    assert rel_err(jnp.swapaxes(x_pred[0], 1, 2), d["dec_x_pred"]) <= TOL
    assert rel_err(vae.decode(params, cfg, z), d["dec_waveform"][:, 0]) <= TOL


def test_vae_decode_full_path(base):
    cfg, params, d = base
    wave, emb = vae.decode_full(params, cfg, jnp.asarray(d["dec_latent"]))
    assert rel_err(wave, d["decfwd_waveform"][:, 0]) <= TOL
    assert rel_err(emb, d["decfwd_unified_emb"]) <= TOL


def test_vae_unified_embedding_whole(base):
    cfg, params, d = base
    z = jnp.asarray(d["uni_latent"])
    (emb, _), inter = _capture(params, cfg, vae.AudioVAE.unified, z)
    assert rel_err(inter["decoder"]["semantic_in"][0], d["uni_semantic_in"]) <= TOL
    assert rel_err(inter["decoder"]["semantic_layers"][0], d["uni_block_outputs"]) <= TOL
    assert rel_err(emb, d["uni_emb"]) <= TOL
    emb2, cache = vae.unified_embedding(params, cfg, z)
    assert cache is None
    assert rel_err(emb2, d["uni_emb"]) <= TOL


def test_vae_unified_embedding_incremental(base):
    cfg, params, d = base
    z = jnp.asarray(d["uni_latent"])
    b, t = z.shape[:2]
    cache = vae.init_semantic_cache(cfg, b, t)
    outs, start = [], 0
    for size in d["uni_chunk_sizes"]:
        e, cache = vae.unified_embedding(params, cfg, z[:, start : start + int(size)], cache)
        outs.append(e)
        start += int(size)
    assert rel_err(jnp.concatenate(outs, 1), d["uni_emb_incremental"]) <= TOL
    # cache [L, B, S, K, d] vs reference [L, B, heads, T, d]
    assert rel_err(jnp.transpose(cache["k"], (0, 1, 3, 2, 4)), d["uni_cache_keys"]) <= TOL
    assert rel_err(jnp.transpose(cache["v"], (0, 1, 3, 2, 4)), d["uni_cache_values"]) <= TOL
    np.testing.assert_array_equal(np.asarray(cache["length"]), [t] * b)


def test_vae_istft_head(base):
    cfg, params, d = base
    x_pred = vae._apply(params, cfg, lambda m, h: m.decoder.head(h), jnp.asarray(d["istft_in"]))
    assert rel_err(jnp.swapaxes(x_pred, 1, 2), d["istft_x_pred"]) <= TOL
    # the head alone, fed the reference's linear output
    wave = vae.istft(jnp.swapaxes(jnp.asarray(d["istft_x_pred"]), 1, 2), cfg.hop, cfg.n_fft)
    assert rel_err(wave, d["istft_out"][:, 0]) <= TOL


def _stream(params, cfg, z, sizes):
    state = vae.init_stream_state(cfg, z.shape[0], z.shape[1], int(max(sizes)))
    outs, bufs, start = [], None, 0
    for i, size in enumerate(sizes):
        y, state = vae.decode_stream(params, cfg, z[:, start : start + int(size)], state, last=i == len(sizes) - 1)
        outs.append(np.asarray(y))
        if i == 0:
            bufs = (np.asarray(state.audio_buf), np.asarray(state.env_buf))
        start += int(size)
    return outs, bufs


def test_vae_stream_decode():
    cfg_json, _ = load_fixture("audio_vae")
    cfg, params = convert_vae(read_weights(str(FIXTURES / "audio_vae.safetensors")), cfg_json["kwargs"])
    d = dict(np.load(FIXTURES / "audio_vae_stream.npz"))
    outs, (abuf, ebuf) = _stream(params, cfg, jnp.asarray(d["stream_latent"]), d["stream_chunk_sizes"])
    assert [o.shape[1] for o in outs] == list(d["stream_emitted_lengths"])
    assert rel_err(abuf, d["stream_audio_buffer_after_chunk0"]) <= TOL
    assert rel_err(ebuf, d["stream_window_buffer_after_chunk0"]) <= TOL
    assert rel_err(np.concatenate(outs, 1), d["stream_waveform"][:, 0]) <= TOL
    assert rel_err(vae.decode(params, cfg, jnp.asarray(d["stream_latent"])),
                   d["stream_offline_waveform_upstream"][:, 0]) <= TOL


def test_vae_sliding_window_encode_decode(swa):
    cfg, params, d = swa
    raw = json.loads((FIXTURES / "audio_vae_swa.config.json").read_text())["kwargs"]["enc_kwargs"]["backbone"]
    assert cfg.encoder.sliding_window == raw["sliding_window"]  # sdpa semantics: W keys, every layer
    base_d = dict(np.load(FIXTURES / "audio_vae.npz"))
    enc = vae.encode(params, cfg, jnp.asarray(d["swa_waveform"]), jnp.asarray(base_d["enc_waveform_length"]),
                     sample=False)
    assert rel_err(enc.posterior, d["swa_enc_h"]) <= TOL
    assert rel_err(vae.decode(params, cfg, jnp.asarray(d["swa_latent"])), d["swa_dec_waveform"][:, 0]) <= TOL


def test_vae_sliding_window_stream_decode(swa):
    cfg, params, d = swa
    outs, (abuf, ebuf) = _stream(params, cfg, jnp.asarray(d["swa_latent"]), d["swa_stream_chunk_sizes"])
    assert [o.shape[1] for o in outs] == list(d["swa_stream_emitted_lengths"])
    assert rel_err(abuf, d["swa_stream_audio_buffer_after_chunk0"]) <= TOL
    assert rel_err(ebuf, d["swa_stream_window_buffer_after_chunk0"]) <= TOL
    assert rel_err(np.concatenate(outs, 1), d["swa_stream_waveform"][:, 0]) <= TOL
