"""The VAE stage (:mod:`unitok_jax.training.vae_train`, behind train.py) under a device mesh, in one subprocess on 8
simulated CPU devices (XLA's device count is fixed when jax starts):

* the official-size VAE train step (``configs/vae.py:official``) lowers under the 8xH100 preset (abstract state and
  batch, nothing allocated or compiled): the preset's expert axis folded into data, big generator / discriminator
  leaves FSDP-sharded with their Adam moments, the frozen semantic module without optimizer state, state donated;
* the held-out batch: from ``data.heldout_manifest``, else fixed crops of the training manifest; unreadable records
  skipped.

The monitoring of a real run (TensorBoard scalars, audio, mel images, held-out metrics) is checked on the CLI run of
``tests/test_train_cli.py``; the loss going down on real speech in ``tests/test_vae_training.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA, shard_count, xla_flags


def _official() -> dict:
    import time

    import jax
    import jax.numpy as jnp

    from unitok_jax.configs import vae as vae_configs
    from unitok_jax.training import vae_train as train
    from unitok_jax import sharding as shd
    from unitok_jax.training import sharded
    from unitok_jax.training.monitor import matmul_flops

    t0 = time.perf_counter()
    config = vae_configs.get_config("official")
    config.mesh_preset = "8xH100"
    mesh = shd.make_mesh({"mesh": train.vae_mesh_sizes(config)})
    objects = train.vae_objects(config)
    vcfg, tcfg, dcfg, ocfg = objects
    state_abs = jax.eval_shape(train.vae_init_fn(config, objects), jax.random.key(0))
    state_sh = train.vae_state_shardings(state_abs, tcfg, ocfg, mesh)
    b, n = config.data.batch_size, int(config.data.crop_seconds * vcfg.sample_rate)
    batch = sharded.abstract_batch({"wave": ((b, n), jnp.float32), "lengths": ((b,), jnp.int32)}, mesh)
    state = sharded.abstract_state(state_abs, state_sh)
    step = train.vae_step_fn(tcfg, dcfg, ocfg, state_sh, mesh)
    lowered = step.lower(state, batch)
    text = lowered.as_text()
    t_lower = time.perf_counter() - t0
    with shd.use_sharding(mesh, shd.DEFAULT_RULES):
        flops = float(matmul_flops(step.raw, state, batch))
    specs = {k: list(v) if v is not None else None for k, v in sharded.describe(state).items()}
    per_device = sum(x.size * x.dtype.itemsize / shard_count(sh) for x, sh in
                     zip(jax.tree.leaves(state_abs), jax.tree.leaves(state_sh)))
    return {"mesh": dict(mesh.shape), "seconds": t_lower, "hlo_chars": len(text), "specs": specs,
            "donated": text.count("tf.aliasing_output"), "num_leaves": len(jax.tree.leaves(state_abs)),
            "gen_params_m": sum(x.size for x in jax.tree.leaves(state_abs["gen_params"])) / 1e6,
            "disc_params_m": sum(x.size for x in jax.tree.leaves(state_abs["disc_params"])) / 1e6,
            "state_gib_per_device": per_device / 2**30, "tflops_per_step": flops / 1e12,
            "batch": [b, n], "batch_spec": list(batch["wave"].sharding.spec)}


def _heldout(tmp: str) -> dict:
    import numpy as np
    import soundfile as sf

    from unitok_jax.configs import vae as vae_configs
    from unitok_jax.training import vae_train as train

    wave, sr = sf.read(SHARED_DATA / "librispeech-1089-134686-0000.flac", dtype="float32")
    recs = []
    for i in range(5):
        path = os.path.join(tmp, f"p{i}.wav")
        sf.write(path, wave[i * 16000 : (i + 1) * 16000 + 8000 * i], sr)  # 1 s, 1.5 s, 2 s, ...
        recs.append({"id": f"p{i}", "audio": path, "speaker": "1089"})
    recs[1]["audio"] = os.path.join(tmp, "missing.wav")
    with open(os.path.join(tmp, "held.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in recs[3:]) + "\n")
    config = vae_configs.get_config("tiny")
    config.data.heldout_size, config.data.heldout_seconds = 3, 1.225  # rounded to whole 320-sample frames
    res = {}
    batch, why = train.heldout_batch(config, recs)
    res["fallback"] = {"why": why, "ids": batch["ids"], "lengths": batch["lengths"].tolist(),
                       "shape": list(batch["wave"].shape)}
    # a centre crop: the 2.5 s record p3 cut to its middle
    n = batch["wave"].shape[1]
    full = wave[3 * 16000 : 4 * 16000 + 24000]
    k = batch["ids"].index("p3")
    start = (len(full) - n) // 2
    res["centre_crop_err"] = float(np.abs(batch["wave"][k] - full[start : start + n]).max())
    config.data.heldout_manifest = os.path.join(tmp, "held.jsonl")
    batch, why = train.heldout_batch(config, recs)
    res["manifest"] = {"why": why, "ids": batch["ids"]}
    config.data.heldout_manifest = None
    batch, why = train.heldout_batch(config, [recs[1]])
    res["none"] = {"batch": batch, "why": why}
    # mesh folding of the presets
    res["folded"] = {}
    for preset in ("8xH100", "32xH100", "v5p-256"):
        config.mesh_preset = preset
        res["folded"][preset] = train.vae_mesh_sizes(config)
    config.mesh_preset = ""
    config.mesh.update({"data": 1, "fsdp": 2, "tensor": 1, "expert": -1})
    res["folded"]["rest"] = train.vae_mesh_sizes(config)
    return res


def _worker(tmp: str) -> dict:
    return {"heldout": _heldout(tmp), "official": _official()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vae_stage")
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    out = tmp / "out.json"
    proc = subprocess.run([sys.executable, __file__, str(tmp), str(out)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_official_vae_step_lowers_under_8xh100_preset(results):
    r = results["official"]
    assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}  # the preset's expert axis -> data
    assert r["batch_spec"] == [["data", "fsdp"]], r["batch_spec"]
    assert r["hlo_chars"] > 10_000
    assert r["donated"] >= r["num_leaves"] - 4, (r["donated"], r["num_leaves"])  # state buffers reused in place
    specs = r["specs"]
    # a big backbone kernel and its Adam moments are FSDP-sharded on one dim; small leaves replicated
    big = [k for k, v in specs.items() if k.startswith("['gen_params']['encoder']") and v and "fsdp" in v]
    assert big, "no FSDP-sharded encoder leaf"
    mu = [k for k in specs if k.startswith("['gen_opt_state']") and k.endswith(big[0][len("['gen_params']"):])]
    assert len(mu) == 2 and all(specs[k] == specs[big[0]] for k in mu), (big[0], mu)
    assert any(k.startswith("['disc_params']") and v and "fsdp" in v for k, v in specs.items())
    assert specs["['step']"] == [] and specs["['rng']"] == [] and specs["['num_skipped']"] == []
    # the frozen semantic path has no optimizer state
    assert any(k.startswith("['gen_params']['decoder']['semantic']") for k in specs)
    assert not any("semantic" in k for k in specs if k.startswith("['gen_opt_state']"))
    assert 1000 < r["gen_params_m"] < 2000, r["gen_params_m"]  # ~1.4B with the 32-layer whisper semantic module
    assert r["state_gib_per_device"] < 10, r["state_gib_per_device"]
    assert r["tflops_per_step"] > 10, r["tflops_per_step"]


def test_heldout_batch_sources(results):
    r = results["heldout"]
    fb = r["fallback"]
    assert "training manifest" in fb["why"] and "not held out" in fb["why"]
    assert fb["shape"] == [3, 19520]  # 1.225 s -> 61 frames of 320 samples
    assert fb["ids"] == ["p0", "p3", "p2"]  # spread over the records (0, 1, 3), the unreadable p1 skipped, p2 next
    assert fb["lengths"] == [16000, 19520, 19520]  # p0 is shorter than the crop: zero-padded
    assert r["centre_crop_err"] == 0.0
    assert "held-out manifest" in r["manifest"]["why"] and r["manifest"]["ids"] == ["p3", "p4"]
    assert r["none"]["batch"] is None and "no readable" in r["none"]["why"]


def test_vae_mesh_folds_tensor_and_expert_into_data(results):
    f = results["heldout"]["folded"]
    assert f["8xH100"] == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    assert f["32xH100"] == {"data": 8, "fsdp": 4, "tensor": 1, "expert": 1}
    assert f["v5p-256"] == {"data": 8, "fsdp": 16, "tensor": 1, "expert": 1}
    assert f["rest"] == {"data": -1, "fsdp": 2, "tensor": 1, "expert": 1}


if __name__ == "__main__":
    tmp, out = sys.argv[1], sys.argv[2]
    with open(out, "w") as f:
        json.dump(_worker(tmp), f)
