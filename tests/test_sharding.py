"""Sharding on 8 simulated CPU devices: meshes from config, params born sharded as the logical rules say, sharded
forward / decode == single-device, expert parallelism (values and gradients), and streaming a checkpoint straight
into sharded params.

XLA's device count is fixed when jax initialises, and other test modules initialise it first in the same pytest
process, so the 8-device part runs in a subprocess (this file, run as a script) and reports JSON.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

MESHES = {
    "data2_fsdp2_expert2": {"data": 2, "fsdp": 2, "expert": 2},
    "fsdp4_tensor2": {"fsdp": 4, "tensor": 2},
}

# (param path, logical names) -> mesh spec expected under DEFAULT_RULES, written out by hand.
EXPECTED_SPECS = {
    "embed/embedding": ["tensor", "fsdp"],
    "lm_head": ["fsdp", "tensor"],
    "final_norm/scale": [None],
    "moe/layers/attn/q/kernel": [None, "fsdp", "tensor", None],
    "moe/layers/attn/q/bias": [None, "tensor", None],
    "moe/layers/attn/k/kernel": [None, "fsdp", "tensor", None],
    "moe/layers/attn/o/kernel": [None, "tensor", None, "fsdp"],
    "moe/layers/attn_norm/scale": [None, None],
    "moe/layers/moe/gate": [None, "fsdp", None],
    "moe/layers/moe/audio_gate": [None, "fsdp", None],
    "moe/layers/moe/wi_gate": [None, "expert", "fsdp", "tensor"],
    "moe/layers/moe/wi_up": [None, "expert", "fsdp", "tensor"],
    "moe/layers/moe/wo": [None, "expert", "tensor", "fsdp"],
    "moe/layers/moe/shared/gate/kernel": [None, "fsdp", "tensor"],
    "moe/layers/moe/shared/down/kernel": [None, "tensor", "fsdp"],
}


# ------------------------------------------------------------------------------------------ subprocess side


# A tiny model whose dims divide every mesh axis used here (the fixture sets may not).
HF = {
    "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
    "use_qkv_bias": True, "use_bias": True, "rms_norm_eps": 1e-6, "norm_head": False, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "rope_scaling": None, "num_experts": 4, "num_shared_experts": 1,
    "num_experts_per_tok": 2, "norm_topk_prob": True, "moe_intermediate_size": 32, "first_k_dense_replace": 0,
    "multi_gate": True,
}


def _worker(tmp: str) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import save_file

    jax.config.update("jax_default_matmul_precision", "highest")
    from unitok_jax import sharding as shd
    from unitok_jax.convert.llm import convert_llm, export_llm, load_llm
    from unitok_jax.llm import BailingMoeLM, LLMConfig, decode_step, init_cache, prefill, random_params

    assert jax.device_count() == 8, jax.devices()
    cfg = LLMConfig.from_hf(HF)
    ckpt = str(pathlib.Path(tmp) / "llm.safetensors")
    save_file(export_llm(cfg, random_params(cfg, 0)), ckpt)  # a reference-layout checkpoint
    _, host = convert_llm(ckpt, HF)
    model = BailingMoeLM(cfg)
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, size=(4, 12)).astype(np.int32)

    def run(params, ids):
        out = model.apply(params, ids)
        cache = init_cache(cfg, ids.shape[0], ids.shape[1])
        _, _, cache = prefill(model, params, cache, input_ids=ids[:, :8])
        steps = []
        for s in range(8, ids.shape[1]):
            lg, _, cache = decode_step(model, params, cache, input_ids=ids[:, s])
            steps.append(lg)
        return out["logits"], out["hidden"], jnp.stack(steps, 1)

    single = jax.jit(run)(jax.tree.map(jnp.asarray, host), ids)
    res: dict = {"mesh_shapes": {}, "meshes": {}}
    for name, axes in {**MESHES, "data2_rest": {"data": 2, "fsdp": -1}}.items():
        res["mesh_shapes"][name] = list(shd.make_mesh({"mesh": axes}).devices.shape)

    rules = shd.DEFAULT_RULES
    for name, axes in MESHES.items():
        mesh = shd.make_mesh({"mesh": axes})
        r: dict = {}
        init = shd.init_sharded(model, jax.random.PRNGKey(0), ids, mesh=mesh, rules=rules)
        _, loaded = load_llm(ckpt, HF, mesh=mesh, rules=rules)

        def describe(tree):
            out = {}
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree["params"]):
                key = "/".join(p.key for p in path)
                devs = {s.device for s in leaf.addressable_shards}
                out[key] = {
                    "spec": [x if not isinstance(x, tuple) else list(x) for x in leaf.sharding.spec]
                    + [None] * (leaf.ndim - len(leaf.sharding.spec)),
                    "shape": list(leaf.shape),
                    "shard": list(leaf.addressable_shards[0].data.shape),
                    "devices": len(devs),
                }
            return out

        r["init"] = describe(init)
        r["loaded"] = describe(loaded)
        r["load_max_abs_diff"] = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(host))
        )
        with shd.use_sharding(mesh, rules):
            jrun = jax.jit(run)
            r["expert_parallel_lowered"] = "manual_computation" in jrun.lower(loaded, ids).as_text()
            sharded = jrun(loaded, ids)
        r["fwd_vs_single"] = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(sharded, single)]
        r["single_scale"] = [float(np.max(np.abs(np.asarray(b)))) for b in single]
        r["logits_sharding"] = str(sharded[0].sharding)
        res["meshes"][name] = r

    # The MoE layer alone under expert parallelism, for every implementation: values and gradients.
    from unitok_jax.moe import MoE

    mesh = shd.make_mesh({"mesh": MESHES["data2_fsdp2_expert2"]})
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 16)), jnp.float32)
    am = jnp.asarray(np.random.default_rng(1).random((4, 6)) < 0.5)
    res["ep_module"] = {}
    for impl in ("loop", "tiled", "ragged", "dense"):
        m = MoE(num_experts=4, top_k=2, expert_dim=24, shared_dim=8, multi_gate=True, impl=impl)
        boxed = shd.abstract_init(m, x)
        params = jax.jit(lambda r, m=m: nn.unbox(m.init(r, x)))(jax.random.PRNGKey(2))

        def loss(p, x, m=m):
            y, info = m.apply(p, x, audio_mask=am)
            return jnp.sum(jnp.sin(y)) + info["aux_loss"], y

        f = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (_, y0), g0 = jax.jit(f)(params, x)
        with shd.use_sharding(mesh, rules):
            jf = jax.jit(f)
            manual = "manual_computation" in jf.lower(shd.put_sharded(params, boxed, mesh, rules), x).as_text()
            (_, y1), g1 = jf(shd.put_sharded(params, boxed, mesh, rules), x)
        res["ep_module"][impl] = {
            "manual": manual,
            "y": float(jnp.max(jnp.abs(y1 - y0))),
            "grad": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0))),
        }

    # Expert parallelism by exchange (dispatch "a2a": the routed rows to their experts' devices and back) against
    # one device, values and gradients: top-2 on data 2 x expert 4; top-1 with every token on expert 0 (a zero
    # router: the other devices receive nothing); with the expert width split over a tensor axis. On CPU the ragged
    # all-to-all runs as its all-gather emulation; with the backend check pointed at a GPU the same layer lowers
    # to ragged_all_to_all (forward and backward).
    from unitok_jax import moe as moe_lib

    res["ep_a2a"] = {}
    for name, axes, k, impl, zero in (("data2_expert4_top2", {"data": 2, "expert": 4}, 2, "tiled", False),
                                      ("data2_expert4_top1_empty", {"data": 2, "expert": 4}, 1, "dense", True),
                                      ("fsdp2_tensor2_expert2", {"fsdp": 2, "tensor": 2, "expert": 2}, 2, "tiled",
                                       False)):
        mesh = shd.make_mesh({"mesh": axes})
        m = MoE(num_experts=8, top_k=k, expert_dim=24, shared_dim=8, impl=impl, dispatch="a2a")
        boxed = shd.abstract_init(m, x)
        params = jax.jit(lambda r, m=m: nn.unbox(m.init(r, x)))(jax.random.PRNGKey(2))
        if zero:
            params = jax.tree_util.tree_map_with_path(lambda p, v: v * 0 if p[-1].key == "gate" else v, params)

        def loss(p, x, m=m):
            y, info = m.apply(p, x)
            return jnp.sum(jnp.sin(y)) + info["aux_loss"], (y, info["counts"])

        f = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (_, (y0, counts)), g0 = jax.jit(f)(params, x)
        with shd.use_sharding(mesh, rules):
            placed = shd.put_sharded(params, boxed, mesh, rules)
            jf = jax.jit(f)
            text = jf.lower(placed, x).as_text()
            (_, (y1, _)), g1 = jf(placed, x)
            backend = moe_lib.jax.default_backend
            moe_lib.jax.default_backend = lambda: "gpu"
            try:
                gpu_text = jax.jit(lambda p, x, f=f: f(p, x)).lower(placed, x).as_text()
            finally:
                moe_lib.jax.default_backend = backend
        res["ep_a2a"][name] = {
            "exchange": "all_to_all" in text, "ragged_ops": gpu_text.count("ragged_all_to_all"),
            "empty_experts": int(np.sum(np.asarray(counts) == 0)),
            "y": float(jnp.max(jnp.abs(y1 - y0))),
            "grad": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0))),
        }

    # Rules come from the config: dropping the expert rule replicates the expert axis.
    mesh = shd.make_mesh({"mesh": MESHES["data2_fsdp2_expert2"]})
    sc = shd.ShardingConfig.from_dict({"mesh": MESHES["data2_fsdp2_expert2"],
                                       "rules": [["expert", None], ["embed", ["fsdp", "expert"]], ["mlp", "tensor"]]})
    boxed = shd.abstract_init(model, ids)
    sh = shd.shardings_for(boxed, mesh, sc.rules)["params"]["moe"]["layers"]["moe"]["wi_gate"]
    res["custom_rules_wi_gate"] = [x if not isinstance(x, tuple) else list(x) for x in sh.spec]
    return res


# ---------------------------------------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from conftest import xla_flags

    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    tmp = tmp_path_factory.mktemp("sharding")
    proc = subprocess.run([sys.executable, __file__, str(tmp)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharding_mesh_from_config(results):
    assert results["mesh_shapes"] == {
        "data2_fsdp2_expert2": [2, 2, 1, 2],
        "fsdp4_tensor2": [1, 4, 2, 1],
        "data2_rest": [2, 4, 1, 1],
    }


def test_sharding_mesh_shape_rules():
    from unitok_jax.sharding import ShardingConfig, mesh_shape

    assert mesh_shape((("data", 2), ("fsdp", -1), ("tensor", 1), ("expert", 2)), 8) == (2, 2, 1, 2)
    with pytest.raises(ValueError, match="at most one"):
        mesh_shape((("data", -1), ("fsdp", -1)), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        mesh_shape((("data", 2), ("fsdp", 2)), 8)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_shape((("data", 3), ("fsdp", -1)), 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        ShardingConfig.from_dict({"mesh": {"model": 2}})


@pytest.mark.parametrize("mesh", sorted(MESHES))
@pytest.mark.parametrize("source", ["init", "loaded"])
def test_sharding_params_follow_rules(results, mesh, source):
    params = results["meshes"][mesh][source]
    sizes = dict(zip(["data", "fsdp", "tensor", "expert"], results["mesh_shapes"][mesh]))
    for path, spec in EXPECTED_SPECS.items():
        got = params[path]
        assert got["spec"] == spec, (path, got["spec"], spec)
        expect_shard = [n // (sizes[a] if a else 1) for n, a in zip(got["shape"], spec)]
        assert got["shard"] == expect_shard, (path, got)
    # Every param is spread over all 8 devices, and the big ones are really split (never whole on one device).
    assert all(p["devices"] == 8 for p in params.values())
    for path in ("moe/layers/moe/wi_gate", "moe/layers/moe/wo", "embed/embedding", "lm_head"):
        p = params[path]
        assert 2 * _prod(p["shard"]) <= _prod(p["shape"]), (path, p)


def _prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_sharding_forward_and_decode_equal_single_device(results, mesh):
    r = results["meshes"][mesh]
    logits, hidden, steps = r["fwd_vs_single"]
    assert logits < 1e-4 and hidden < 1e-4 and steps < 1e-4, r["fwd_vs_single"]
    assert min(r["single_scale"]) > 0.1  # non-trivial outputs
    assert r["load_max_abs_diff"] == 0.0  # streamed slices == whole-tensor conversion


def test_sharding_expert_parallel_moe(results):
    # The model runs its MoE layers with shard_map expert parallelism exactly when the expert axis is split.
    assert results["meshes"]["data2_fsdp2_expert2"]["expert_parallel_lowered"] is True
    assert results["meshes"]["fsdp4_tensor2"]["expert_parallel_lowered"] is False
    for impl, r in results["ep_module"].items():
        assert r["manual"], impl
        assert r["y"] < 1e-5 and r["grad"] < 1e-4, (impl, r)


def test_expert_parallel_exchange_equals_one_device(results):
    """Issue 18: the ragged all-to-all dispatch == one device (values and gradients), top-1 / top-2, empty experts,
    a tensor-split expert width; it exchanges rows (all_to_all of the counts) and lowers to ragged_all_to_all."""
    r = results["ep_a2a"]
    assert set(r) == {"data2_expert4_top2", "data2_expert4_top1_empty", "fsdp2_tensor2_expert2"}
    for name, v in r.items():
        assert v["exchange"] and v["ragged_ops"] >= 4, (name, v)  # there and back, forward and backward
        assert v["y"] < 1e-5 and v["grad"] < 1e-4, (name, v)
    assert r["data2_expert4_top1_empty"]["empty_experts"] == 7  # every token on expert 0


def test_moe_dispatch_is_checked():
    import jax
    import jax.numpy as jnp

    from unitok_jax.moe import MoE

    x = jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match="dispatch='ring'"):
        MoE(num_experts=2, top_k=1, expert_dim=4, dispatch="ring").init(jax.random.PRNGKey(0), x)


def test_sharding_rules_are_config(results):
    assert results["custom_rules_wi_gate"] == [None, None, ["fsdp", "expert"], "tensor"]


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])))
