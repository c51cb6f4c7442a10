"""Two reference TTS steps glued from the components (e2e_step.npz), fed the recorded noise."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import pytest

from conftest import FIXTURES, load_fixture, rel_err
from unitok_jax import heads, llm, model
from unitok_jax.convert.common import read_weights
from unitok_jax.convert.flow import convert_dit, convert_heads
from unitok_jax.convert.llm import convert_llm
from unitok_jax.convert.vae import convert_vae

TOL = 1e-4


@pytest.fixture(scope="module")
def uni():
    cfg_json, d = load_fixture("e2e_step")
    full = cfg_json["bailingmm_config"]
    cfg = model.UniAudioConfig.from_bailingmm(full)
    _, vae_p = convert_vae(read_weights(str(FIXTURES / "audio_vae.safetensors")), full["audio_tokenizer_config"])
    _, llm_vars = convert_llm(str(FIXTURES / "llm.safetensors"), full["llm_config"])
    flow_p = convert_dit(read_weights(str(FIXTURES / "flow_head.safetensors")), cfg.flow)
    hp = convert_heads(read_weights(str(FIXTURES / "heads.safetensors")), cfg.heads)
    params = {"audio": vae_p, "model": llm_vars["params"], "flowloss": flow_p,
              "linear_proj_audio": hp["pooling"], "stop_head": hp["stop_head"]}
    return cfg, params, cfg_json, d


@pytest.mark.parity
def test_e2e_two_tts_steps(uni):
    cfg, params, cj, d = uni
    p = cj["patch_size"]
    assert p == cfg.patch_size
    sampler = dict(steps=cj["steps"], cfg=cj["cfg_scale"], sway=cj["sway_sampling_coef"], return_trajectory=True)
    z = jnp.asarray(d["z_prompt"])
    sem_cache = model.vae.init_semantic_cache(cfg.vae, 1, 64)
    audio_in, unified, sem_cache = model.audio_inputs(params, cfg, z, sem_cache)
    assert rel_err(unified, d["prompt_unified_emb"]) <= TOL
    assert rel_err(audio_in, d["prompt_vae_embeds"]) <= TOL
    ids = jnp.asarray(d["input_ids"])
    embeds = model.splice_audio(model.embed_tokens(params, cfg, ids), audio_in, jnp.array([ids.shape[1] - 2]))
    assert rel_err(embeds, d["prefix_inputs_embeds"]) <= TOL

    lm = model.llm_module(cfg)
    cache = llm.init_cache(cfg.llm, 1, 32)
    logits, hidden, cache = llm.prefill(lm, model.llm_vars(params), cache, inputs_embeds=embeds)
    history = z[:, -p:]
    for step in (0, 1):
        s = f"step{step}_"
        assert rel_err(logits, d[s + "llm_logits_last"]) <= TOL
        cond = hidden[:, None]
        assert rel_err(cond, d[s + "z_diff"]) <= TOL
        assert rel_err(history, d[s + "latent_history"]) <= TOL
        x, traj = model.sample_patch(params, cfg, jax.random.key(0), cond, history,
                                     init_noise=jnp.swapaxes(jnp.asarray(d[s + "noise"]), 1, 2),
                                     step_noise=jnp.asarray(d[s + "sde_noise"]), **sampler)
        assert rel_err(traj, d[s + "trajectory"]) <= TOL
        assert rel_err(x, d[s + "sampled_latent"]) <= TOL
        sl = model.stop_logits(params, cfg, cond)
        assert rel_err(sl, d[s + "stop_logits"]) <= TOL
        assert rel_err(heads.stop_probability(sl)[0, 0], d[s + "stop_prob"]) <= TOL
        nxt, uni_x, sem_cache = model.audio_inputs(params, cfg, x, sem_cache)
        assert rel_err(uni_x, d[s + "unified_emb"]) <= TOL
        assert rel_err(nxt, d[s + "next_inputs_embeds"]) <= TOL
        logits, hidden, cache = llm.decode_step(lm, model.llm_vars(params), cache, inputs_embeds=nxt)
        history = x
