"""Streaming conversion of a full model in the official layout (bf16 safetensors shards + index) and loading it
straight into shardings on 8 simulated devices.

* ``test_streaming_conversion_*``: a random full model of ~73M params (292 MB in float32, 146 MB of bf16 shards)
  converted by the CLI at bfloat16 and at float32 in one subprocess that reports the peak resident memory of each
  conversion (Linux ``VmHWM``, reset in between) above the memory it held before; the converted params equal the
  source (bit-exact in bf16; float32 of the bf16 values). Bound: each conversion adds less than a quarter of the
  model's float32 size (groups of 4 MiB, the largest tensor 4.2 MB in float32).
* ``test_sharded_load_*``: a small model converted with the default dtype (the shards' bf16), loaded on meshes
  (data 2 x fsdp 2 x expert 2) and (fsdp 4 x tensor 2) in a subprocess with 8 CPU devices (this file run as a
  script): every param has the sharding the rules give (experts split over ``expert``, never replicated), values
  equal the single-device load, each device holds a fraction of the LLM, ``dtype=`` casts on read with norms and
  router kept float32, and a VERSION 1 checkpoint loads into the same shardings.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------ official-layout models


def _config(big: bool) -> dict:
    from unitok_jax.generate import TINY_BAILINGMM

    conf = copy.deepcopy(TINY_BAILINGMM)
    if big:  # ~73M params, mostly the experts of 20 MoE layers (the largest tensors: one layer's 16 experts, 1M)
        conf["llm_config"].update(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=20,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
                                  moe_intermediate_size=256)
    else:  # dims that divide every mesh axis used below
        conf["llm_config"].update(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                  moe_intermediate_size=32)
    return conf


def _reference_keys(cfg) -> dict:
    """Reference names and shapes of the VAE, DiT and heads, recorded by running our converters on a reader that
    answers every key with zeros of the asked shape (so this test writes exactly what the converters read)."""
    from unitok_jax.convert.common import WeightReader, materialize
    from unitok_jax.convert.flow import dit_tree
    from unitok_jax.convert.vae import vae_tree

    class Recorder(WeightReader):
        def __init__(self, prefix):
            super().__init__({}, prefix, "recorder")
            self.shapes = {}

        def has(self, name):
            return False  # optional buffers (window, inv_freq) are left out

        def get(self, name, shape=None, dtype=np.float32):
            self.shapes[self.prefix + name] = tuple(shape)
            return np.broadcast_to(np.zeros((), np.float32), shape)

    shapes = {}
    for prefix, fn in (("audio.", lambda r: vae_tree(r, cfg.vae)),
                       ("flowloss.cfm.model.", lambda r: dit_tree(r, cfg.flow))):
        r = Recorder(prefix)
        materialize(fn(r))
        shapes.update(r.shapes)
    U, D = cfg.heads.semantic_dim, cfg.llm.width
    shapes.update({"linear_proj_audio.final_layer.norm_final.weight": (U,),
                   "linear_proj_audio.final_layer.linear.weight": (D, U),
                   "linear_proj_audio.final_layer.linear.bias": (D,), "stop_head.weight": (2, D),
                   "stop_head.bias": (2,)})
    return shapes


def write_official(folder: str, conf: dict, seed: int = 0, shards: int = 3):
    """A random full Ming-UniAudio folder: bf16 safetensors shards + ``model.safetensors.index.json`` + config.json
    (+ a tokenizer.json). Returns the LLM params it holds (bf16, our layout)."""
    import jax
    import ml_dtypes
    from safetensors.numpy import save_file

    from unitok_jax import model
    from unitok_jax.convert.llm import export_llm
    from unitok_jax import llm as llm_lib

    cfg = model.UniAudioConfig.from_bailingmm(conf)
    rng = np.random.default_rng(seed)

    def rand_bf16(shape):  # random signs and mantissas, magnitudes 2^-7 .. 2^-5 (fast: integer bits)
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
        return ((bits & 0x80FF) | 0x3C00).view(ml_dtypes.bfloat16)

    abstract = jax.eval_shape(lambda k: llm_lib.init_params(cfg.llm, k), jax.random.key(0))["params"]
    llm = jax.tree.map(lambda x: rand_bf16(x.value.shape if hasattr(x, "value") else x.shape), abstract,
                       is_leaf=lambda x: hasattr(x, "value"))
    sd = {k: np.ascontiguousarray(v, ml_dtypes.bfloat16)
          for k, v in export_llm(cfg.llm, {"params": llm}, prefix="model.").items()}
    for k, shape in _reference_keys(cfg).items():
        sd[k] = rand_bf16(shape)
    os.makedirs(folder)
    names = sorted(sd)
    files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards] for i in range(shards)}
    for f, keys in files.items():
        save_file({k: np.ascontiguousarray(sd[k]) for k in keys}, os.path.join(folder, f))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: f for f, ks in files.items() for k in ks}}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(conf, f)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write("{}")
    return llm


def expected_params(src: str, conf: dict, llm) -> dict:
    """The params the conversion must give (float32): the LLM we exported, the other components converted in
    memory from the source's tensors."""
    import jax

    from unitok_jax import model
    from unitok_jax.convert.common import read_weights
    from unitok_jax.convert.flow import convert_dit, convert_heads
    from unitok_jax.convert.vae import convert_vae

    cfg = model.UniAudioConfig.from_bailingmm(conf)
    w = read_weights(src)
    heads = convert_heads(w, cfg.heads)
    return {"audio": convert_vae(w, conf["audio_tokenizer_config"], prefix="audio.")[1],
            "model": jax.tree.map(lambda x: np.asarray(x, np.float32), llm),
            "flowloss": convert_dit(w, cfg.flow, prefix="flowloss.cfm.model."),
            "linear_proj_audio": heads["pooling"], "stop_head": heads["stop_head"]}


def _flat(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# --------------------------------------------------------------------------------------- the streaming test

# Converts SRC twice through the CLI's main (bf16 then float32) in one process and reports, for each conversion, the
# resident memory before it and the peak during it (Linux VmHWM, reset between conversions through clear_refs). The
# process first imports what the conversion uses and plans SRC once (tracing the model for the shape checks), so
# what is measured is the streaming itself, not imports and tracing.
RSS_SCRIPT = """
import json, re, sys
import jax, orbax.checkpoint, tensorstore, tqdm, flax.linen
import unitok_jax.convert, unitok_jax.convert.plan, unitok_jax.model, unitok_jax.sharding
from unitok_jax.convert.__main__ import main
from unitok_jax.convert.store import release_free_memory

def mem():
    s = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\\s+(\\d+) kB", s).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}

src, out = sys.argv[1], sys.argv[2]
unitok_jax.convert.plan.plan_reference(src)
rep = {}
for dtype in ("bfloat16", "float32"):
    release_free_memory()
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # then the peak may include the planning above: an over-estimate
    before = mem()["VmRSS"]
    rc = main([src, out + "/" + dtype, "--dtype", dtype, "--group-mb", "4"])
    rep[dtype] = {"rc": rc, "before": before, "peak": mem()["VmHWM"]}
print(json.dumps(rep))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    conf = _config(big=True)
    src = str(tmp / "src")
    llm = write_official(src, conf)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, src, str(tmp)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp, src, conf, llm, json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS read from /proc (Linux)")
def test_streaming_conversion_bf16_and_fp32_equal_the_source_in_bounded_memory(big):
    import ml_dtypes

    from unitok_jax.convert import load
    from unitok_jax.convert.store import read_index
    from unitok_jax.model import param_dtypes

    tmp, src, conf, llm, rss, err = big
    want = _flat(expected_params(src, conf, llm))
    fp32_bytes = 4 * sum(x.size for x in want.values())
    assert 250e6 < fp32_bytes < 350e6
    assert "B/s" in err  # the progress bar reports throughput
    floats = {}
    for dtype in ("bfloat16", "float32"):
        rep = rss[dtype]
        assert rep["rc"] == 0, err[-4000:]
        added = rep["peak"] - rep["before"]
        print(f"{dtype}: peak RSS {rep['peak'] / 1e6:.0f} MB, {rep['before'] / 1e6:.0f} MB before the conversion: "
              f"added {added / 1e6:.0f} MB; the model is {fp32_bytes / 1e6:.0f} MB in float32")
        # Bound: under a quarter of the model's float32 size (assembling the model would add 1x to 2x of it).
        assert added < fp32_bytes / 4, (dtype, added / 1e6, fp32_bytes / 1e6)
        dst = str(tmp / dtype)
        index = read_index(os.path.join(dst, "params"))
        assert len(index["groups"]) > 20
        assert any(p["path"][-1] == "wi_gate" and p["layers"] == 20 for p in index["params"])  # layer by layer
        assert os.path.isfile(os.path.join(dst, "tokenizer.json"))
        ck = load(dst)
        got = _flat(ck.params["uniaudio"])
        assert set(got) == set(want)
        policy = _flat(param_dtypes(ck.params["uniaudio"], dtype))
        for k, w in want.items():
            g = np.asarray(got[k])
            assert g.dtype == policy[k], (k, g.dtype)
            if g.dtype == ml_dtypes.bfloat16:
                np.testing.assert_array_equal(g, w.astype(ml_dtypes.bfloat16), err_msg=k)  # bit-exact
            else:
                np.testing.assert_array_equal(g, w, err_msg=k)  # float32 of the bf16 values
        floats[dtype] = sum(np.asarray(x).dtype == np.float32 for x in got.values())
        assert ck.configs["uniaudio"].llm.param_dtype == dtype
        del ck, got
    assert floats["bfloat16"] < floats["float32"] == len(want)  # bf16 keeps only norms and router float32


# ------------------------------------------------------------------------------------ subprocess: 8 devices

MESHES = {"data2_fsdp2_expert2": {"data": 2, "fsdp": 2, "expert": 2}, "fsdp4_tensor2": {"fsdp": 4, "tensor": 2}}


def _worker(tmp: str) -> dict:
    import jax
    import ml_dtypes
    import orbax.checkpoint as ocp

    from unitok_jax import sharding as shd
    from unitok_jax.convert import CONFIG_NAME, PARAMS_DIR, convert, load

    assert jax.device_count() == 8
    src, dst, v1 = (os.path.join(tmp, x) for x in ("src", "ck", "v1"))
    write_official(src, _config(big=False))
    # default dtype: the shards' bfloat16; groups of 16 KiB: the experts (32 KiB) and the largest params of the VAE
    # stacks are written layer by layer
    convert(src, dst, progress=False, max_group_bytes=16 << 10)
    index = json.load(open(os.path.join(dst, PARAMS_DIR, "index.json")))
    single = load(dst)
    stored = {k: np.asarray(v) for k, v in _flat(single.params["uniaudio"]).items()}
    ref32 = {k: v.astype(np.float32) for k, v in stored.items()}
    res = {"single_on_default_device": all(v.sharding.device_set == {jax.local_devices()[0]}
                                           for v in _flat(single.params["uniaudio"]).values()),
           "stored_dtypes": {k: str(v.dtype) for k, v in stored.items()},
           "llm_bytes_f32": sum(v.nbytes for k, v in ref32.items() if k.startswith("['model']")),
           "wi_gate_shape": list(stored["['model']['moe']['layers']['moe']['wi_gate']"].shape), "meshes": {},
           "llm_layer_by_layer": sorted(p["path"][-1] for p in index["params"]
                                        if p["layers"] and p["path"][1] == "model"),
           "vae_layer_by_layer": sum(bool(p["layers"]) for p in index["params"] if p["path"][1] == "audio")}
    # a VERSION 1 checkpoint (one orbax tree at params/) of the same values in float32
    os.makedirs(v1)
    as_f32 = jax.tree.map(lambda x: np.asarray(x, np.float32), single.params["uniaudio"])
    ocp.StandardCheckpointer().save(os.path.join(v1, PARAMS_DIR), {"uniaudio": as_f32})
    meta = json.load(open(os.path.join(dst, CONFIG_NAME)))
    meta["components"]["uniaudio"]["llm"].update(param_dtype="float32", dtype="float32")
    json.dump({**meta, "version": 1}, open(os.path.join(v1, CONFIG_NAME), "w"))

    for name, sizes in MESHES.items():
        mesh = shd.make_mesh({"mesh": sizes})
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), single.params["uniaudio"])
        want_sh = _flat(shd.uniaudio_shardings(single.configs["uniaudio"], abstract, mesh, shd.DEFAULT_RULES))
        out = {}
        for tag, path, dtype in (("v2", dst, None), ("v2_float32", dst, "float32"), ("v1_bfloat16", v1, "bfloat16"),
                                 ("v1", v1, None)):
            ck = load(path, mesh=mesh, rules=shd.DEFAULT_RULES, dtype=dtype)
            cfg = ck.configs["uniaudio"]
            flat = _flat(ck.params["uniaudio"])
            r = {"sharding_mismatch": [k for k, v in flat.items()
                                       if not v.sharding.is_equivalent_to(want_sh[k], v.ndim)],
                 "value_mismatch": [], "dtypes": {}, "llm_per_device_bytes": 0,
                 "llm_dtype": cfg.llm.dtype, "llm_param_dtype": cfg.llm.param_dtype}
            for k, v in flat.items():
                a = np.asarray(v)
                if not np.array_equal(a, ref32[k].astype(a.dtype)):  # exact: every value is a bf16 value
                    r["value_mismatch"].append(k)
                r["dtypes"][k] = str(a.dtype)
                if k.startswith("['model']"):
                    r["llm_per_device_bytes"] += v.addressable_shards[0].data.nbytes * 4 // a.dtype.itemsize
            m = "['model']['moe']['layers']['moe']"
            spec = lambda x: [list(s) if isinstance(s, tuple) else s  # noqa: E731
                              for s in tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))]
            r["specs"] = {k: spec(flat[m + k]) for k in ("['wi_gate']", "['wi_up']", "['wo']", "['gate']")}
            r["specs"]["embed"] = spec(flat["['model']['embed']['embedding']"])
            r["expert_shard_shape"] = list(flat[m + "['wi_gate']"].addressable_shards[0].data.shape)
            r["expert_replicated"] = [k for k in ("['wi_gate']", "['wi_up']", "['wo']")
                                      if flat[m + k].sharding.is_fully_replicated]
            out[tag] = r
        res["meshes"][name] = out
    return res


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from conftest import xla_flags

    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    tmp = tmp_path_factory.mktemp("sharded_load")
    proc = subprocess.run([sys.executable, __file__, str(tmp)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "tmp": str(tmp)}


def _is_f32_by_policy(k: str) -> bool:
    """Norm params and MoE router weights (written out by hand, not through the policy function)."""
    return "norm']" in k or k.endswith(("['moe']['gate']", "['moe']['audio_gate']", "['moe']['image_gate']"))


def test_sharded_load_default_dtype_and_single_device(sharded):
    assert sharded["single_on_default_device"]
    # layer by layer: the experts, and the largest params of the VAE stacks (the smaller ones are gathered whole)
    assert sharded["llm_layer_by_layer"] == ["wi_gate", "wi_up", "wo"] and sharded["vae_layer_by_layer"] > 0
    for k, d in sharded["stored_dtypes"].items():  # converted with the shards' own dtype, norms/router float32
        assert d == ("float32" if _is_f32_by_policy(k) else "bfloat16"), (k, d)


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_sharded_load_shardings_values_and_dtypes(sharded, mesh):
    res = sharded["meshes"][mesh]
    for tag, r in res.items():
        assert r["sharding_mismatch"] == [] and r["value_mismatch"] == [], (tag, r)
        if mesh == "data2_fsdp2_expert2":
            assert r["expert_replicated"] == []
        # the LLM is split over the mesh: a device holds about half of it on (fsdp 2, expert 2: experts a quarter)
        # and about an eighth on (fsdp 4, tensor 2), plus the replicated norms
        assert r["llm_per_device_bytes"] < sharded["llm_bytes_f32"] / (1.8 if "expert" in mesh else 3.5), (tag, r)
        want = {"v2": None, "v2_float32": "float32", "v1_bfloat16": "bfloat16", "v1": "float32"}[tag]
        for k, d in r["dtypes"].items():
            assert d == (sharded["stored_dtypes"][k] if want is None else
                         "float32" if want == "float32" or _is_f32_by_policy(k) else "bfloat16"), (tag, k, d)
        assert r["llm_param_dtype"] == (want or "bfloat16")
        assert r["llm_dtype"] == (want or "bfloat16")  # compute dtype: as requested (None: the saved config's)
    r = res["v2"]
    assert r["specs"]["['wi_gate']"] == r["specs"]["['wi_up']"] == [None, "expert", "fsdp", "tensor"]
    assert r["specs"]["['wo']"] == [None, "expert", "tensor", "fsdp"]
    assert r["specs"]["['gate']"] == [None, "fsdp", None]
    assert r["specs"]["embed"] == ["tensor", "fsdp"]
    E, D, F = sharded["wi_gate_shape"][1:]
    if mesh == "data2_fsdp2_expert2":
        assert r["expert_shard_shape"][1:] == [E // 2, D // 2, F]
    else:
        assert r["expert_shard_shape"][1:] == [E, D // 4, F // 2]


def test_conversion_refuses_bad_input_writing_nothing(sharded, tmp_path):
    import shutil

    from unitok_jax.convert import ConversionError, convert

    src = str(tmp_path / "src")
    shutil.copytree(os.path.join(sharded["tmp"], "src"), src)
    with pytest.raises(FileExistsError):
        convert(src, os.path.join(sharded["tmp"], "ck"), progress=False)
    # a config that does not match the tensors: the key is named before anything is read or written
    conf = json.load(open(os.path.join(src, "config.json")))
    conf["llm_config"]["num_experts"] = 5
    json.dump(conf, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(ConversionError, match=r"key 'model\.model\.layers\.0\.mlp\.gate\.weight' has shape"):
        convert(src, str(tmp_path / "bad"), progress=False)
    assert not os.path.exists(tmp_path / "bad") and not [p for p in os.listdir(tmp_path) if p.startswith(".bad")]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_worker(sys.argv[1])))
