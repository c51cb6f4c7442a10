"""configs/: the LLM variants build, the official one lowers abstractly, and checkpoint values override."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import FIXTURES
from configs import llm as llm_configs
from unitok_jax import llm


def test_tiny_and_official_llm_configs_build():
    tiny = llm_configs.build(llm_configs.get_config("tiny"))
    assert tiny.width == 64 and tiny.num_experts == 8
    official = llm_configs.build(llm_configs.get_config("official"))
    assert (official.width, official.num_layers, official.num_experts, official.num_experts_per_tok) == (2048, 28, 64, 6)
    assert official.rope_3d and official.sections == (16, 24, 24)
    # the official size is only traced (no memory): 16.8B parameters as the spec's arithmetic says
    shapes = jax.eval_shape(llm.BailingMoeLM(official).init, jax.random.key(0), np.zeros((1, 4), np.int32))
    n = sum(int(np.prod(x.value.shape if hasattr(x, "value") else x.shape))
            for x in jax.tree.leaves(shapes, is_leaf=lambda x: hasattr(x, "value")))
    assert 16.6e9 < n < 17.0e9, n
    with pytest.raises(ValueError, match="variant"):
        llm_configs.get_config("huge")


def test_checkpoint_config_overrides_every_inferred_value(tmp_path):
    full = json.loads((FIXTURES / "bailingmm.config.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps(full))
    cfg = llm_configs.build(llm_configs.get_config("official"), checkpoint_config=str(path))
    want = full["llm_config"]
    assert cfg.width == want["hidden_size"] and cfg.num_layers == want["num_hidden_layers"]
    assert cfg.num_experts == want["num_experts"] and cfg.vocab_size == want["vocab_size"]
    assert cfg.rope_3d == (want.get("rope_scaling") is not None)
    assert cfg.multi_gate == want["multi_gate"]
