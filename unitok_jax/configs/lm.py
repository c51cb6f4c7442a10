"""LM-stage (LLM + flow head + stop head, frozen VAE) training configurations.

  python train.py --config configs/lm.py:tiny --workdir runs/lm \\
      --config.data.manifest=corpus/train.jsonl --config.init.vae=runs/vae/export

Variants: ``tiny`` (CPU) and ``official`` (Ming-UniAudio-16B-A3B as the spec estimates it: Ling-lite LLM, the
estimated MingTok-Audio, a 0.1B DiT). ``--config.mesh_preset`` picks a pod layout (:data:`MESH_PRESETS`), else
``--config.mesh.*`` sizes apply (one may be -1: the rest of the devices).
"""
from __future__ import annotations

import copy

import ml_collections

from unitok_jax import sharding as shd
from unitok_jax.configs import vae as vae_configs
from unitok_jax.configs.llm import OFFICIAL_LLM_CONFIG, TINY_LM_LLM_CONFIG

# Mesh presets live in unitok_jax.sharding (sample.py and the API use them too); re-exported here for configs.
MESH_PRESETS, PRESET_DEVICES = shd.MESH_PRESETS, shd.PRESET_DEVICES


def _audio_config(variant: str) -> dict:
    v = vae_configs.get_config(variant).vae.to_dict()
    return {"patch_size": 5, **copy.deepcopy(v)}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in ("tiny", "official"):
        raise ValueError(f"unknown LM config variant {variant!r}; choose 'tiny' or 'official'")
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.stage = "lm"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # A Ming-UniAudio config.json (llm_config / audio_tokenizer_config / ditar_config). The VAE part is replaced
    # by the VAE checkpoint's own config when init.vae / init.checkpoint is given.
    c.model.bailingmm = {
        "llm_config": dict(TINY_LM_LLM_CONFIG if tiny else OFFICIAL_LLM_CONFIG),
        "audio_tokenizer_config": _audio_config(variant),
        "ditar_config": ({"hidden_size": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0} if tiny
                         else {"hidden_size": 1024, "depth": 8, "num_heads": 16, "mlp_ratio": 4.0}),
    }
    c.model.dtype = "float32" if tiny else "bfloat16"  # compute dtype of the LLM and the flow head
    c.model.moe_impl = "auto"  # "auto" | "ragged" | "tiled" | "dense"
    # expert parallelism (mesh.expert > 1): "psum" replicates tokens over the expert axis and sums partial outputs;
    # "a2a" sends only the routed rows to their experts' devices and back (a ragged all-to-all, compute dtype)
    c.model.moe_dispatch = "psum"
    c.model.remat = False  # rematerialise each LLM block in the backward pass (activation memory for compute)
    # jax.nn.dot_product_attention's implementation: "auto" (jax picks: XLA today), "xla", or "cudnn" (fused flash
    # attention on NVIDIA GPUs, bf16 / fp16 compute)
    c.model.attention = "auto"

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ml_collections.config_dict.placeholder(str)  # full model (convert output / LM export)
    c.init.vae = ml_collections.config_dict.placeholder(str)  # VAE checkpoint (train.py vae export / MingTok-Audio)

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ml_collections.config_dict.placeholder(str)  # folder with tokenizer.json
    c.tokenizer.vocab_size = 512  # when no path: a BPE trained on the manifest's texts (saved in the workdir)

    c.data = ml_collections.ConfigDict()
    c.data.manifest = ml_collections.config_dict.placeholder(str)  # JSONL {id, audio, text, speaker}
    c.data.source = "audio"  # "audio": encode with the frozen VAE on the fly; "latents": a latent cache
    c.data.batch_size = 4 if tiny else 256  # global batch (rows)
    c.data.tts_fraction = 0.75  # TTS : ASR = 3 : 1 (reference gen:und ratio)
    # Edit pairs (python -m unitok_jax.data.build_edit_corpus): a whole step of them with probability edit_fraction
    c.data.edit_manifest = ml_collections.config_dict.placeholder(str)
    c.data.edit_fraction = 0.25
    c.data.buckets_seconds = (2.0, 4.0, 8.0) if tiny else (2.0, 4.0, 8.0, 16.0, 32.0)
    c.data.max_seconds = 8.0 if tiny else 32.0
    # Fixed batch shapes (one compilation; rows that do not fit are skipped and counted). 0: length buckets.
    c.data.seq_len = 0
    c.data.max_patches = 0
    # Packing (data.source=latents): each of the batch_size rows of seq_len tokens / max_patches patches holds as
    # many whole sequences as fit (attention stays inside each); one step program, little padding.
    c.data.pack = False
    # Held-out evaluation every `sample_every` steps (and at the end) when set: `heldout_size` records spread over
    # this manifest ({id, audio, text}, not trained on), as TTS + ASR sequences through the loss (heldout/*), and the
    # first `sample_audio` of them transcribed and spoken by the model (TensorBoard text and audio, heldout/asr_cer).
    c.data.heldout_manifest = ml_collections.config_dict.placeholder(str)
    c.data.heldout_size = 4 if tiny else 16

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300 if tiny else 100_000
    c.train.lr = 1e-3 if tiny else 1e-5
    c.train.warmup_steps = 20 if tiny else 500
    c.train.weight_decay = 0.02
    c.train.clip_norm = 1.0
    c.train.text_weight = 1.0
    c.train.flow_weight = 1.0
    c.train.stop_weight = 0.01
    c.train.aux_weight = 0.0  # MoE load balancing
    c.train.z_weight = 0.0  # router z loss
    c.train.train_semantic = False  # unfreeze the semantic module (decoder fc2 + semantic transformer)
    c.train.accum_steps = 1  # gradient accumulation micro-batches per step
    # Text logits only at the first this many labelled positions of each row ([B, n, V] float32 instead of
    # [B, S, V]); a row with more labels is skipped and counted. 0: logits at every position.
    c.train.text_positions = 128 if tiny else 256
    # "lm": the LLM stage. "s2": the tokenizer's unified stage (spec 7.1): only the semantic path (decoder fc2 +
    # semantic module + fc3) trains, on ASR sequences through the frozen LLM (init.checkpoint) and the full decoder
    # path: align_weight * text CE + mel_weight * log-mel L1 (needs data.source=audio; no TTS, flow or stop loss).
    c.train.objective = "lm"
    c.train.align_weight = 2.0
    c.train.mel_weight = 1.0
    c.train.max_bad_steps = 10  # abort after this many consecutive non-finite steps (0: never)

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.mesh_preset = ""  # a key of MESH_PRESETS, overriding c.mesh
    # Logical axis -> mesh axes ("data,fsdp"; "" = replicated): how params and activations are sharded
    # (unitok_jax.sharding.DEFAULT_RULES), e.g. --config.rules.vocab= to replicate the vocabulary.
    c.rules = ml_collections.ConfigDict({name: _axes_str(target) for name, target in shd.DEFAULT_RULES})
    c.distributed = "auto"  # jax.distributed.initialize: "auto" | "on" | "off"

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50 if tiny else 1000
    c.checkpoint.keep = 3
    # Several processes: exchange the SIGTERM flags every this many steps (besides orbax's reached_preemption);
    # no host collective on the other steps. One process checks its own flag every step.
    c.checkpoint.preemption_check_every = 10
    c.log_every = 10 if tiny else 50
    c.sample_every = 100 if tiny else 2000  # held-out evaluation (needs data.heldout_manifest); 0 = off
    c.sample_audio = 2  # held-out clips transcribed and spoken at each evaluation (single-process runs)
    c.tensorboard = True
    return c


def _axes_str(target) -> str:
    if target is None:
        return ""
    return target if isinstance(target, str) else ",".join(target)


def sharding_rules(config: ml_collections.ConfigDict) -> tuple:
    """The logical-axis rules of ``config.rules`` as :mod:`unitok_jax.sharding` takes them (``((logical, mesh
    axis | (axes, ...) | None), ...)``); :data:`unitok_jax.sharding.DEFAULT_RULES` when the config has none."""
    if "rules" not in config:
        return shd.DEFAULT_RULES
    out = []
    # in the order of DEFAULT_RULES (the first rule that claims a mesh axis for an array wins), new names after
    order = [n for n, _ in shd.DEFAULT_RULES if n in config.rules]
    order += sorted(n for n in config.rules if n not in order)
    for name in order:
        target = config.rules[name]
        axes = tuple(a.strip() for a in str(target or "").split(",") if a.strip())
        bad = [a for a in axes if a not in shd.MESH_AXES]
        if bad:
            raise ValueError(f"config.rules.{name}={target!r}: {bad[0]!r} is not a mesh axis {shd.MESH_AXES}")
        out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(out)


def mesh_sizes(config: ml_collections.ConfigDict) -> dict:
    """The mesh axis sizes the config asks for (the preset, if any, wins)."""
    return shd.mesh_sizes(config.mesh_preset, dict(config.mesh))
