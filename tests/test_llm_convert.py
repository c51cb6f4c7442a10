"""LLM converter: layouts (per-expert / stacked, prefixes, sharded folders, bfloat16), round trips, and clear
errors for tampered checkpoints."""
from __future__ import annotations

import json
import os
import re

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, load_fixture
from unitok_jax.configs.llm import TINY_LLM_CONFIG
from unitok_jax.convert.common import ConversionError
from unitok_jax.convert.llm import convert_llm, export_llm, load_llm
from unitok_jax.llm import LLMConfig, apply_norm_head, random_params


@pytest.fixture(scope="module")
def ref():
    cfg_json, _ = load_fixture("llm")
    weights = load_file(str(FIXTURES / "llm.safetensors"))
    cfg, params = convert_llm(weights, cfg_json)
    return cfg_json["kwargs"], weights, params


def _same(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


def _stack_experts(weights, layers=None):
    """Per-expert -> grouped-gemm layout (for the given layers, default all)."""
    out = dict(weights)
    lids = sorted({int(k.split(".")[2]) for k in weights if ".mlp.experts." in k})
    for l in lids if layers is None else layers:
        for n in ("gate", "up", "down"):
            keys = sorted(
                (k for k in weights if k.startswith(f"model.layers.{l}.mlp.experts.") and k.endswith(f".{n}_proj.weight")),
                key=lambda k: int(k.split(".")[5]),
            )
            out[f"model.layers.{l}.mlp.experts.{n}_proj.weight"] = np.stack([weights[k] for k in keys])
            for k in keys:
                del out[k]
    return out


def test_llm_convert_file_equals_dict_and_norm_head_folded(ref):
    cfg_json, weights, params = ref
    cfg, from_file = convert_llm(FIXTURES / "llm.safetensors", cfg_json)
    _same(from_file, params)
    _, normed = convert_llm(weights, {**cfg_json, "norm_head": True})
    expect = apply_norm_head(weights["lm_head.weight"]).T
    np.testing.assert_allclose(normed["params"]["lm_head"], expect, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(expect, axis=1), 1.0, rtol=1e-5)  # unit columns over the vocab
    _, raw = convert_llm(weights, {**cfg_json, "norm_head": False})
    np.testing.assert_array_equal(raw["params"]["lm_head"], weights["lm_head.weight"].T)
    _same(params, normed if cfg.norm_head else raw)


def test_llm_convert_stacked_and_mixed_expert_layouts(ref):
    cfg_json, weights, params = ref
    _, stacked = convert_llm(_stack_experts(weights), cfg_json)
    _same(stacked, params)
    _, mixed = convert_llm(_stack_experts(weights, layers=[1]), cfg_json)
    _same(mixed, params)


def test_llm_convert_full_checkpoint_prefix_and_sharded_folder(ref, tmp_path):
    cfg_json, weights, params = ref
    full = {"model." + k: v for k, v in _stack_experts(weights).items()}
    full["audio.decoder.fc1.weight"] = np.zeros((3, 2), np.float32)  # other components are left alone
    full["linear_proj_audio.final_layer.linear.bias"] = np.zeros((3,), np.float32)
    _, p = convert_llm(full, cfg_json)
    _same(p, params)
    # The release's layout: shards + model.safetensors.index.json + config.json holding llm_config.
    keys = sorted(full)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: full[k] for k in ks}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps({"llm_config": cfg_json, "audio_tokenizer_config": {}}))
    cfg, p = convert_llm(str(tmp_path))  # config read from the folder
    _same(p, params)
    assert cfg == convert_llm(weights, cfg_json)[0]
    _, loaded = load_llm(str(tmp_path))
    _same(jax.tree.map(np.asarray, loaded), params)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors"):
        convert_llm(str(tmp_path))


def _write_bf16(path, weights):
    """A safetensors file with BF16 tensors (written by hand: the numpy API has no bfloat16)."""
    header, blobs, off = {}, [], 0
    for k in sorted(weights):
        b = np.ascontiguousarray(weights[k].astype(ml_dtypes.bfloat16)).tobytes()
        header[k] = {"dtype": "BF16", "shape": list(weights[k].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_llm_convert_bfloat16_safetensors(ref, tmp_path):
    cfg_json, weights, _ = ref
    _write_bf16(tmp_path / "bf16.safetensors", weights)
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in weights.items()}
    _, a = convert_llm(str(tmp_path / "bf16.safetensors"), cfg_json)
    _, b = convert_llm(rounded, cfg_json)
    _same(a, b)


@pytest.mark.parametrize("grouped", [False, True])
def test_llm_export_convert_round_trip_with_dense_layers(grouped):
    hf = {**TINY_LLM_CONFIG, "vocab_size": 50, "num_hidden_layers": 3, "first_k_dense_replace": 1,
          "use_qkv_bias": True, "use_bias": True, "multi_gate": False, "num_shared_experts": 2}
    cfg = LLMConfig.from_hf(hf)
    params = random_params(cfg, seed=4)
    sd = export_llm(cfg, params, grouped=grouped, prefix="model.")
    assert "model.model.layers.0.mlp.gate_proj.weight" in sd  # the dense layer
    assert ("model.model.layers.2.mlp.experts.gate_proj.weight" in sd) == grouped
    cfg2, back = convert_llm(sd, hf)
    assert cfg2 == cfg
    _same(back, params)


# ----------------------------------------------------------------------------------------- tampered inputs
# Names and shapes come from the fixture's config, so these hold for any fixture set in this format.


def _dims(c):
    return c["hidden_size"], c["moe_intermediate_size"], c["num_experts"], c["num_hidden_layers"]


def test_llm_convert_wrong_shape_names_key_and_shapes(ref):
    cfg_json, weights, _ = ref
    D, F, E, L = _dims(cfg_json)
    bad = dict(weights)
    k = f"model.layers.{L - 1}.mlp.experts.{E - 1}.up_proj.weight"
    bad[k] = np.zeros((F + 1, D), np.float32)
    with pytest.raises(ConversionError, match=rf"{re.escape(k)}.*\({F + 1}, {D}\).*\({F}, {D}\)"):
        convert_llm(bad, cfg_json)
    bad = _stack_experts(weights)
    k = "model.layers.0.mlp.experts.down_proj.weight"
    bad[k] = bad[k][: E - 1]
    with pytest.raises(ConversionError, match=rf"{re.escape(k)}.*\({E - 1}, {D}, {F}\).*\({E}, {D}, {F}\)"):
        convert_llm(bad, cfg_json)
    n, kv = cfg_json["num_attention_heads"], cfg_json["num_key_value_heads"]
    hd = cfg_json.get("head_dim") or D // n
    other = n if kv != n else 1
    with pytest.raises(ConversionError, match=rf"query_key_value\.weight.*shape \({(n + 2 * kv) * hd}, {D}\), "
                                              rf"expected \({(n + 2 * other) * hd}, {D}\)"):
        convert_llm(weights, {**cfg_json, "num_key_value_heads": other})


def test_llm_convert_missing_and_unexpected_keys(ref):
    cfg_json, weights, _ = ref
    D, F, E, L = _dims(cfg_json)
    k = f"model.layers.{L - 1}.mlp.gate.weight"
    bad = {key: v for key, v in weights.items() if key != k}
    with pytest.raises(ConversionError, match=rf"missing key '{re.escape(k)}'"):
        convert_llm(bad, cfg_json)
    no_gates = {key: v for key, v in weights.items() if not re.search(r"mlp\.(audio|image)_gate", key)}
    with pytest.raises(ConversionError, match=r"missing key .*(image|audio)_gate.*multi_gate=true"):
        convert_llm(no_gates, {**cfg_json, "multi_gate": True})
    with_gates = dict(no_gates)
    with_gates["model.layers.0.mlp.audio_gate.weight"] = np.zeros((E, D), np.float32)
    with pytest.raises(ConversionError, match=r"unexpected key.*audio_gate"):
        convert_llm(with_gates, {**cfg_json, "multi_gate": False})
    bad = dict(weights)
    bad[f"model.layers.0.mlp.experts.{E}.gate_proj.weight"] = np.zeros((F, D), np.float32)
    with pytest.raises(ConversionError, match=rf"unexpected key.*experts\.{E}\.gate_proj"):
        convert_llm(bad, cfg_json)
    has_bias = "model.layers.0.attention.dense.bias" in weights
    if has_bias:
        with pytest.raises(ConversionError, match=r"unexpected key.*attention\.dense\.bias"):
            convert_llm(weights, {**cfg_json, "use_bias": False})
    else:
        with pytest.raises(ConversionError, match=r"missing key.*attention\.dense\.bias"):
            convert_llm(weights, {**cfg_json, "use_bias": True})
    both = _stack_experts(weights, layers=[0])
    both["model.layers.0.mlp.experts.0.gate_proj.weight"] = weights["model.layers.0.mlp.experts.0.gate_proj.weight"]
    with pytest.raises(ConversionError, match="both per-expert and stacked"):
        convert_llm(both, cfg_json)
    with pytest.raises(ConversionError, match="no BailingMoE LLM"):
        convert_llm({"audio.x": np.zeros(2, np.float32)}, cfg_json)


def test_llm_convert_bad_files(ref, tmp_path):
    cfg_json, weights, _ = ref
    src = FIXTURES / "llm.safetensors"
    data = src.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="cut.safetensors"):
        convert_llm(str(tmp_path / "cut.safetensors"), cfg_json)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ConversionError, match="junk.safetensors"):
        convert_llm(str(tmp_path / "junk.safetensors"), cfg_json)
    with pytest.raises(ConversionError, match="does not exist"):
        convert_llm(str(tmp_path / "nowhere"), cfg_json)
    with pytest.raises(ConversionError, match="llm_config"):
        convert_llm(weights, {**cfg_json, "rope_scaling": {"type": "yarn"}})
