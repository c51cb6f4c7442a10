"""Two reference TTS steps (e2e_step.npz), fed the recorded noise: glued from the components, and run by the
generation loop itself (:func:`unitok_jax.generate.tts` with its noise hook)."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, load_fixture, rel_err
from unitok_jax import generate, heads, llm, model
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


def _generate(uni, **kw):
    cfg, params, cj, d = uni
    ids = np.asarray(d["input_ids"], np.int32)
    assert ids[0, 6] == cj["audio_token_id"] and np.all(ids[0, 7:] == cj["patch_token_id"])
    text = ids[:, :7]  # the text ending with <audio>: tts() splices the prompt's pooled patches after it
    swap = lambda a: np.swapaxes(np.asarray(a), 1, 2)  # noqa: E731  channels-first [1, C, p] -> [1, p, C]
    init = np.stack([swap(d["step0_noise"]), swap(d["step1_noise"])], axis=1)  # [1, 2 patches, p, C]
    steps = np.stack([np.swapaxes(d[f"step{k}_sde_noise"], 0, 1) for k in (0, 1)], axis=1)  # [1, 2, 10, p, C]
    sampler = generate.Sampler(steps=cj["steps"], cfg=cj["cfg_scale"], sway=cj["sway_sampling_coef"])
    return generate.tts(params, cfg, text, np.array([7]), np.asarray(d["z_prompt"]), np.array([2]), np.array([2]),
                        jax.random.key(0), sampler=sampler, noise=(init, steps), decode=False, **kw)


@pytest.mark.parity
def test_e2e_generate_tts_loop_reproduces_two_reference_steps(uni):
    """generate.tts itself (prefill with the prompt spliced after <audio>, history = last prompt patch, the loop's
    semantic-cache and LLM feedback, budget, stop rule) fed the recorded noise gives the reference's two patches."""
    d = uni[3]
    res = _generate(uni, min_steps=16)
    assert res.counts[0] == 2 and not res.stopped[0]  # the budget (2) ends it
    for k in (0, 1):
        assert rel_err(res.latents[0, k], d[f"step{k}_sampled_latent"][0]) <= TOL
    assert np.all(res.latents[0, 2:] == 0)
    # the stop rule sees the reference's stop probability of step 0 (0.3988): a threshold just under it stops
    # there (the stopping patch is emitted), one just over it does not
    p0 = float(d["step0_stop_prob"])
    under = _generate(uni, min_steps=-1, stop_threshold=p0 - 1e-4)
    assert under.counts[0] == 1 and under.stopped[0]
    assert rel_err(under.latents[0, 0], d["step0_sampled_latent"][0]) <= TOL
    over = _generate(uni, min_steps=-1, stop_threshold=p0 + 1e-4)
    assert over.counts[0] == 2 and not over.stopped[0]
    # min_steps: with k = 0 not > 0 the step-0 stop is ignored
    assert _generate(uni, min_steps=0, stop_threshold=p0 - 1e-4).counts[0] == 2
