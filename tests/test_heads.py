"""LinearPooling and the stop head: parity against heads.* fixtures, stop labels and the hard-negative stop loss."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, load_fixture, rel_err
from unitok_jax import heads
from unitok_jax.convert.common import ConversionError, read_weights
from unitok_jax.convert.flow import convert_heads, convert_pooling, convert_stop_head, heads_config_from_bailingmm

TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    cj, d = load_fixture("heads")
    cfg = heads.HeadsConfig(
        semantic_dim=cj["linear_proj_audio"]["hidden_size"],
        llm_dim=cj["linear_proj_audio"]["llm_input_dim"],
        patch_size=cj["patch_size"],
    )
    assert cj["stop_head"]["in_features"] == cfg.llm_dim and cj["stop_head"]["out_features"] == 2
    weights = read_weights(str(FIXTURES / "heads.safetensors"))
    return cfg, convert_heads(weights, cfg), d, weights


@pytest.mark.parity
def test_heads_pooling_parity(ref):
    cfg, params, d, _ = ref
    out, state = cfg.pooling().apply({"params": params["pooling"]}, d["pool_in"], mutable=["intermediates"])
    assert rel_err(state["intermediates"]["pre_mean"][0], d["pool_pre_mean"]) <= TOL
    assert rel_err(out, d["pool_out"]) <= TOL


@pytest.mark.parity
def test_heads_stop_head_parity(ref):
    _, params, d, _ = ref
    logits = heads.StopHead().apply({"params": params["stop_head"]}, d["stop_in"])
    assert rel_err(logits, d["stop_logits"]) <= TOL
    assert rel_err(heads.stop_probability(logits), d["stop_prob"]) <= TOL


def test_heads_pooling_over_a_sequence_equals_per_patch(ref):
    cfg, params, d, _ = ref
    pool = cfg.pooling()
    x = jnp.asarray(d["pool_in"])  # [N, p, U]
    per_patch = pool.apply({"params": params["pooling"]}, x)  # [N, 1, D]
    seq = pool.apply({"params": params["pooling"]}, x.reshape(1, -1, cfg.semantic_dim))  # [1, N, D]
    np.testing.assert_allclose(np.asarray(seq[0]), np.asarray(per_patch[:, 0]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        pool.apply({"params": params["pooling"]}, x[:, :3])


def test_heads_fresh_pooling_is_zero_initialised():
    cfg = heads.HeadsConfig(semantic_dim=6, llm_dim=4, patch_size=2)
    params = nn.meta.unbox(cfg.pooling().init(jax.random.key(0), jnp.ones((1, 2, 6)))["params"])
    assert params["linear"]["kernel"].shape == (6, 4)
    assert not np.any(np.asarray(params["linear"]["kernel"])) and not np.any(np.asarray(params["linear"]["bias"]))
    out = cfg.pooling().apply({"params": params}, jnp.ones((3, 4, 6)))
    assert out.shape == (3, 2, 4) and not np.any(np.asarray(out))


def test_heads_stop_labels_layout():
    # sequence: 4 text tokens, <audio> at 4, patches at 5..12 (P = 8); second row: P = 3 at 2..4
    labels = np.asarray(heads.stop_labels(jnp.array([5, 2]), jnp.array([8, 3]), 14))
    ig = heads.IGNORE
    assert labels[0].tolist() == [ig] * 5 + [0] * 4 + [ig] * 3 + [1] + [ig]
    assert labels[1].tolist() == [ig] * 4 + [1] + [ig] * 9  # too short for a negative
    none = np.asarray(heads.stop_labels(jnp.array([3]), jnp.array([0]), 6))
    assert (none == ig).all()


def _reference_stop_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """The reference StopLossOne semantics in numpy (pred [B, S, 2]; every row has a candidate)."""
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    pos = labels == 1
    ce_pos = -logp[..., 1][pos].mean()
    p0 = np.exp(logp[..., 0])
    p0 = np.where(labels != 0, 999.0, p0)
    idx = p0.argmin(-1)
    ce_neg = -logp[np.arange(len(idx)), idx, 0].mean()
    return 0.5 * ce_pos + 0.5 * ce_neg


def test_heads_stop_loss_matches_reference_semantics():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 16, 2)).astype(np.float32) * 2
    labels = np.asarray(heads.stop_labels(jnp.array([2, 4, 3]), jnp.array([12, 9, 10]), 16))
    loss, aux = heads.stop_loss(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(loss), _reference_stop_loss(logits, labels), rtol=1e-5)
    p1 = np.asarray(jax.nn.softmax(logits, -1)[..., 1])
    for b in range(3):
        cand = np.flatnonzero(labels[b] == 0)
        assert aux["hard_negative"][b] == cand[np.argmax(p1[b, cand])]
    assert 0.0 < float(aux["likely_pos"]) < 1.0 and 0.0 < float(aux["likely_neg"]) < 1.0


def test_heads_stop_loss_gradient_only_at_positive_and_hard_negative():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 12, 2)).astype(np.float32))
    labels = heads.stop_labels(jnp.array([1, 2]), jnp.array([10, 9]), 12)
    g = np.asarray(jax.grad(lambda z: heads.stop_loss(z, labels)[0])(logits))
    _, aux = heads.stop_loss(logits, labels)
    live = np.zeros((2, 12), bool)
    live[np.asarray(labels) == 1] = True
    live[np.arange(2), np.asarray(aux["hard_negative"])] = True
    assert np.all(np.abs(g).sum(-1)[live] > 0)
    assert np.all(g[~live] == 0)


def test_heads_stop_loss_edge_cases():
    logits = jnp.zeros((2, 6, 2))
    only_pos = jnp.array([[-100, -100, 1, -100, -100, -100], [-100] * 6])
    loss, _ = heads.stop_loss(logits, only_pos)
    np.testing.assert_allclose(float(loss), 0.5 * np.log(2), rtol=1e-6)  # no negative anywhere: that term is 0
    loss, _ = heads.stop_loss(logits, jnp.full((2, 6), -100))
    assert float(loss) == 0.0


def test_heads_convert_errors_and_config(ref):
    cfg, _, _, weights = ref
    bad = dict(weights)
    bad["stop_head.weight"] = np.zeros((3, cfg.llm_dim), np.float32)
    with pytest.raises(ConversionError, match=r"stop_head\.weight.*\(3, .*expected \(2, "):
        convert_stop_head(bad, cfg)
    missing = {k: v for k, v in weights.items() if "norm_final" not in k}
    with pytest.raises(ConversionError, match="norm_final"):
        convert_pooling(missing, cfg)
    extra = dict(weights)
    extra["linear_proj_audio.final_layer.extra.weight"] = np.ones(2, np.float32)
    with pytest.raises(ConversionError, match="unexpected"):
        convert_pooling(extra, cfg)
    full_cfg = {"llm_config": {"hidden_size": 64},
                "audio_tokenizer_config": {"patch_size": 5,
                                           "semantic_module_kwargs": {"whisper_encoder": {"n_state": 48}}}}
    assert heads_config_from_bailingmm(full_cfg) == cfg
    with pytest.raises(ConversionError, match="hidden_size"):
        heads_config_from_bailingmm({"audio_tokenizer_config": full_cfg["audio_tokenizer_config"], "llm_config": {}})
