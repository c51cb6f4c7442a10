"""LM-stage train step under a device mesh, on simulated CPU devices (subprocesses: XLA's device count is fixed
when jax starts):

* 8 devices, mesh (data 2, fsdp 2, expert 2): two sharded train steps == the same steps on one device (loss and
  updated params within 1e-5); params, optimizer state and batch are sharded as the rules say;
* gradient accumulation: 2 micro-batches of a batch whose halves are equal == one step on the whole batch;
* 128 devices: the official-size LM train step lowers (abstract inputs, nothing allocated) under the v5p-256 mesh
  and, on 8 of the devices, under the 8xH100 mesh.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, shard_count, xla_flags


def _tiny(accum_steps=1, flow_weight=1.0):
    from configs import lm as lm_configs
    from unitok_jax import text
    from unitok_jax.training import lm_train

    config = lm_configs.get_config("tiny")
    config.train.accum_steps = accum_steps
    config.train.flow_weight = flow_weight
    config.train.warmup_steps = 0
    config.model.moe_impl = os.environ.get("TEST_MOE_IMPL", "auto")
    tok = text.train_tokenizer(["he hoped there would be stew for dinner", "turnips and carrots and potatoes"] * 4,
                               vocab_size=320)
    cfg = lm_train.model_config(config, vocab_size=tok.vocab_size)
    return config, tok, cfg


def _batch(tok, cfg, rows):
    import numpy as np

    from unitok_jax.training import lm_data

    rng = np.random.default_rng(0)
    c = cfg.vae.latent_dim
    pool = [
        lm_data.tts_example(tok, "he hoped there would be stew", rng.standard_normal((40, c)).astype(np.float32)),
        lm_data.asr_example(tok, rng.standard_normal((30, c)).astype(np.float32), "turnips and carrots"),
        lm_data.tts_example(tok, "potatoes for dinner", rng.standard_normal((25, c)).astype(np.float32)),
        lm_data.asr_example(tok, rng.standard_normal((35, c)).astype(np.float32), "he hoped for stew"),
    ]
    b = lm_data.make_batch([pool[i] for i in rows])
    b.pop("is_tts")
    return b


def _leaf(tree, *path):
    for p in path:
        tree = tree[p]
    return tree


def _host(x):
    """numpy of a leaf (the raw bits of a typed PRNG key)."""
    import jax
    import numpy as np

    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x).astype(np.float64)


def _worker_mesh() -> dict:
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from unitok_jax import model, sharding as shd
    from unitok_jax.training import lm_train, sharded
    from unitok_jax.training.lm_step import init_lm_state

    assert jax.device_count() == 8
    res: dict = {}
    config, tok, cfg = _tiny()
    params = model.init_params(cfg, jax.random.key(0))
    opt = lm_train.optimizer(config, params)
    step = lm_train.step_function(config, cfg, opt)
    batch = _batch(tok, cfg, [0, 1, 2, 3])
    state0 = init_lm_state(params, opt, jax.random.key(1))

    dev0 = jax.devices()[0]
    single = jax.jit(step)
    s1 = jax.device_put(state0, dev0)
    single_losses = []
    for _ in range(2):
        s1, m = single(s1, jax.device_put(batch, dev0))
        single_losses.append(float(m["loss"]))

    mesh = shd.make_mesh({"mesh": {"data": 2, "fsdp": 2, "expert": 2}})
    param_sh = sharded.param_shardings(cfg, params, mesh, shd.DEFAULT_RULES)
    state_sh = sharded.state_shardings(jax.eval_shape(lambda: state0), opt, param_sh, mesh)
    s8 = sharded.place_state(state0, state_sh)
    fn = sharded.jit_step(step, state_sh, mesh, shd.DEFAULT_RULES, donate=False)
    gbatch = sharded.global_batch(batch, mesh)
    res["batch_spec"] = list(map(str, gbatch["latents"].sharding.spec))
    res["hlo_expert_parallel"] = "manual_computation" in fn.lower(s8, gbatch).as_text()
    sharded_losses = []
    for _ in range(2):
        s8, m = fn(s8, gbatch)
        sharded_losses.append(float(m["loss"]))
    res["losses"] = [single_losses, sharded_losses]
    # the same two steps with expert parallelism by exchange (model.moe_dispatch=a2a): the routed rows to their
    # experts' devices and back instead of every token on every expert device
    import dataclasses

    cfg_a2a = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, moe_dispatch="a2a"))
    fn_a2a = sharded.jit_step(lm_train.step_function(config, cfg_a2a, opt), state_sh, mesh, shd.DEFAULT_RULES,
                              donate=False)
    s8a = sharded.place_state(state0, state_sh)
    a2a_losses = []
    for _ in range(2):
        s8a, m = fn_a2a(s8a, gbatch)
        a2a_losses.append(float(m["loss"]))
    res["a2a_losses"] = a2a_losses
    res["a2a_param_max_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8a["params"])))
    res["param_max_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])))
    res["params_moved"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                              for a, b in zip(jax.tree.leaves(state0["params"]), jax.tree.leaves(s1["params"])))
    specs = sharded.describe(s8)
    res["specs"] = {k: [None if x is None else (list(x) if isinstance(x, tuple) else x) for x in v]
                    for k, v in specs.items() if v is not None}
    res["devices_per_leaf"] = min(len({s.device for s in x.addressable_shards}) for x in jax.tree.leaves(s8))
    wi = _leaf(s8["params"], "model", "moe", "layers", "moe", "wi_gate")
    res["wi_gate_shard"] = [list(wi.shape), list(wi.addressable_shards[0].data.shape)]

    # a checkpoint saved on this mesh restores onto another one (fsdp 4 x tensor 2, no expert split): same values in
    # the new layout (that a step on another mesh equals a step on this one is the comparison above)
    import tempfile

    from unitok_jax.training.checkpoint import TrainCheckpointer

    ck = TrainCheckpointer(tempfile.mkdtemp(), every_steps=1)
    ck.save(2, s8, {"pos": 7}, force=True)
    ck.wait()
    mesh_b = shd.make_mesh({"mesh": {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}})
    param_b = sharded.param_shardings(cfg, params, mesh_b, shd.DEFAULT_RULES)
    state_b_sh = sharded.state_shardings(jax.eval_shape(lambda: state0), opt, param_b, mesh_b)
    step_no, sb, data_b = ck.restore(sharded.abstract_state(jax.eval_shape(lambda: state0), state_b_sh))
    ck.close()
    res["remesh"] = {
        "step": step_no, "data": data_b,
        "max_diff": max(float(np.max(np.abs(_host(a) - _host(b)))) for a, b in zip(jax.tree.leaves(s8),
                                                                                    jax.tree.leaves(sb))),
        "wi_gate_shard": [list(_leaf(sb["params"], "model", "moe", "layers", "moe", "wi_gate").shape),
                          list(_leaf(sb["params"], "model", "moe", "layers", "moe", "wi_gate")
                               .addressable_shards[0].data.shape)],
        "mesh": dict(mesh_b.shape),
    }

    # gradient accumulation: micro-batches i::2 of [a, a, b, b] are both [a, b]; with the (random) flow loss off,
    # the accumulated step equals one step on the whole batch
    acc = {}
    for n in (1, 2):
        config_n, _, _ = _tiny(accum_steps=n, flow_weight=0.0)
        step_n = jax.jit(lm_train.step_function(config_n, cfg, opt))
        st, m = step_n(jax.device_put(state0, dev0), jax.device_put(_batch(tok, cfg, [0, 0, 1, 1]), dev0))
        acc[n] = (st, {k: float(v) for k, v in m.items()})
    res["accum_param_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                  for a, b in zip(jax.tree.leaves(acc[1][0]["params"]),
                                                  jax.tree.leaves(acc[2][0]["params"])))
    res["accum_metrics"] = [acc[1][1], acc[2][1]]
    return res


def _worker_official() -> dict:
    import time

    import jax

    from configs import lm as lm_configs
    from unitok_jax import model, sharding as shd
    from unitok_jax.training import lm_data, lm_train, sharded
    from unitok_jax.training.lm_step import init_lm_state

    assert jax.device_count() == 128
    config = lm_configs.get_config("official")
    cfg = lm_train.model_config(config)
    res = {"dtype": cfg.llm.dtype}
    params_abs = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    res["params_b"] = sum(x.size for x in jax.tree.leaves(params_abs)) / 1e9
    opt = lm_train.optimizer(config, params_abs)
    state_abs = jax.eval_shape(lambda: init_lm_state(model.init_params(cfg, jax.random.key(0)), opt,
                                                     jax.random.key(1)))
    step = lm_train.step_function(config, cfg, opt)
    for preset, devices in (("v5p-256", jax.devices()), ("8xH100", jax.devices()[:8])):
        t0 = time.perf_counter()
        config.mesh_preset = preset
        mesh = shd.make_mesh({"mesh": lm_configs.mesh_sizes(config)}, devices=devices)
        param_sh = sharded.param_shardings(cfg, params_abs, mesh, shd.DEFAULT_RULES)
        state_sh = sharded.state_shardings(state_abs, opt, param_sh, mesh)
        b, s = 16 * sharded.batch_shards(mesh), 512
        shapes = lm_data.batch_shapes(b, s, 64, cfg.patch_size, cfg.vae.latent_dim)
        lowered = sharded.jit_step(step, state_sh, mesh, shd.DEFAULT_RULES).lower(
            sharded.abstract_state(state_abs, state_sh), sharded.abstract_batch(shapes, mesh))
        text = lowered.as_text()
        # bytes of one device's shard of the params + optimizer state
        per_device = sum(x.size * x.dtype.itemsize / shard_count(sh) for x, sh in
                         zip(jax.tree.leaves(state_abs), jax.tree.leaves(state_sh)))
        res[preset] = {"mesh": dict(mesh.shape), "seconds": time.perf_counter() - t0, "hlo_chars": len(text),
                       "expert_parallel": "manual_computation" in text, "state_gib_per_device": per_device / 2**30,
                       "batch": b}
    return res


def test_fsdp_spec_for_unnamed_params():
    import jax

    from unitok_jax.training.sharded import fsdp_spec

    mesh = jax.make_mesh((1, 1), ("data", "fsdp"))
    assert fsdp_spec((1024, 1024), mesh) == jax.sharding.PartitionSpec()  # fsdp axis of size 1

    class Mesh4:  # only .shape is read
        shape = {"data": 1, "fsdp": 4}

    P = jax.sharding.PartitionSpec
    assert fsdp_spec((512, 1024), Mesh4) == P(None, "fsdp")  # the largest divisible dim
    assert fsdp_spec((1026, 512), Mesh4) == P(None, "fsdp")  # 1026 is not divisible by 4
    assert fsdp_spec((8, 1024, 512), Mesh4, stacked=True) == P(None, "fsdp")  # never the layers axis
    assert fsdp_spec((64, 64), Mesh4) == P()  # small: replicated
    assert fsdp_spec((1023, 1025), Mesh4) == P()  # nothing divisible


def _run(which: str, devices: int, tmp_path) -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    out = tmp_path / f"{which}.json"
    proc = subprocess.run([sys.executable, __file__, which, str(out)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    return _run("mesh", 8, tmp_path_factory.mktemp("lm_mesh"))


def test_sharded_step_equals_single_device(mesh_results):
    r = mesh_results
    single, shard = r["losses"]
    assert single[0] > 0 and single[0] != single[1]  # a real loss that moved
    for a, b in zip(single, shard):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), r["losses"]
    assert r["params_moved"] > 1e-4  # the steps really updated the params...
    assert r["param_max_diff"] < 1e-5, r["param_max_diff"]  # ...identically on 1 and on 8 devices
    assert r["hlo_expert_parallel"] is True
    # expert parallelism by exchange (model.moe_dispatch=a2a) trains the same
    for a, b in zip(single, r["a2a_losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (single, r["a2a_losses"])
    assert r["a2a_param_max_diff"] < 1e-5, r["a2a_param_max_diff"]


def test_sharded_state_follows_rules(mesh_results):
    specs = mesh_results["specs"]
    moe = "['params']['model']['moe']['layers']['moe']"
    assert specs[f"{moe}['wi_gate']"] == [None, "expert", "fsdp", "tensor"]
    assert specs["['params']['model']['embed']['embedding']"][-1] == "fsdp"
    # Adam moments carry their param's sharding (optax.tree_map_params), frozen VAE leaves have no optimizer state
    mu = [k for k in specs if k.startswith("['opt_state']") and k.endswith("['model']['moe']['layers']['moe']['wi_gate']")]
    assert mu and all(specs[k] == [None, "expert", "fsdp", "tensor"] for k in mu), mu
    assert len(mu) == 2  # mu and nu
    assert not any(k.startswith("['opt_state']") and "['audio']" in k for k in specs)
    # non-LLM leaves (VAE, flow head): the big ones FSDP-sharded on one dim, small ones replicated
    assert specs["['params']['audio']['decoder']['head']['kernel']"] == [None, "fsdp"]  # [64, 2 * 320 + 2]...
    assert specs["['params']['flowloss']['x_embedder']['kernel']"] == []
    assert specs["['step']"] == [] and specs["['rng']"] == []
    shape, shard = mesh_results["wi_gate_shard"]
    assert shard == [shape[0], shape[1] // 2, shape[2] // 2, shape[3]]
    assert mesh_results["devices_per_leaf"] == 8
    assert mesh_results["batch_spec"][0] in ("('data', 'fsdp')", "['data', 'fsdp']")


def test_checkpoint_restores_onto_a_different_mesh(mesh_results):
    r = mesh_results["remesh"]
    assert r["step"] == 2 and r["data"] == {"pos": 7}
    assert r["max_diff"] == 0.0  # params, optimizer state, step and RNG come back exactly
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    shape, shard = r["wi_gate_shard"]  # laid out for the new mesh: experts whole, fsdp 4 and tensor 2 splits
    assert shard == [shape[0], shape[1], shape[2] // 4, shape[3] // 2], r["wi_gate_shard"]


def test_gradient_accumulation_matches_whole_batch(mesh_results):
    whole, accum = mesh_results["accum_metrics"]
    assert abs(whole["loss"] - accum["loss"]) < 1e-5 * max(1.0, whole["loss"])
    assert accum["tokens"] == whole["tokens"]  # counts are summed over micro-batches
    assert mesh_results["accum_param_diff"] < 1e-6


@pytest.fixture(scope="module")
def official_results(tmp_path_factory):
    return _run("official", 128, tmp_path_factory.mktemp("lm_official"))


def test_official_size_lowers_under_pod_meshes(official_results):
    r = official_results
    assert 14 < r["params_b"] < 20, r["params_b"]  # 16B-A3B LLM + VAE + flow head
    assert r["dtype"] == "bfloat16"
    assert r["v5p-256"]["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1, "expert": 8}
    assert r["8xH100"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 2}
    for preset in ("v5p-256", "8xH100"):
        assert r[preset]["expert_parallel"] and r[preset]["hlo_chars"] > 10_000
    # params + Adam state (fp32) fit: ~12 B/param spread over the mesh
    assert r["v5p-256"]["state_gib_per_device"] < 4
    assert r["8xH100"]["state_gib_per_device"] < 40


if __name__ == "__main__":
    which, out = sys.argv[1], sys.argv[2]
    result = {"mesh": _worker_mesh, "official": _worker_official}[which]()
    with open(out, "w") as f:
        json.dump(result, f)
