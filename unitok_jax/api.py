"""The request-level Python API: load a converted checkpoint once, then run TTS, ASR, editing and reconstruction on
lists of inputs. Inputs are waveforms (float arrays at 16 kHz) or audio file paths; outputs are numpy arrays and
text.

  from unitok_jax import UniAudio
  m = UniAudio.load("ckpt/")
  waves = m.tts(["Hello there."], prompt_wavs=["voice.wav"], prompt_texts=["The voice prompt's words."])
  texts = m.asr(["speech.flac"])

On a device mesh (a GPU node, a TPU slice): ``UniAudio.load("ckpt/", mesh="data=2,fsdp=2,expert=2",
dtype="bfloat16")`` restores every parameter straight into its sharding (no device or host holds the whole model;
see :func:`unitok_jax.sharding.uniaudio_shardings`) and every call runs SPMD on the mesh (the batch split over
``data`` x ``fsdp``, the MoE expert-parallel). ``mesh`` is a :class:`jax.sharding.Mesh`, a preset name of
:data:`unitok_jax.sharding.MESH_PRESETS`, ``"axis=size,..."`` or a dict of axis sizes (one may be -1: the rest).

Bad input never reaches the model: every batch call checks each input first and raises :class:`InputError` (a
``ValueError``) whose ``index`` is the position of the bad input and whose message names it and what was wrong
(unreadable file, wrong shape, NaN/inf samples, audio shorter than one 0.1 s patch, empty or un-encodable text, a
reserved placeholder token in the text, a request longer than the model's positions). Integer PCM arrays are scaled
to [-1, 1) (int16 ``k`` -> ``k / 32768``); files of any rate and channel count are resampled and downmixed
(:func:`unitok_jax.audio.load_audio`). Generated audio is always finite: non-finite samples (a numerical fault)
are replaced (NaN -> 0, +-inf -> +-1) and reported with a :class:`NonFiniteAudioWarning`.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from unitok_jax import generate, shapes, text, vae
from unitok_jax import sharding as shd
from unitok_jax.audio import AudioError, load_audio
from unitok_jax.model import UniAudioConfig

Audio = Union[str, os.PathLike, np.ndarray]


# placeholder ids the model fills with audio: in user text they would misalign the audio splice
RESERVED_TOKENS = ("audio_patch", "gen_audio_patch", "frame_patch", "image_patch")
# Inputs longer than this many latent frames (30 s at the release's 50 Hz) are encoded chunk by chunk with the
# encoder's KV cache (:func:`unitok_jax.vae.encode_chunked`, the same result): whole-sequence attention would hold a
# [B, heads, T, T] score array (e.g. 8 GB for two 16-s inputs of a 400-frames/s test model).
ENCODE_CHUNK_FRAMES = 1500


class InputError(ValueError):
    """One input of a batch call cannot be used. ``index``: its position in the call's lists; the message starts
    with ``input <index>:`` and says what was wrong."""

    def __init__(self, index: int, what: str):
        self.index, self.what = int(index), what
        super().__init__(f"input {index}: {what}")


class NonFiniteAudioWarning(RuntimeWarning):
    """Generated audio held NaN/inf samples (replaced: NaN -> 0, +-inf -> +-1). ``index``: the output's position,
    ``count``: how many samples were replaced."""

    def __init__(self, index: int, count: int, what: str = "generated audio"):
        self.index, self.count = int(index), int(count)
        super().__init__(f"output {index}: {count} non-finite sample(s) in the {what} (a numerical fault) "
                         f"replaced: NaN -> 0, +-inf -> +-1")


def finite_audio(wave: np.ndarray, index: int = 0, what: str = "generated audio") -> np.ndarray:
    """``wave`` as float32 with NaN -> 0 and +-inf -> +-1; warns :class:`NonFiniteAudioWarning` if any were found."""
    w = np.asarray(wave, np.float32)
    bad = int(w.size - np.count_nonzero(np.isfinite(w)))
    if bad:
        warnings.warn(NonFiniteAudioWarning(index, bad, what), stacklevel=3)
        w = np.nan_to_num(w, nan=0.0, posinf=1.0, neginf=-1.0)
    return w


@dataclasses.dataclass
class EditOutput:
    text: str  # the model's text (special tokens stripped)
    target_transcript: Optional[str]  # the <cot_text> transcript of a semantic edit, if any
    wave: np.ndarray  # edited speech (empty if the model produced no audio)
    markup: Optional[str] = None  # the raw <cot_text> content, <edit>…</edit> spans kept (None: no <cot_text>)


def as_mesh(mesh) -> Optional[jax.sharding.Mesh]:
    """``None``, a Mesh, a preset name / ``"axis=size,..."`` string, or a dict of axis sizes -> a Mesh over this
    process's devices (or None). Bad specs raise ``ValueError`` naming what was wrong."""
    if mesh is None or isinstance(mesh, jax.sharding.Mesh):
        return mesh
    sizes = shd.parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
    return shd.make_mesh({"mesh": sizes}, devices=jax.local_devices())


class UniAudio:
    """A loaded Ming-UniAudio model (config, params on device or sharded over a mesh, text tokenizer)."""

    def __init__(self, cfg: UniAudioConfig, params, tokenizer: "text.TextTokenizer", *, mesh=None, rules=None):
        """``params``: host or device arrays; with ``mesh`` they are placed into their shardings (a no-op for arrays
        already there, as :meth:`load` returns them)."""
        self.cfg = cfg
        self.mesh = as_mesh(mesh)
        self.rules = tuple(rules) if rules is not None else shd.DEFAULT_RULES
        if self.mesh is not None:
            params = jax.device_put(params, shd.uniaudio_shardings(cfg, jax.eval_shape(lambda: params), self.mesh,
                                                                   self.rules))
        self.params = params
        self.tok = tokenizer

    @classmethod
    def load(cls, path: str, *, mesh=None, dtype=None, rules=None) -> "UniAudio":
        """A checkpoint written by ``python -m unitok_jax.convert`` from a full model folder (with its
        ``tokenizer.json``). ``mesh``: restore each parameter straight into its sharding on that mesh (see
        :func:`as_mesh`) and run every call on it; ``rules``: the logical-axis rules (default
        :data:`unitok_jax.sharding.DEFAULT_RULES`); ``dtype`` (e.g. ``"bfloat16"``): cast the compute parameters
        on restore (norms and the MoE router stay float32); None keeps the stored dtype."""
        from unitok_jax.convert import ConversionError, load

        mesh = as_mesh(mesh)
        ckpt = load(path, mesh=mesh, rules=rules, dtype=dtype)
        if "uniaudio" not in ckpt.configs:
            raise ConversionError(f"{path} holds only an AudioVAE; TTS/ASR/edit need a full Ming-UniAudio checkpoint")
        params = ckpt.params["uniaudio"] if mesh is not None else jax.device_put(ckpt.params["uniaudio"])
        return cls(ckpt.configs["uniaudio"], params, text.TextTokenizer.from_dir(path), mesh=mesh, rules=rules)

    def _where(self) -> dict:
        """Where the generation calls run (``mesh`` / ``rules`` keyword arguments)."""
        return {"mesh": self.mesh, "rules": self.rules}

    def _on_mesh(self):
        return generate._Mesh.of(self.mesh, self.rules).context()

    # ----------------------------------------------------------------------------------------------- audio

    @property
    def sample_rate(self) -> int:
        return self.cfg.vae.sample_rate

    def _wave(self, a: Audio, index: int = 0) -> np.ndarray:
        """A file path (any format / rate / channels, see :func:`load_audio`) or a mono array at the model rate ->
        float32 [L]; :class:`InputError` naming input ``index`` otherwise."""
        if isinstance(a, (str, os.PathLike)):
            try:
                return load_audio(a, self.sample_rate)
            except AudioError as e:
                raise InputError(index, str(e)) from None
        try:
            w = np.asarray(a)
        except (TypeError, ValueError) as e:
            raise InputError(index, f"not an audio array or file path ({e})") from None
        if w.dtype == np.float32 and w.ndim == 1 and w.size and np.isfinite(w).all():
            return w  # already checked (the common case)
        if np.issubdtype(w.dtype, np.integer) and w.dtype.itemsize > 1:  # integer PCM: k / 2^(bits - 1)
            w = w.astype(np.float32) / float(2 ** (8 * w.dtype.itemsize - 1))
        elif not (np.issubdtype(w.dtype, np.floating) or w.dtype.kind in "iu"):
            raise InputError(index, f"audio array of dtype {w.dtype}: expected float samples or integer PCM")
        w = np.asarray(w, np.float32)
        if w.ndim != 1:
            raise InputError(index, f"audio array of shape {w.shape}: expected mono [samples] at {self.sample_rate} "
                                    f"Hz (downmix first, or pass the file path: files are downmixed and resampled)")
        if w.size == 0:
            raise InputError(index, "audio array is empty")
        finite = np.isfinite(w)
        if not finite.all():
            raise InputError(index, f"audio array holds {int((~finite).sum())} non-finite sample(s) (NaN/inf), the "
                                    f"first at sample {int(np.argmin(finite))}")
        return w

    def _waves(self, wavs: Sequence[Audio], what: str) -> list[np.ndarray]:
        """Every input loaded and at least one whole patch long (shorter audio carries no patch for the LLM)."""
        waves = [self._wave(w, i) for i, w in enumerate(wavs)]
        need = self.cfg.patch_size * self.cfg.vae.hop
        for i, w in enumerate(waves):
            if len(w) < need:
                raise InputError(i, f"{what} of {len(w) / self.sample_rate:.3f} s is shorter than one patch "
                                    f"({need / self.sample_rate:.3f} s, {need} samples)")
        return waves

    def _patch_counts(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """Whole patches of each waveform's latents (what :meth:`_patched` will keep), without encoding."""
        return np.array([vae.num_frames(len(w), self.cfg.vae.hop) // self.cfg.patch_size for w in waves], np.int32)

    def _text(self, s, what: str, index: int, *, allow_empty: bool = False) -> str:
        if not isinstance(s, str):
            raise InputError(index, f"{what} must be a str, got {type(s).__name__}")
        if not allow_empty and not s.strip():
            raise InputError(index, f"{what} is empty")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(index, f"{what} holds a character that is not valid Unicode ({e.reason} at position "
                                    f"{e.start})") from None
        for name in RESERVED_TOKENS:
            t = text.SPECIAL_TOKENS[name]
            if t in s:
                raise InputError(index, f"{what} contains the reserved placeholder token {t!r}")
        return s

    def _check_positions(self, ids: Sequence[Sequence[int]], extra: Sequence[int], what: str) -> None:
        """Prompt tokens + the generation budget of each request must fit the model's positions."""
        limit = self.cfg.llm.max_position_embeddings
        for i, (x, e) in enumerate(zip(ids, extra)):
            if len(x) + int(e) > limit:
                raise InputError(i, f"{len(x)} prompt tokens + {int(e)} to generate exceed the model's "
                                    f"{limit} positions ({what})")

    def encode(self, wavs: Sequence[Audio], key, *, sample: bool = True,
               request_ids: Optional[Sequence[int]] = None) -> list[np.ndarray]:
        """Latents [T_i, C] per input (posterior sample by default, as the reference does for its inputs). The
        posterior noise of row i is drawn from ``fold_in(key, request_ids[i])`` at that row's own length, so an
        input encodes the same whatever else is in its batch."""
        waves = [self._wave(w, i) for i, w in enumerate(wavs)]
        hop, c = self.cfg.vae.hop, self.cfg.vae.latent_dim
        batch, lengths = shapes.pad_waves(waves, hop)
        frames = batch.shape[1] // hop
        noise = None
        if sample:
            ids = range(len(waves)) if request_ids is None else request_ids
            noise = np.zeros((len(waves), frames, c), np.float32)
            for i, rid in enumerate(ids):
                t = vae.num_frames(int(lengths[i]), hop)
                noise[i, :t] = np.asarray(jax.random.normal(jax.random.fold_in(key, int(rid)), (t, c)))
            noise = jnp.asarray(noise)
        with self._on_mesh():
            if frames > ENCODE_CHUNK_FRAMES:  # long inputs: attention memory linear, not quadratic, in the length
                enc = vae.encode_chunked(self.params["audio"], self.cfg.vae, jnp.asarray(batch), jnp.asarray(lengths),
                                         chunk_frames=ENCODE_CHUNK_FRAMES, noise=noise, sample=sample)
            else:
                enc = vae.encode(self.params["audio"], self.cfg.vae, jnp.asarray(batch), jnp.asarray(lengths),
                                 noise=noise, sample=sample)
        lat, n = np.asarray(enc.latent), np.asarray(enc.frame_num)
        return [lat[i, : n[i]] for i in range(len(waves))]

    def _patched(self, latents: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Whole patches only (the trailing T mod p frames are dropped, as the reference does): padded latents and
        patch counts."""
        p = self.cfg.patch_size
        counts = np.array([len(z) // p for z in latents], np.int32)
        cut = [z[: c * p] if c else np.zeros((0, self.cfg.vae.latent_dim), np.float32) for z, c in zip(latents, counts)]
        padded, _ = shapes.pad_sequences(cut, dtype=np.float32)
        return padded, counts

    def reconstruct(self, wavs: Sequence[Audio]) -> list[np.ndarray]:
        """Encode (posterior mean) and decode each input."""
        lat = self.encode(wavs, None, sample=False)
        padded, lengths = shapes.pad_sequences(lat, dtype=np.float32)
        with self._on_mesh():
            out = np.asarray(vae.decode(self.params["audio"], self.cfg.vae, jnp.asarray(padded),
                                        jnp.asarray(lengths)))
        return [finite_audio(out[i, : lengths[i] * self.cfg.vae.hop], i, "reconstruction") for i in range(len(lat))]

    # ----------------------------------------------------------------------------------------------- tasks

    def tts(self, texts: Sequence[str], prompt_wavs: Optional[Sequence[Audio]] = None,
            prompt_texts: Optional[Sequence[str]] = None, *, seed: int = 0, max_patches: Optional[int] = None,
            sampler: generate.Sampler = generate.Sampler(), min_steps: int = 16, stop_threshold: float = 0.5,
            request_ids: Optional[Sequence[int]] = None, slots: Optional[int] = None,
            rounds: int = 16) -> list[np.ndarray]:
        """Speech for each text, in the voice of its prompt (spec §1.3). The patch budget per text follows the
        reference formula with a floor (:func:`unitok_jax.text.tts_patch_budget`), capped by ``max_patches``.
        ``slots``: run a list longer than this with continuous batching on ``slots`` rows (finished rows are
        refilled every ``rounds`` loop steps at most; the outputs are the same as one static batch: see
        :func:`unitok_jax.generate.tts`)."""
        n = len(texts)
        texts = [self._text(t, "TTS text", i) for i, t in enumerate(texts)]
        prompt_texts = list(prompt_texts) if prompt_texts is not None else [""] * n
        prompt_texts = [self._text(t, "prompt text", i, allow_empty=True) for i, t in enumerate(prompt_texts)]
        key = jax.random.key(seed)
        k_enc, k_gen = jax.random.split(key)
        if prompt_wavs is not None:
            prompt_wavs = self._waves(prompt_wavs, "the voice prompt")
            counts = self._patch_counts(prompt_wavs)
        else:
            counts = np.zeros((n,), np.int32)

        def prompts(counts):
            return [text.tts_prompt(self.tok, t, pt, int(c)) for t, pt, c in zip(texts, prompt_texts, counts)]

        ids = prompts(counts)
        budgets = np.array([text.tts_patch_budget(t, maximum=max_patches) for t in texts], np.int32)
        self._check_positions(ids, budgets, "text or voice prompt too long? cap the output with max_patches")
        if prompt_wavs is not None:
            lat, got = self._patched(self.encode(prompt_wavs, k_enc, request_ids=request_ids))
            ids = ids if np.array_equal(got, counts) else prompts(got)
            counts = got
        else:
            lat = np.zeros((n, self.cfg.patch_size, self.cfg.vae.latent_dim), np.float32)
        ids_p, lengths = shapes.pad_sequences(ids, dtype=np.int32)
        res = generate.tts(self.params, self.cfg, ids_p, lengths, lat, counts, budgets, k_gen,
                           request_ids=request_ids, sampler=sampler, min_steps=min_steps,
                           stop_threshold=stop_threshold, slots=slots, rounds=rounds, **self._where())
        spp = self.cfg.patch_size * self.cfg.vae.hop
        return [finite_audio(res.waves[i, : res.counts[i] * spp], i) for i in range(n)]

    def asr(self, wavs: Sequence[Audio], context: Optional[Sequence[Optional[Sequence[str]]]] = None, *,
            seed: int = 0, max_new_tokens: int = 128, with_language: bool = False,
            request_ids: Optional[Sequence[int]] = None, slots: Optional[int] = None, rounds: int = 16):
        """Transcripts (spec §1.2). ``context``: optional hot words per input. ``with_language``: return
        (language, transcript) pairs. ``request_ids``: the posterior noise of input i comes from its id (default:
        its position), so an input transcribes the same whatever else is in the call. ``slots`` / ``rounds``: as
        :meth:`tts`."""
        wavs = self._waves(wavs, "audio")
        context = list(context) if context is not None else [None] * len(wavs)
        for i, cw in enumerate(context):
            for w in ([cw] if isinstance(cw, str) else cw or []):
                self._text(w, "context word", i, allow_empty=True)
        est = [text.asr_prompt(self.tok, int(c), context_words=cw)[0]
               for c, cw in zip(self._patch_counts(wavs), context)]
        self._check_positions(est, [max_new_tokens] * len(est), "audio too long?")
        lat, counts = self._patched(self.encode(wavs, jax.random.key(seed), request_ids=request_ids))
        ids = [text.asr_prompt(self.tok, int(c), context_words=cw)[0] for c, cw in zip(counts, context)]
        ids_p, lengths = shapes.pad_sequences(ids, dtype=np.int32)
        res = generate.asr(self.params, self.cfg, ids_p, lengths, lat, counts, eos_id=self.tok.id("eos"),
                           audio_patch_id=self.tok.id("audio_patch"), max_new_tokens=max_new_tokens,
                           pad_id=self.tok.id("eos"), slots=slots, rounds=rounds, **self._where())
        out = []
        for i in range(len(lat)):
            lang, transcript = text.parse_asr_output(self.tok.decode(res.tokens[i, : res.n[i]].tolist()))
            out.append((lang, transcript) if with_language else transcript)
        return out

    def edit(self, wavs: Sequence[Audio], instructions: Sequence[str], *, semantic: Union[bool, Sequence[bool]] = False,
             seed: int = 0, max_text_tokens: int = 128, max_patches: int = 256,
             sampler: generate.Sampler = generate.Sampler(), min_steps: int = 16,
             stop_threshold: float = 0.5, request_ids: Optional[Sequence[int]] = None, slots: Optional[int] = None,
             rounds: int = 16) -> list[EditOutput]:
        """Free-form edits (spec §1.4): ``semantic`` (per input or for all) appends ``<answer>`` so the model
        writes the edited transcript first, as the reference does for insert / delete / substitute edits.
        ``request_ids``: as :meth:`tts` (input i's randomness from its id, default its position); ``slots`` /
        ``rounds``: as :meth:`tts`."""
        n = len(wavs)
        sem = [semantic] * n if isinstance(semantic, bool) else list(semantic)
        instructions = [self._text(s, "instruction", i) for i, s in enumerate(instructions)]
        wavs = self._waves(wavs, "audio")
        key = jax.random.key(seed)
        k_enc, k_gen = jax.random.split(key)
        est = [text.edit_prompt(self.tok, int(c), ins, semantic=s)[0]
               for c, ins, s in zip(self._patch_counts(wavs), instructions, sem)]
        self._check_positions(est, [max_text_tokens + max_patches] * n, "audio too long?")
        lat, counts = self._patched(self.encode(wavs, k_enc, request_ids=request_ids))
        ids = [text.edit_prompt(self.tok, int(c), ins, semantic=s)[0] for c, ins, s in zip(counts, instructions, sem)]
        ids_p, lengths = shapes.pad_sequences(ids, dtype=np.int32)
        res = generate.edit(self.params, self.cfg, ids_p, lengths, lat, counts, k_gen, eos_id=self.tok.id("eos"),
                            gen_audio_id=self.tok.id("gen_audio"), audio_patch_id=self.tok.id("audio_patch"),
                            max_text_tokens=max_text_tokens, max_patches=max_patches, sampler=sampler,
                            min_steps=min_steps, stop_threshold=stop_threshold, pad_id=self.tok.id("eos"),
                            request_ids=request_ids, slots=slots, rounds=rounds, **self._where())
        spp = self.cfg.patch_size * self.cfg.vae.hop
        out = []
        for i in range(n):
            raw = self.tok.decode(res.tokens[i, : res.n[i]].tolist(), skip_special_tokens=False)
            parsed = text.parse_edit_output(raw)
            out.append(EditOutput(self.tok.decode(res.tokens[i, : res.n[i]].tolist()), parsed.get("transcript"),
                                  res.waves[i, : res.counts[i] * spp], parsed.get("markup")))
        for i, o in enumerate(out):
            o.wave = finite_audio(o.wave, i)
        return out
