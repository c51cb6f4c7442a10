"""The tiny full Ming-UniAudio model (``bailingmm`` layout: LLM, AudioVAE with its semantic module, DiT): the whole
structure at CPU size (multi_gate LLM with MoE, semantic module, DiT) for tests and benchmarks. The LLM-only size
presets are in :mod:`unitok_jax.configs.llm`; this one is smaller still (one layer, 32 wide) so that a test of the
whole generation loop compiles in seconds."""
from __future__ import annotations

from unitok_jax.model import UniAudioConfig

TINY_BAILINGMM: dict = {
    "llm_config": {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "hidden_act": "silu",
        "use_qkv_bias": True, "use_bias": True, "rms_norm_eps": 1e-6, "norm_head": False,
        "tie_word_embeddings": False, "max_position_embeddings": 1024, "rope_theta": 10000.0, "rope_scaling": None,
        "pad_token_id": 0, "num_experts": 4, "num_shared_experts": 1, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "moe_intermediate_size": 16, "first_k_dense_replace": 0, "multi_gate": True,
    },
    "audio_tokenizer_config": {
        "patch_size": 5,
        "enc_kwargs": {"input_dim": 40, "hop_size": 40, "latent_dim": 8, "backbone": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu"}},
        "semantic_module_kwargs": {"whisper_encoder": {"n_state": 16, "n_head": 2, "n_layer": 1}},
        "dec_kwargs": {"output_dim": 40, "latent_dim": 8, "backbone": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu"}},
    },
    "ditar_config": {"hidden_size": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0},
}


def tiny_config() -> UniAudioConfig:
    return UniAudioConfig.from_bailingmm(TINY_BAILINGMM)
