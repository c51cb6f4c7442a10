"""unitok_jax: Ming-UniAudio (MingTok-Audio VAE, BailingMoE LLM, flow-matching head) in JAX/Flax.

Public API (re-exported names only):

* :class:`UniAudio` — load a converted checkpoint; ``tts`` / ``asr`` / ``edit`` / ``reconstruct`` on lists;
* :func:`load_checkpoint` / :func:`convert_checkpoint` — unitok_jax checkpoints from official weights;
* modules for research code: ``vae``, ``llm``, ``moe``, ``flow``, ``heads``, ``model``, ``generate``, ``text``,
  ``audio``, ``sharding``, ``nn``.
"""
from unitok_jax.api import EditOutput, UniAudio
from unitok_jax.convert import Checkpoint, ConversionError
from unitok_jax.convert import convert_reference as convert_checkpoint
from unitok_jax.convert import load as load_checkpoint
from unitok_jax.convert import save as save_checkpoint
from unitok_jax.model import UniAudioConfig
from unitok_jax.vae import VAEConfig

__all__ = [
    "Checkpoint", "ConversionError", "EditOutput", "UniAudio", "UniAudioConfig", "VAEConfig", "convert_checkpoint",
    "load_checkpoint", "save_checkpoint",
]
