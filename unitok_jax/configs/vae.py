"""VAE (tokenizer) training configurations: ``configs/vae.py:tiny`` (CPU) and ``configs/vae.py:official`` (the
estimated MingTok-Audio size; spec 6.1 leaves the backbone dims to the released config). ``train.objective`` picks
stage S0 (acoustic, the default) or S1 (semantic distillation).

  python train.py --config configs/vae.py:tiny --workdir runs/vae --config.data.manifest=corpus/train.jsonl
  python train.py --config configs/vae.py:tiny --workdir runs/vae_s1 --config.train.objective=s1 \
      --config.init.vae=runs/vae/export --config.data.manifest=teacher.jsonl   # records with a "teacher" .npy
"""
from __future__ import annotations

import ml_collections

TINY_BACKBONE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0)
OFFICIAL_BACKBONE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=16,
                         num_key_value_heads=16, use_sliding_window=True, sliding_window=32)


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in ("tiny", "official"):
        raise ValueError(f"unknown VAE config variant {variant!r}; choose 'tiny' or 'official'")
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.stage = "vae"
    c.seed = 0
    c.vae = dict(  # reference AudioVAEconfig kwargs
        enc_kwargs=dict(input_dim=320, hop_size=320, latent_dim=64, backbone=TINY_BACKBONE if tiny else OFFICIAL_BACKBONE),
        dec_kwargs=dict(output_dim=320, latent_dim=64, backbone=TINY_BACKBONE if tiny else OFFICIAL_BACKBONE),
        semantic_module_kwargs=dict(whisper_encoder=dict(n_state=48, n_head=4, n_layer=2) if tiny
                                    else dict(n_state=1280, n_head=20, n_layer=32)),
    )
    # Start from trained VAE params (a `vae` export of this stage or a converted MingTok-Audio folder); its VAE
    # config then replaces `vae`. Stage S1 distils into a trained S0 tokenizer.
    c.init = ml_collections.ConfigDict()
    c.init.vae = ml_collections.config_dict.placeholder(str)
    c.data = ml_collections.ConfigDict()
    c.data.manifest = ml_collections.config_dict.placeholder(str)  # JSONL {id, audio, text?, speaker}
    c.data.crop_seconds = 1.0 if tiny else 2.0
    c.data.batch_size = 4 if tiny else 64  # global batch
    # Reconstructed every `sample_every` steps: `heldout_size` clips spread over the held-out manifest (unset: over
    # the training manifest, then not held out), centre crops of `heldout_seconds`.
    c.data.heldout_manifest = ml_collections.config_dict.placeholder(str)
    # Stage S1: the manifest field naming each record's teacher features, a .npy [frames, unified_dim] at 50 Hz
    # (row i = samples [320 i, 320 (i + 1)); e.g. Whisper-large-v3 encoder outputs for the official sizes).
    c.data.teacher_key = "teacher"
    c.data.heldout_size = 4 if tiny else 8
    c.data.heldout_seconds = 2.0 if tiny else 4.0
    c.train = ml_collections.ConfigDict()
    c.train.steps = 200 if tiny else 200_000
    # "s0": acoustic (encoder + low-level decoder; 15 mel + adv + fm + 1e-4 KL, alternating GAN updates);
    # "s1": semantic distillation (decoder fc2 + semantic module only; MSE to the teacher features, no GAN)
    c.train.objective = "s0"
    c.train.gan_loss = "hinge"  # "hinge" | "lsgan"
    c.train.adv_start_step = 0
    c.train.noise_tau = 0.0  # RAE decoder-input noise (spec 7.4a); 0 = off
    c.train.lr = 1e-4 if not tiny else 3e-4
    # "constant", or "cosine": from train.lr down to lr_final_ratio * train.lr at train.steps (generator and
    # discriminators alike; a resumed run continues the same curve)
    c.train.lr_schedule = "constant"
    c.train.lr_final_ratio = 0.1
    c.train.tiny_discriminators = tiny
    c.train.max_bad_steps = 10  # abort after this many consecutive non-finite steps (0: never)
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50 if tiny else 2000
    c.checkpoint.keep = 3
    # Several processes: exchange the SIGTERM flags every this many steps (besides orbax's reached_preemption);
    # no host collective on the other steps. One process checks its own flag every step.
    c.checkpoint.preemption_check_every = 10
    c.log_every = 10 if tiny else 100
    c.sample_every = 50 if tiny else 2000  # held-out reconstruction metrics, audio and mel images; 0 = off
    c.sample_audio = 2  # held-out clips logged as audio + mel comparison images
    c.tensorboard = True  # DIR/tb next to DIR/metrics.jsonl
    # Device mesh as in configs/lm.py (the preset, a key of unitok_jax.sharding.MESH_PRESETS, wins); the VAE folds the
    # tensor and expert axes into data (unitok_jax.training.vae_train.vae_mesh_sizes).
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.mesh_preset = ""
    c.distributed = "auto"  # jax.distributed.initialize: "auto" | "on" | "off"
    return c
