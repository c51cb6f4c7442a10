"""Flow head parity against the reference fixtures (flow_head.*). Dims come from flow_head.config.json; the weights
go through our own converter."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from conftest import FIXTURES, load_fixture, rel_err
from unitok_jax import flow
from unitok_jax.convert.common import ConversionError, read_weights
from unitok_jax.convert.flow import convert_dit, convert_flow_head

TOL = 1e-4
pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def ref():
    cfg_json, d = load_fixture("flow_head")
    weights = read_weights(str(FIXTURES / "flow_head.safetensors"))
    cfg, params = convert_flow_head(weights, cfg_json["kwargs"], patch_size=cfg_json["patch_size"])
    return cfg_json, cfg, params, d, weights


def test_flow_timestep_grid_parity(ref):
    cj, _, _, d, _ = ref
    sway = cj.get("sway_sampling_coef", -1.0)
    grid = flow.time_grid(cj["steps"], cj.get("use_epss", True), sway)
    assert rel_err(grid, d["sample_timesteps"]) <= TOL
    np.testing.assert_allclose(np.asarray(grid), d["sample_timesteps"], atol=1e-6)


def test_flow_dit_forward_parity(ref):
    _, cfg, params, d, _ = ref
    out, state = flow.DiT(cfg).apply(
        {"params": params}, d["dit_x"], d["dit_t"], d["dit_c"], d["dit_latent_history"], all_tokens=True,
        mutable=["intermediates"],
    )
    inter = state["intermediates"]
    assert rel_err(inter["t_emb"][0], d["dit_t_emb"]) <= TOL
    assert rel_err(inter["block_outputs"][0], d["dit_block_outputs"]) <= TOL
    assert rel_err(out, d["dit_out"]) <= TOL
    v = flow.dit_apply(params, cfg, d["dit_x"], d["dit_t"], d["dit_c"], d["dit_latent_history"])
    assert rel_err(v, d["dit_out"][:, -cfg.patch_size:]) <= TOL


def test_flow_dit_cfg_parity(ref):
    cj, cfg, params, d, _ = ref
    both = flow.cfg_velocities(params, cfg, d["cfg_x"], d["cfg_t"], d["cfg_c"], d["cfg_latent_history"])
    assert rel_err(both, d["cfg_out"]) <= TOL
    guided = flow.guided_velocity(params, cfg, d["cfg_x"], d["cfg_t"], d["cfg_c"], d["cfg_latent_history"],
                                  cfg=cj["cfg_scale"])
    assert rel_err(guided, d["cfg_guided"]) <= TOL


def test_flow_sampler_parity(ref):
    """The full sampler fed the recorded initial noise and per-step SDE noise (only the first steps-1 are used)."""
    cj, cfg, params, d, _ = ref
    x, traj = flow.sample(
        params, cfg, jax.random.key(0), d["sample_c"], d["sample_latent_history"],
        steps=cj["steps"], cfg=cj["cfg_scale"], sway=cj["sway_sampling_coef"], use_epss=cj["use_epss"],
        init_noise=d["sample_noise"].transpose(0, 2, 1), step_noise=d["sample_sde_noise"], return_trajectory=True,
    )
    assert rel_err(traj, d["sample_trajectory"]) <= TOL
    assert rel_err(x, d["sample_out"]) <= TOL


def test_flow_rotary_layout_flag_is_live(ref):
    """The x_transformers 1.26-1.30 'half' layout is a real alternative: it must change the output."""
    _, cfg, params, d, _ = ref
    half = dataclasses.replace(cfg, rope_layout="half")
    out = flow.DiT(half).apply({"params": params}, d["dit_x"], d["dit_t"], d["dit_c"], d["dit_latent_history"],
                               all_tokens=True)
    assert rel_err(out, d["dit_out"]) > 1e-3


def test_flow_convert_tree_matches_init(ref):
    _, cfg, params, _, _ = ref
    init = flow.init_dit(cfg, jax.random.key(0))
    assert jax.tree.structure(init) == jax.tree.structure(params)
    shapes = jax.tree.map(lambda a, b: a.shape == b.shape, init, params)
    assert all(jax.tree.leaves(shapes))


def test_flow_convert_prefixes_and_errors(ref):
    cj, cfg, params, _, weights = ref
    full = {"flowloss." + k: v for k, v in weights.items()}
    full["model.model.norm.weight"] = np.ones(3, np.float32)  # another component's key: not ours to check
    p2 = convert_dit(full, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params)))

    missing = dict(weights)
    del missing["cfm.model.blocks.1.attn.to_k.bias"]
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn\.to_k\.bias"):
        convert_dit(missing, cfg)

    bad = dict(weights)
    bad["cfm.model.x_embedder.weight"] = np.zeros((cfg.hidden_size, cfg.z_channels + 1), np.float32)
    with pytest.raises(ConversionError, match=r"x_embedder\.weight.*shape.*expected"):
        convert_dit(bad, cfg)

    extra = dict(weights)
    extra[f"cfm.model.blocks.{cfg.depth}.norm1.weight"] = np.ones(cfg.hidden_size, np.float32)
    with pytest.raises(ConversionError, match="unexpected"):
        convert_dit(extra, cfg)

    wrong_heads = dict(cj["kwargs"], num_heads=cfg.num_heads * 2)
    with pytest.raises(ConversionError, match="inv_freq.*num_heads"):
        convert_flow_head(weights, wrong_heads, patch_size=cfg.patch_size)

    with pytest.raises(ConversionError, match="unknown flow-head config"):
        convert_flow_head(weights, dict(cj["kwargs"], mystery=1), patch_size=cfg.patch_size)

    qk = dict(cj["kwargs"], qk_norm="rms_norm")  # config asks for q/k norms the weights do not have
    with pytest.raises(ConversionError, match=r"attn\.q_norm\.weight"):
        convert_flow_head(weights, qk, patch_size=cfg.patch_size)
