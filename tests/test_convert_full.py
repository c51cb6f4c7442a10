"""Full Ming-UniAudio checkpoint conversion: every component from one folder, round trip through orbax."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES
from unitok_jax import model
from unitok_jax.convert import ConversionError, convert_reference, load, read_configs, read_vae_config, save


def _full_state_dict():
    w = {}
    w.update({"audio." + k: v for k, v in load_file(str(FIXTURES / "audio_vae.safetensors")).items()})
    w.update({"model." + k: v for k, v in load_file(str(FIXTURES / "llm.safetensors")).items()})
    w.update({"flowloss." + k: v for k, v in load_file(str(FIXTURES / "flow_head.safetensors")).items()})
    w.update(load_file(str(FIXTURES / "heads.safetensors")))  # already prefixed
    return w


def _write(folder, weights, shards=2):
    os.makedirs(folder)
    names = sorted(weights)
    files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards] for i in range(shards)}
    for f, keys in files.items():
        save_file({k: weights[k] for k in keys}, str(folder / f))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in files.items() for k in ks}}))
    (folder / "config.json").write_text((FIXTURES / "bailingmm.config.json").read_text())
    (folder / "tokenizer.json").write_text("{}")
    return str(folder)


def test_full_checkpoint_round_trip(tmp_path):
    src = _write(tmp_path / "src", _full_state_dict())
    ckpt = convert_reference(src)
    cfg = ckpt.configs["uniaudio"]
    assert set(ckpt.params["uniaudio"]) == set(model.COMPONENTS)
    save(ckpt, str(tmp_path / "dst"))
    assert os.path.isfile(tmp_path / "dst" / "tokenizer.json")
    back = load(str(tmp_path / "dst"))
    assert back.configs["uniaudio"] == cfg
    a, b = ckpt.params["uniaudio"], back.params["uniaudio"]
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    vcfg, vparams = back.vae()
    assert vcfg == cfg.vae
    # the configs alone, without the params (what an export of a run started from this checkpoint reads)
    assert read_configs(str(tmp_path / "dst")) == {"uniaudio": cfg}
    assert read_vae_config(str(tmp_path / "dst")) == cfg.vae
    # the loaded model runs: a pooled audio patch through the LLM, then a flow sample and a stop probability
    z = jax.random.normal(jax.random.key(0), (1, cfg.patch_size, cfg.vae.latent_dim))
    emb, _, _ = model.audio_inputs(b, cfg, z)
    out = model.llm_module(cfg).apply(model.llm_vars(b), inputs_embeds=emb)
    x = model.sample_patch(b, cfg, jax.random.key(1), out["hidden"][:, -1:], z, steps=4)
    assert x.shape == z.shape and np.all(np.isfinite(np.asarray(x)))
    assert model.stop_logits(b, cfg, out["hidden"]).shape == (1, 1, 2)


def test_full_checkpoint_errors_name_the_key(tmp_path):
    w = _full_state_dict()
    w["vision.encoder.weight"] = np.zeros((2,), np.float32)
    with pytest.raises(ConversionError, match="vision.encoder.weight"):
        convert_reference(_write(tmp_path / "a", w))
    w = _full_state_dict()
    del w["flowloss.cfm.model.final_layer.linear.bias"]
    with pytest.raises(ConversionError, match="final_layer.linear.bias"):
        convert_reference(_write(tmp_path / "b", w))
    w = _full_state_dict()
    w["stop_head.weight"] = np.zeros((3, 64), np.float32)
    with pytest.raises(ConversionError, match=r"stop_head.weight.*\(3, 64\)"):
        convert_reference(_write(tmp_path / "c", w))
