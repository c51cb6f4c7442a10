"""AudioVAE properties on a small random model: streaming == offline, causality, padding invariance, jit."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_vae
from unitok_jax import vae


@pytest.fixture(scope="module")
def model():
    return tiny_vae()


def _close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()))


# each chunk pattern once, the sliding window on the patterns that cross its ring buffer (ragged, 1-frame and long
# chunks); every case compiles its own shapes, so the cross product would double the time for little more
@pytest.mark.parametrize("window, chunks", [(None, (2, 5, 5, 5, 3)), (4, (2, 5, 5, 5, 3)), (4, (7, 1, 1, 11)),
                                            (None, (20,)), (4, (3, 17)), (4, (5,) * 4)])
def test_stream_equals_offline(window, chunks):
    cfg, params = tiny_vae(window)
    z = jax.random.normal(jax.random.key(1), (2, sum(chunks), cfg.latent_dim))
    offline = vae.decode(params, cfg, z)
    state = vae.init_stream_state(cfg, 2, sum(chunks), max(chunks))
    outs, start = [], 0
    for i, c in enumerate(chunks):
        y, state = vae.decode_stream(params, cfg, z[:, start : start + c], state, last=i == len(chunks) - 1)
        outs.append(y)
        start += c
    lens = [o.shape[1] for o in outs]
    pad = cfg.pad
    if len(chunks) > 1:
        assert lens[0] == chunks[0] * cfg.hop - pad and lens[-1] == chunks[-1] * cfg.hop + pad
    _close(jnp.concatenate(outs, 1), offline)


def test_stream_ring_buffer_is_bounded():
    cfg, _ = tiny_vae(window=4)
    state = vae.init_stream_state(cfg, 1, max_frames=10_000, max_chunk=5)
    assert state.cache["k"].shape[2] == 4 + 5 - 1


def test_encoder_is_causal_and_ignores_padding(model):
    cfg, params = model
    key = jax.random.key(2)
    wave = 0.1 * jax.random.normal(key, (1, 16000))
    a = vae.encode(params, cfg, wave, sample=False)
    changed = wave.at[:, 9600:].set(0.3)  # frames >= 30 change
    b = vae.encode(params, cfg, changed, sample=False)
    _close(a.posterior[:, :30], b.posterior[:, :30], 1e-6)
    assert np.abs(np.asarray(a.posterior[:, 30:] - b.posterior[:, 30:])).max() > 1e-3
    # garbage beyond `lengths` is ignored: frames are built from zeros there
    c = vae.encode(params, cfg, changed, jnp.array([9600]), sample=False)
    _close(c.posterior[:, :30], a.posterior[:, :30], 1e-6)
    assert int(c.frame_num[0]) == 30


def test_decoder_and_semantic_are_causal(model):
    cfg, params = model
    z = jax.random.normal(jax.random.key(3), (1, 20, cfg.latent_dim))
    z2 = z.at[:, 12:].add(1.0)
    w1, w2 = vae.decode(params, cfg, z), vae.decode(params, cfg, z2)
    # frame k's ISTFT window starts pad samples before its hop region
    cut = 12 * cfg.hop - cfg.pad
    _close(w1[:, :cut], w2[:, :cut], 1e-6)
    assert np.abs(np.asarray(w1[:, cut:] - w2[:, cut:])).max() > 1e-4
    e1, _ = vae.unified_embedding(params, cfg, z)
    e2, _ = vae.unified_embedding(params, cfg, z2)
    _close(e1[:, :12], e2[:, :12], 1e-6)


def test_batch_with_padding_equals_one_by_one(model):
    cfg, params = model
    lens = [16000, 9000, 3210]
    waves = [0.1 * np.asarray(jax.random.normal(jax.random.key(10 + i), (n,))) for i, n in enumerate(lens)]
    batch = np.zeros((3, max(lens)), np.float32)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    enc = vae.encode(params, cfg, jnp.asarray(batch), jnp.asarray(lens), sample=False)
    dec = vae.decode(params, cfg, enc.mean, enc.frame_num)
    emb, _ = vae.unified_embedding(params, cfg, enc.mean)
    for i, w in enumerate(waves):
        one = vae.encode(params, cfg, jnp.asarray(w)[None], sample=False)
        t = int(one.frame_num[0])
        assert t == int(enc.frame_num[i])
        _close(enc.mean[i, :t], one.mean[0])
        wave_one = vae.decode(params, cfg, one.mean)
        _close(dec[i, : t * cfg.hop], wave_one[0])
        assert np.all(np.asarray(dec[i, t * cfg.hop :]) == 0)
        emb_one, _ = vae.unified_embedding(params, cfg, one.mean)
        _close(emb[i, :t], emb_one[0])


def test_incremental_unified_embedding_with_ragged_batch(model):
    """Right-padded first chunk (valid mask), then per-sequence continuation, equals each item alone."""
    cfg, params = model
    z = jax.random.normal(jax.random.key(4), (2, 15, cfg.latent_dim))
    lens = jnp.array([10, 6])
    cache = vae.init_semantic_cache(cfg, 2, 15)
    valid = jnp.arange(10)[None] < lens[:, None]
    e0, cache = vae.unified_embedding(params, cfg, z[:, :10], cache, valid)
    nxt = jnp.stack([z[0, 10:15], z[1, 6:11]])
    e1, cache = vae.unified_embedding(params, cfg, nxt, cache)
    np.testing.assert_array_equal(np.asarray(cache["length"]), [15, 11])
    w0, _ = vae.unified_embedding(params, cfg, z[:1])
    _close(e0[0], w0[0, :10])
    _close(e1[0], w0[0, 10:15])
    w1, _ = vae.unified_embedding(params, cfg, z[1:2, :11])
    _close(e1[1], w1[0, 6:11])


def test_sampling_uses_the_key_and_noise(model):
    cfg, params = model
    wave = 0.1 * jax.random.normal(jax.random.key(5), (1, 3200))
    a = vae.encode(params, cfg, wave, key=jax.random.key(0))
    b = vae.encode(params, cfg, wave, key=jax.random.key(0))
    c = vae.encode(params, cfg, wave, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a.latent), np.asarray(b.latent))
    assert np.abs(np.asarray(a.latent - c.latent)).max() > 1e-6
    eps = jnp.ones_like(a.mean)
    d = vae.encode(params, cfg, wave, noise=eps)
    _close(d.latent, a.mean + a.std)
    with pytest.raises(ValueError, match="key"):
        vae.encode(params, cfg, wave)


def test_entry_points_under_user_jit(model):
    cfg, params = model
    wave = 0.1 * jax.random.normal(jax.random.key(6), (2, 3200))

    @jax.jit
    def roundtrip(params, wave, key):
        enc = vae.encode(params, cfg, wave, key=key)
        emb, _ = vae.unified_embedding(params, cfg, enc.latent)
        full, _ = vae.decode_full(params, cfg, enc.latent)
        return vae.decode(params, cfg, enc.latent), emb, full

    w, emb, full = roundtrip(params, wave, jax.random.key(0))
    assert w.shape == (2, 3200) and emb.shape == (2, 10, cfg.unified_dim) and full.shape == (2, 3200)
    assert np.all(np.isfinite(np.asarray(w)))
    jitted_stream = jax.jit(lambda p, z, s: vae.decode_stream(p, cfg, z, s, last=True))
    y, _ = jitted_stream(params, jnp.zeros((2, 5, cfg.latent_dim)), vae.init_stream_state(cfg, 2, 5))
    assert y.shape == (2, 5 * cfg.hop)


def test_kl_divergence_formula():
    mean = jnp.array([[[1.0, 0.0]]])
    std = jnp.array([[[1.0, 2.0]]])
    want = (1 + 1 - 0 - 1) + (0 + 4 - np.log(4) - 1)
    np.testing.assert_allclose(float(vae.kl_divergence(vae.Posterior(mean, std))), want, rtol=1e-6)


def test_chunked_encode_and_decode_equal_whole(model):
    cfg, params = model
    wave = 0.1 * jax.random.normal(jax.random.key(7), (1, 23 * 320 + 17))
    whole = vae.encode(params, cfg, wave, key=jax.random.key(1))
    chunked = vae.encode_chunked(params, cfg, wave, chunk_frames=5, key=jax.random.key(1))
    _close(chunked.posterior, whole.posterior)
    _close(chunked.latent, whole.latent)
    np.testing.assert_array_equal(np.asarray(chunked.frame_num), np.asarray(whole.frame_num))
    _close(vae.decode_chunked(params, cfg, whole.mean, chunk_frames=7), vae.decode(params, cfg, whole.mean))
