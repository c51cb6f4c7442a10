"""VAE checkpoint conversion: round trip, sharded sets, prefixes, and clear errors on tampered checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, REPO
from unitok_jax import vae
from unitok_jax.convert import ConversionError, convert_reference, load, read_vae_config, save


@pytest.fixture(scope="module")
def ref_weights():
    return load_file(str(FIXTURES / "audio_vae.safetensors"))


@pytest.fixture(scope="module")
def ref_kwargs():
    return json.loads((FIXTURES / "audio_vae.config.json").read_text())["kwargs"]


def _write_src(folder, weights, config, prefix=""):
    os.makedirs(folder, exist_ok=True)
    save_file({prefix + k: v for k, v in weights.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def test_convert_save_load_round_trip_gives_identical_outputs(tmp_path, ref_weights, ref_kwargs):
    src = _write_src(tmp_path / "src", ref_weights, ref_kwargs)
    ckpt = convert_reference(src)
    save(ckpt, str(tmp_path / "dst"))
    back = load(str(tmp_path / "dst"))
    assert back.configs["vae"] == ckpt.configs["vae"]
    assert read_vae_config(str(tmp_path / "dst")) == ckpt.configs["vae"]  # the config alone, no params read
    for a, b in zip(jax.tree.leaves(ckpt.params["vae"]), jax.tree.leaves(back.params["vae"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cfg = back.configs["vae"]
    wave = 0.1 * jax.random.normal(jax.random.key(0), (2, 4000))
    for p in (ckpt.params["vae"], back.params["vae"]):
        enc = vae.encode(p, cfg, wave, sample=False)
        out = np.asarray(vae.decode(p, cfg, enc.mean))
        if p is ckpt.params["vae"]:
            first = out
    np.testing.assert_array_equal(first, out)
    with pytest.raises(FileExistsError):
        save(ckpt, str(tmp_path / "dst"))


def test_full_checkpoint_prefix_and_sharded_index(tmp_path, ref_weights, ref_kwargs):
    full = {"audio." + k: v for k, v in ref_weights.items()}
    names = sorted(full)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    src = tmp_path / "full"
    os.makedirs(src)
    for shard, keys in shards.items():
        save_file({k: full[k] for k in keys}, str(src / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(json.dumps({"audio_tokenizer_config": ref_kwargs}))
    ckpt = convert_reference(str(src))
    plain = convert_reference(_write_src(tmp_path / "plain", ref_weights, ref_kwargs))
    for a, b in zip(jax.tree.leaves(ckpt.params["vae"]), jax.tree.leaves(plain.params["vae"])):
        np.testing.assert_array_equal(a, b)
    os.remove(src / "model-00002-of-00002.safetensors")
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors"):
        convert_reference(str(src))


def test_missing_key_is_named(tmp_path, ref_weights, ref_kwargs):
    w = dict(ref_weights)
    del w["decoder.semantic_model.blocks.1.attn.value.bias"]
    with pytest.raises(ConversionError, match=r"missing key 'decoder\.semantic_model\.blocks\.1\.attn\.value\.bias'"):
        convert_reference(_write_src(tmp_path / "s", w, ref_kwargs))


def test_wrong_shape_is_named_with_found_and_expected(tmp_path, ref_weights, ref_kwargs):
    w = dict(ref_weights)
    w["encoder.fc3.weight"] = np.zeros((100, 64), np.float32)
    with pytest.raises(ConversionError, match=r"'encoder\.fc3\.weight' has shape \(100, 64\), expected \(128, 64\)"):
        convert_reference(_write_src(tmp_path / "s", w, ref_kwargs))


def test_unexpected_key_and_config_mismatch(tmp_path, ref_weights, ref_kwargs):
    w = dict(ref_weights)
    w["decoder.mystery.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ConversionError, match="unexpected key.*decoder.mystery.weight"):
        convert_reference(_write_src(tmp_path / "a", w, ref_kwargs))
    # a config with one layer fewer than the weights: the extra layer is reported as unexpected
    kw = json.loads(json.dumps(ref_kwargs))
    kw["dec_kwargs"]["backbone"]["num_hidden_layers"] = 1
    with pytest.raises(ConversionError, match=r"unexpected key.*decoder\.decoder\.layers\.1\."):
        convert_reference(_write_src(tmp_path / "b", ref_weights, kw))
    # a wrong window buffer is refused
    w = dict(ref_weights)
    w["decoder.head.istft.window"] = np.ones_like(w["decoder.head.istft.window"])
    with pytest.raises(ConversionError, match="Hann"):
        convert_reference(_write_src(tmp_path / "c", w, ref_kwargs))


def test_truncated_safetensors_is_reported(tmp_path, ref_weights, ref_kwargs):
    src = _write_src(tmp_path / "s", ref_weights, ref_kwargs)
    path = os.path.join(src, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="model.safetensors"):
        convert_reference(src)


def test_cli_converts_and_refuses_bad_input_without_writing(tmp_path, ref_weights, ref_kwargs):
    src = _write_src(tmp_path / "src", ref_weights, ref_kwargs)
    run = lambda *a: subprocess.run([sys.executable, "-m", "unitok_jax.convert", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True)
    r = run(src, str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "vae:" in r.stdout and os.path.isfile(tmp_path / "out" / "unitok_config.json")
    w = dict(ref_weights)
    del w["encoder.fc1.weight"]
    bad = _write_src(tmp_path / "bad", {k: v for k, v in w.items()}, ref_kwargs)
    r = run(bad, str(tmp_path / "out2"))
    assert r.returncode == 2 and "encoder.fc1.weight" in r.stderr
    assert not os.path.exists(tmp_path / "out2")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out2")]  # no temporary left behind


def test_load_reports_a_non_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="not a unitok_jax checkpoint"):
        load(str(tmp_path))
