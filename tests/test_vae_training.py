"""VAE-stage training blocks: mel loss, GAN losses, discriminators, and the alternating train step on real speech."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_vae
from unitok_jax.audio import load_audio
from unitok_jax.training import vae_losses as L
from unitok_jax.training import vae_step as S
from unitok_jax.training.discriminators import (
    DiscConfig,
    apply_discriminators,
    init_disc_params,
)

SPEECH = "/work/shared/data/librispeech-1089-134686-0000.flac"
MEL = L.MelLossConfig(resolutions=((512, 128, 64), (1024, 256, 80)))
DISC = DiscConfig(periods=(2, 3), mpd_channels=(4, 8, 16), stft_resolutions=((512, 128), (256, 64)), stft_channels=4,
                  stft_layers=2)


@pytest.fixture(scope="module")
def speech():
    """2 s of speech as a batch of two 1 s items, the second padded after 12345 samples."""
    wav = load_audio(SPEECH)[16000:48000]
    wave = np.stack([wav[:16000], wav[16000:32000]]).astype(np.float32)
    return {"wave": jnp.asarray(wave), "lengths": jnp.array([16000, 12345], jnp.int32)}


# ----------------------------------------------------------------------------------------------------- mel loss


def test_mel_loss_zero_for_identical_and_grows_with_noise(speech):
    x = speech["wave"]
    f = jax.jit(lambda a, b: L.multi_resolution_mel_loss(a, b, speech["lengths"], MEL))
    assert float(f(x, x)) == 0.0
    noise = jax.random.normal(jax.random.key(0), x.shape)
    losses = [float(f(x, x + s * noise)) for s in (1e-3, 1e-2, 1e-1)]
    assert 0 < losses[0] < losses[1] < losses[2], losses


def test_mel_loss_ignores_samples_past_length(speech):
    x, lengths = speech["wave"], speech["lengths"]
    y = x + 0.05 * jax.random.normal(jax.random.key(1), x.shape)
    f = jax.jit(lambda a, b, n: L.multi_resolution_mel_loss(a, b, n, MEL))
    base = float(f(x, y, lengths))
    past = jnp.arange(x.shape[1])[None, :] >= lengths[:, None]
    junk = 3.0 * jax.random.normal(jax.random.key(2), x.shape)
    assert float(f(jnp.where(past, junk, x), jnp.where(past, -junk, y), lengths)) == pytest.approx(base, rel=1e-6)
    # without lengths the junk does count
    assert abs(float(L.multi_resolution_mel_loss(x, jnp.where(past, junk, y), None, MEL))
               - float(L.multi_resolution_mel_loss(x, y, None, MEL))) > 1e-2
    # the padded item equals the same item cropped to its length
    n = int(lengths[1])
    one = L.multi_resolution_mel_loss(x[1:], jnp.where(past, junk, y)[1:], lengths[1:], MEL)
    cropped = L.multi_resolution_mel_loss(x[1:, :n], y[1:, :n], None, MEL)
    np.testing.assert_allclose(float(one), float(cropped), rtol=1e-5)


def test_framing_matches_librosa_magnitude():
    import librosa

    x = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
    ours = np.asarray(L.stft_magnitude(jnp.asarray(x[None]), 512, 128, eps=0.0))[0]
    ref = np.abs(librosa.stft(x, n_fft=512, hop_length=128, window="hann", center=True, pad_mode="constant")).T
    np.testing.assert_allclose(ours, ref, atol=2e-3 * ref.max())


# ---------------------------------------------------------------------------------------------------- GAN losses


def test_gan_losses_on_hand_made_logits():
    real = [jnp.array([2.0, 0.5]), jnp.array([[1.0, -1.0]])]
    fake = [jnp.array([-2.0, 0.5]), jnp.array([[0.0, 3.0]])]
    # hinge D: mean relu(1 - r) + mean relu(1 + f)
    d = (0 + 0.5) / 2 + (0 + 1.5) / 2 + (0 + 2) / 2 + (1 + 4) / 2
    assert float(L.discriminator_loss(real, fake, "hinge")) == pytest.approx(d)
    assert float(L.generator_adv_loss(fake, "hinge")) == pytest.approx(-(-1.5 / 2) - 3.0 / 2)
    # lsgan D: mean (1 - r)^2 + mean f^2
    d = (1 + 0.25) / 2 + (4 + 0.25) / 2 + (0 + 4) / 2 + (0 + 9) / 2
    assert float(L.discriminator_loss(real, fake, "lsgan")) == pytest.approx(d)
    assert float(L.generator_adv_loss(fake, "lsgan")) == pytest.approx((9 + 0.25) / 2 + (1 + 4) / 2)
    # a perfect discriminator has zero loss; the generator loss falls as fakes look real
    big = [jnp.full((3,), 5.0)]
    for kind in ("hinge", "lsgan"):
        if kind == "hinge":
            assert float(L.discriminator_loss(big, [-b for b in big], kind)) == 0.0
        else:
            assert float(L.discriminator_loss([jnp.ones(3)], [jnp.zeros(3)], kind)) == 0.0
        assert float(L.generator_adv_loss([jnp.ones(3)], kind)) < float(L.generator_adv_loss([-jnp.ones(3)], kind))
    with pytest.raises(ValueError, match="wgan"):
        L.discriminator_loss(real, fake, "wgan")


def test_feature_matching_and_total():
    r = [[jnp.ones((2, 3)), jnp.zeros((2, 4))]]
    f = [[jnp.zeros((2, 3)), jnp.full((2, 4), 2.0)]]
    assert float(L.feature_matching_loss(r, f)) == pytest.approx((1 + 2) / 2)
    assert float(L.feature_matching_loss(r, r)) == 0.0
    tot = L.generator_loss(jnp.float32(2.0), jnp.float32(3.0), jnp.float32(4.0), jnp.float32(100.0))
    assert float(tot) == pytest.approx(15 * 2 + 3 + 4 + 1e-4 * 100)
    tot = L.generator_loss(2.0, 3.0, 4.0, 100.0, {"mel": 1.0, "kl": 0.0})
    assert float(tot) == pytest.approx(2 + 3 + 4)
    with pytest.raises(ValueError, match="unknown loss weight"):
        L.loss_weights({"mell": 1.0})


def test_noise_augment_per_sample_scale():
    z = jnp.zeros((64, 10, 4))
    out = L.noise_augment(z, jax.random.key(0), 0.8)
    std = np.asarray(jnp.std(out, axis=(1, 2)))
    assert np.all(std < 0.8 * 1.6) and std.min() < 0.2 and std.max() > 0.6  # sigma = tau * u varies per sample
    assert np.array_equal(np.asarray(L.noise_augment(z + 1.0, jax.random.key(0), 0.0)), np.ones(z.shape))


# ------------------------------------------------------------------------------------------------ discriminators


def test_discriminators_shapes_and_gradients():
    cfg = DISC
    params = init_disc_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 3001))
    logits, feats = jax.jit(lambda p, w: apply_discriminators(p, cfg, w))(params, x)
    assert len(logits) == len(feats) == cfg.num_discriminators == 4
    for i, p in enumerate(cfg.periods):
        t = -(-3001 // p)
        assert feats[i][0].shape == (2, -(-t // cfg.mpd_stride), p, cfg.mpd_channels[0])
        assert len(feats[i]) == len(cfg.mpd_channels) + 1
        assert logits[i].shape[0] == 2 and logits[i].shape[1] % p == 0
    for j, (n_fft, hop) in enumerate(cfg.stft_resolutions):
        fm = feats[len(cfg.periods) + j]
        assert fm[0].shape == (2, 3001 // hop + 1, n_fft // 2 + 1, cfg.stft_channels)
        assert fm[-1].shape[-1] == 1 and len(fm) == cfg.stft_layers + 3
        assert logits[len(cfg.periods) + j].shape == (2, fm[-1].shape[1] * fm[-1].shape[2])

    def loss(p, w):
        lg, fm = apply_discriminators(p, cfg, w)
        return L.discriminator_loss(lg, [-v for v in lg], "lsgan") + sum(jnp.mean(f[-2] ** 2) for f in fm)

    gp, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    for path, g in jax.tree_util.tree_leaves_with_path(gp):
        assert np.isfinite(np.asarray(g)).all() and float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)
    assert float(jnp.max(jnp.abs(gw))) > 0


# -------------------------------------------------------------------------------------------------- train step


@pytest.fixture(scope="module")
def trainer():
    vcfg, params = tiny_vae()
    cfg = S.VAETrainConfig(vae=vcfg, mel=MEL, gan_loss="hinge")
    dcfg, ocfg = DISC, S.OptConfig(lr=1e-3)
    step = jax.jit(S.vae_train_step, static_argnums=(2, 3, 4), donate_argnums=0)
    return cfg, dcfg, ocfg, params, step


def test_train_step_reduces_mel_loss(trainer, speech):
    cfg, dcfg, ocfg, params, step = trainer
    state = S.init_vae_train_state(cfg, params, dcfg, ocfg, jax.random.key(0))
    semantic_before = np.asarray(state["gen_params"]["decoder"]["fc2"]["kernel"]).copy()
    mels = []
    for _ in range(30):
        state, m = step(state, speech, cfg, dcfg, ocfg)
        mels.append(float(m["mel"]))
        assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss_g"])) and np.isfinite(float(m["loss_d"]))
    first, last = np.mean(mels[:5]), np.mean(mels[-5:])
    print(f"mel loss: first 5 mean {first:.4f}, last 5 mean {last:.4f}")
    assert last < 0.75 * first, mels
    assert int(state["step"]) == 30 and int(state["num_skipped"]) == 0
    assert set(m) >= {"loss_d", "loss_g", "mel", "adv", "fm", "kl", "grad_norm_d", "grad_norm_g", "skipped"}
    # the semantic path is frozen in S0
    np.testing.assert_array_equal(np.asarray(state["gen_params"]["decoder"]["fc2"]["kernel"]), semantic_before)


def test_nan_batch_is_skipped(trainer, speech):
    cfg, dcfg, ocfg, params, step = trainer
    state = S.init_vae_train_state(cfg, params, dcfg, ocfg, jax.random.key(0))
    state, m = step(state, speech, cfg, dcfg, ocfg)
    assert int(m["skipped"]) == 0
    before = {k: jax.tree_util.tree_map(np.asarray, v) for k, v in state.items() if k != "rng"}
    bad = {"wave": speech["wave"].at[0, 100].set(jnp.nan), "lengths": speech["lengths"]}
    state, m = step(state, bad, cfg, dcfg, ocfg)
    assert int(m["skipped"]) == 1 and int(state["num_skipped"]) == 1
    for k in ("gen_params", "disc_params", "gen_opt_state", "disc_opt_state"):
        for a, b in zip(jax.tree_util.tree_leaves(before[k]), jax.tree_util.tree_leaves(state[k]), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
    state, m = step(state, speech, cfg, dcfg, ocfg)
    assert int(m["skipped"]) == 0 and int(state["num_skipped"]) == 1 and int(state["step"]) == 3


def test_step_without_discriminators_matches_masked_gan_step(trainer, speech):
    """Before adv_start_step the lean step (gan=False: no discriminator at all) updates the generator as the GAN
    step does with its adversarial terms masked, and leaves the discriminators and their optimizer as they were."""
    import dataclasses

    cfg, dcfg, ocfg, params, step = trainer
    cfg = dataclasses.replace(cfg, adv_start_step=100)
    lean = jax.jit(functools.partial(S.vae_train_step, gan=False), static_argnums=(2, 3, 4))
    full = jax.jit(S.vae_train_step, static_argnums=(2, 3, 4))
    s0 = S.init_vae_train_state(cfg, params, dcfg, ocfg, jax.random.key(0))
    a, ma = lean(s0, speech, cfg, dcfg, ocfg)
    b, mb = full(s0, speech, cfg, dcfg, ocfg)
    for k in ("mel", "kl", "loss_g", "grad_norm_g"):
        np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-5, err_msg=k)
    assert float(ma["loss_d"]) == 0.0 and float(mb["loss_d"]) != 0.0  # the GAN step did run its discriminators
    for x, y in zip(jax.tree_util.tree_leaves(a["gen_params"]), jax.tree_util.tree_leaves(b["gen_params"]),
                    strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    for k in ("disc_params", "disc_opt_state"):
        for x, y in zip(jax.tree_util.tree_leaves(s0[k]), jax.tree_util.tree_leaves(a[k]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(a["step"]) == 1 and int(a["num_skipped"]) == 0
    bad = {"wave": speech["wave"].at[0, 100].set(jnp.nan), "lengths": speech["lengths"]}
    c, mc = lean(a, bad, cfg, dcfg, ocfg)
    assert int(mc["skipped"]) == 1 and int(c["num_skipped"]) == 1
    for x, y in zip(jax.tree_util.tree_leaves(a["gen_params"]), jax.tree_util.tree_leaves(c["gen_params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_config_validation(trainer):
    vcfg = trainer[0].vae
    with pytest.raises(ValueError, match="gan_loss"):
        S.VAETrainConfig(vae=vcfg, gan_loss="wgan")
    cfg = S.VAETrainConfig(vae=vcfg, weights={"adv": 2.0})
    assert dict(cfg.weights) == {"mel": 15.0, "adv": 2.0, "fm": 1.0, "kl": 1e-4}
    hash(cfg)


def test_generator_forward_noise_augmentation(trainer, speech):
    cfg, _, _, params, _ = trainer
    import dataclasses

    plain = dataclasses.replace(cfg, sample_posterior=False)
    noisy = dataclasses.replace(plain, noise_tau=0.5)
    key = jax.random.key(3)
    a, kl_a = S.generator_forward(params, plain, speech["wave"], speech["lengths"], key)
    b, _ = S.generator_forward(params, plain, speech["wave"], speech["lengths"], jax.random.key(4))
    c, kl_c = S.generator_forward(params, noisy, speech["wave"], speech["lengths"], key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # no randomness without sampling or noise
    assert float(jnp.max(jnp.abs(a - c))) > 1e-4 and float(kl_a) == float(kl_c)  # noise only at the decoder input
    assert a.shape == speech["wave"].shape and float(jnp.max(jnp.abs(a[1, 12345:]))) == 0.0


def test_cosine_lr_schedule():
    """decay_steps > 0: Adam's step size (~lr for a steady gradient) falls from lr to final_lr_ratio * lr; the
    config key train.lr_schedule=cosine decays over train.steps, an unknown schedule is refused."""
    from unitok_jax.configs import vae as vae_configs
    from unitok_jax.training import vae_train

    opt = S.OptConfig(lr=1e-2, decay_steps=10, final_lr_ratio=0.1, weight_decay=0.0)
    tx = S._adamw(opt.lr, opt, None)
    p = {"w": jnp.zeros(3)}
    st = tx.init(p)
    sizes = []
    for _ in range(12):
        u, st = tx.update({"w": jnp.ones(3)}, st, p)
        sizes.append(float(jnp.abs(u["w"][0])))
    np.testing.assert_allclose(sizes[0], 1e-2, rtol=1e-3)
    np.testing.assert_allclose(sizes[5], 1e-2 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 5 / 10))), rtol=1e-3)
    np.testing.assert_allclose(sizes[10:], 1e-3, rtol=1e-3)
    const = S._adamw(1e-2, S.OptConfig(lr=1e-2), None)
    u, _ = const.update({"w": jnp.ones(3)}, const.init(p), p)
    np.testing.assert_allclose(float(jnp.abs(u["w"][0])), 1e-2, rtol=1e-3)

    c = vae_configs.get_config("tiny")
    c.train.steps, c.train.lr_schedule, c.train.lr_final_ratio = 700, "cosine", 0.2
    ocfg = vae_train.vae_objects(c)[3]
    assert (ocfg.decay_steps, ocfg.final_lr_ratio) == (700, 0.2)
    c.train.lr_schedule = "constant"
    assert vae_train.vae_objects(c)[3].decay_steps == 0
    c.train.lr_schedule = "linear"
    with pytest.raises(Exception, match="lr_schedule"):
        vae_train.vae_objects(c)
