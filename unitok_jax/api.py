"""The request-level Python API: load a converted checkpoint once, then run TTS, ASR, editing and reconstruction on
lists of inputs. Inputs are waveforms (float arrays at 16 kHz) or audio file paths; outputs are numpy arrays and
text.

  from unitok_jax import UniAudio
  m = UniAudio.load("ckpt/")
  waves = m.tts(["Hello there."], prompt_wavs=["voice.wav"], prompt_texts=["The voice prompt's words."])
  texts = m.asr(["speech.flac"])
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from unitok_jax import generate, text, vae
from unitok_jax.audio import load_audio
from unitok_jax.model import UniAudioConfig

Audio = Union[str, os.PathLike, np.ndarray]


@dataclasses.dataclass
class EditOutput:
    text: str  # the model's text (special tokens stripped)
    target_transcript: Optional[str]  # the <cot_text> transcript of a semantic edit, if any
    wave: np.ndarray  # edited speech (empty if the model produced no audio)
    markup: Optional[str] = None  # the raw <cot_text> content, <edit>…</edit> spans kept (None: no <cot_text>)


class UniAudio:
    """A loaded Ming-UniAudio model (config, params on device, text tokenizer)."""

    def __init__(self, cfg: UniAudioConfig, params, tokenizer: "text.TextTokenizer"):
        self.cfg = cfg
        self.params = params
        self.tok = tokenizer

    @classmethod
    def load(cls, path: str) -> "UniAudio":
        """A checkpoint written by ``python -m unitok_jax.convert`` from a full model folder (with its
        ``tokenizer.json``)."""
        from unitok_jax.convert import ConversionError, load

        ckpt = load(path)
        if "uniaudio" not in ckpt.configs:
            raise ConversionError(f"{path} holds only an AudioVAE; TTS/ASR/edit need a full Ming-UniAudio checkpoint")
        return cls(ckpt.configs["uniaudio"], jax.device_put(ckpt.params["uniaudio"]), text.TextTokenizer.from_dir(path))

    # ----------------------------------------------------------------------------------------------- audio

    @property
    def sample_rate(self) -> int:
        return self.cfg.vae.sample_rate

    def _wave(self, a: Audio) -> np.ndarray:
        if isinstance(a, (str, os.PathLike)):
            return load_audio(a, self.sample_rate)
        w = np.asarray(a, np.float32)
        if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)):
            raise ValueError("waveforms must be non-empty, finite 1-D float arrays at 16 kHz")
        return w

    def encode(self, wavs: Sequence[Audio], key, *, sample: bool = True,
               request_ids: Optional[Sequence[int]] = None) -> list[np.ndarray]:
        """Latents [T_i, C] per input (posterior sample by default, as the reference does for its inputs). The
        posterior noise of row i is drawn from ``fold_in(key, request_ids[i])`` at that row's own length, so an
        input encodes the same whatever else is in its batch."""
        waves = [self._wave(w) for w in wavs]
        batch, lengths = generate.pad_sequences(waves, dtype=np.float32)
        hop, c = self.cfg.vae.hop, self.cfg.vae.latent_dim
        frames = generate.bucket(vae.num_frames(batch.shape[1], hop))
        batch = generate.pad_axis(batch, frames * hop, 1)
        noise = None
        if sample:
            ids = range(len(waves)) if request_ids is None else request_ids
            noise = np.zeros((len(waves), frames, c), np.float32)
            for i, rid in enumerate(ids):
                t = vae.num_frames(int(lengths[i]), hop)
                noise[i, :t] = np.asarray(jax.random.normal(jax.random.fold_in(key, int(rid)), (t, c)))
            noise = jnp.asarray(noise)
        enc = vae.encode(self.params["audio"], self.cfg.vae, jnp.asarray(batch), jnp.asarray(lengths), noise=noise,
                         sample=sample)
        lat, n = np.asarray(enc.latent), np.asarray(enc.frame_num)
        return [lat[i, : n[i]] for i in range(len(waves))]

    def _patched(self, latents: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Whole patches only (the trailing T mod p frames are dropped, as the reference does): padded latents and
        patch counts."""
        p = self.cfg.patch_size
        counts = np.array([len(z) // p for z in latents], np.int32)
        cut = [z[: c * p] if c else np.zeros((0, self.cfg.vae.latent_dim), np.float32) for z, c in zip(latents, counts)]
        padded, _ = generate.pad_sequences(cut, dtype=np.float32)
        return padded, counts

    def reconstruct(self, wavs: Sequence[Audio]) -> list[np.ndarray]:
        """Encode (posterior mean) and decode each input."""
        lat = self.encode(wavs, None, sample=False)
        padded, lengths = generate.pad_sequences(lat, dtype=np.float32)
        out = np.asarray(vae.decode(self.params["audio"], self.cfg.vae, jnp.asarray(padded), jnp.asarray(lengths)))
        return [out[i, : lengths[i] * self.cfg.vae.hop] for i in range(len(lat))]

    # ----------------------------------------------------------------------------------------------- tasks

    def tts(self, texts: Sequence[str], prompt_wavs: Optional[Sequence[Audio]] = None,
            prompt_texts: Optional[Sequence[str]] = None, *, seed: int = 0, max_patches: Optional[int] = None,
            sampler: generate.Sampler = generate.Sampler(), min_steps: int = 16, stop_threshold: float = 0.5,
            request_ids: Optional[Sequence[int]] = None) -> list[np.ndarray]:
        """Speech for each text, in the voice of its prompt (spec §1.3). The patch budget per text follows the
        reference formula with a floor (:func:`unitok_jax.text.tts_patch_budget`), capped by ``max_patches``."""
        n = len(texts)
        if any(not t or not t.strip() for t in texts):
            raise text.TextError("TTS text is empty")
        prompt_texts = list(prompt_texts) if prompt_texts is not None else [""] * n
        key = jax.random.key(seed)
        k_enc, k_gen = jax.random.split(key)
        if prompt_wavs is not None:
            lat, counts = self._patched(self.encode(prompt_wavs, k_enc, request_ids=request_ids))
        else:
            lat = np.zeros((n, self.cfg.patch_size, self.cfg.vae.latent_dim), np.float32)
            counts = np.zeros((n,), np.int32)
        ids = [text.tts_prompt(self.tok, t, pt, int(c)) for t, pt, c in zip(texts, prompt_texts, counts)]
        ids_p, lengths = generate.pad_sequences(ids, dtype=np.int32)
        budgets = np.array([text.tts_patch_budget(t, maximum=max_patches) for t in texts], np.int32)
        res = generate.tts(self.params, self.cfg, ids_p, lengths, lat, counts, budgets, k_gen,
                           request_ids=request_ids, sampler=sampler, min_steps=min_steps,
                           stop_threshold=stop_threshold)
        spp = self.cfg.patch_size * self.cfg.vae.hop
        return [res.waves[i, : res.counts[i] * spp] for i in range(n)]

    def asr(self, wavs: Sequence[Audio], context: Optional[Sequence[Optional[Sequence[str]]]] = None, *,
            seed: int = 0, max_new_tokens: int = 128, with_language: bool = False):
        """Transcripts (spec §1.2). ``context``: optional hot words per input. ``with_language``: return
        (language, transcript) pairs."""
        lat, counts = self._patched(self.encode(wavs, jax.random.key(seed)))
        context = list(context) if context is not None else [None] * len(lat)
        ids = [text.asr_prompt(self.tok, int(c), context_words=cw)[0] for c, cw in zip(counts, context)]
        ids_p, lengths = generate.pad_sequences(ids, dtype=np.int32)
        res = generate.asr(self.params, self.cfg, ids_p, lengths, lat, counts, eos_id=self.tok.id("eos"),
                           audio_patch_id=self.tok.id("audio_patch"), max_new_tokens=max_new_tokens,
                           pad_id=self.tok.id("eos"))
        out = []
        for i in range(len(lat)):
            lang, transcript = text.parse_asr_output(self.tok.decode(res.tokens[i, : res.n[i]].tolist()))
            out.append((lang, transcript) if with_language else transcript)
        return out

    def edit(self, wavs: Sequence[Audio], instructions: Sequence[str], *, semantic: Union[bool, Sequence[bool]] = False,
             seed: int = 0, max_text_tokens: int = 128, max_patches: int = 256,
             sampler: generate.Sampler = generate.Sampler(), min_steps: int = 16,
             stop_threshold: float = 0.5) -> list[EditOutput]:
        """Free-form edits (spec §1.4): ``semantic`` (per input or for all) appends ``<answer>`` so the model
        writes the edited transcript first, as the reference does for insert / delete / substitute edits."""
        n = len(wavs)
        sem = [semantic] * n if isinstance(semantic, bool) else list(semantic)
        key = jax.random.key(seed)
        k_enc, k_gen = jax.random.split(key)
        lat, counts = self._patched(self.encode(wavs, k_enc))
        ids = [text.edit_prompt(self.tok, int(c), ins, semantic=s)[0] for c, ins, s in zip(counts, instructions, sem)]
        ids_p, lengths = generate.pad_sequences(ids, dtype=np.int32)
        res = generate.edit(self.params, self.cfg, ids_p, lengths, lat, counts, k_gen, eos_id=self.tok.id("eos"),
                            gen_audio_id=self.tok.id("gen_audio"), audio_patch_id=self.tok.id("audio_patch"),
                            max_text_tokens=max_text_tokens, max_patches=max_patches, sampler=sampler,
                            min_steps=min_steps, stop_threshold=stop_threshold, pad_id=self.tok.id("eos"))
        spp = self.cfg.patch_size * self.cfg.vae.hop
        out = []
        for i in range(n):
            raw = self.tok.decode(res.tokens[i, : res.n[i]].tolist(), skip_special_tokens=False)
            parsed = text.parse_edit_output(raw)
            out.append(EditOutput(self.tok.decode(res.tokens[i, : res.n[i]].tolist()), parsed.get("transcript"),
                                  res.waves[i, : res.counts[i] * spp], parsed.get("markup")))
        return out
