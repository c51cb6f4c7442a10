"""Speech evaluation metrics: plain numpy functions on mono float waveforms (16 kHz unless ``sr`` says otherwise).

Waveform metrics take ``(reference, generated)`` in that order and never modify their inputs. Where a metric
compares two signals sample by sample (PESQ, STOI, log-mel distance, SI-SDR) a length mismatch is handled by
trimming both to the shorter one; metrics that align in time (MCD-DTW) use the full signals.

VAE reconstruction
  * :func:`pesq_wb` -- ITU-T P.862.2 wideband PESQ (MOS-LQO, about 1.0 .. 4.64; ``pesq`` package, 16 kHz).
  * :func:`stoi` -- short-time objective intelligibility (0 .. 1; ``pystoi``).
  * :func:`log_mel_distance` -- mean absolute difference (L1) of natural-log mel power spectrograms, 80 mels,
    1024-point FFT / window, hop 256, 0 .. sr/2 Hz, floor 1e-5 (:data:`LOG_MEL`). 0 for identical signals.
  * :func:`si_sdr` -- scale-invariant signal-to-distortion ratio in dB (both signals made zero-mean).

TTS
  * :func:`mcd_dtw` -- mel-cepstral distortion in dB after dynamic time warping. Mel-cepstra (:data:`MCEP`):
    cosine-series coefficients of the natural-log mel *amplitude* spectrum (80 mels, 1024-point FFT, 25 ms
    window, 10 ms hop; DCT-II / (2 * 80)), c1..c24 (c0, the energy term, is excluded). Leading and trailing silence (40 dB
    below the peak) is trimmed first. The two cepstrum sequences are aligned with ``librosa.sequence.dtw``
    (Euclidean cost) and MCD = mean over the warping path of ``10 / ln 10 * sqrt(2 * sum_d (c_d - c'_d)^2)``.
    These are filterbank mel-cepstra, not SPTK/WORLD all-pass mel-cepstra: compare systems with each other (and
    with the copy-the-prompt baseline), not with absolute MCD values from papers.
  * :func:`duration_error` -- generated vs reference speech duration (seconds, after the same silence trim):
    signed and absolute error in seconds, and the absolute error relative to the reference.
  * :func:`copy_prompt_baseline` -- MCD-DTW of the *prompt* audio against the reference: what a system scores by
    returning its voice prompt unchanged (right voice, wrong words) -- the target to beat.

ASR
  * :func:`normalize_text` then :func:`error_rates` (``jiwer``): word and character error rates.
    Normalisation: Unicode NFKC, lowercase, apostrophes inside words removed (``don't`` -> ``dont``), every other
    Unicode punctuation character (category P*) replaced by a space, whitespace collapsed to single spaces and
    stripped. CER counts characters of the normalised text, single spaces between words included.

Voice-prompt fidelity (a proxy, not a trained speaker verifier)
  * :func:`speaker_embedding` -- mean and standard deviation over speech frames (within 40 dB of the loudest
    frame) of MFCCs c1..c19 (natural-log mel power, 80 mels, 1024 FFT, hop 256); c0 (loudness) excluded, so the
    embedding is gain-invariant. :func:`speaker_similarity` -- cosine similarity of the generated speech to the
    prompt voice and to other voices, and whether the prompt voice ranks first.

Editing (spec §1.4, §8; pairs of :mod:`unitok_jax.data.build_edit_corpus`)
  * :func:`render_markup` then :func:`error_rates`: CER / WER of the model's ``<cot_text>`` against the intended
    ``target_markup``. Each ``<edit>…</edit>`` span becomes one word before normalisation -- ``editmask`` when it
    holds ``<framePatch>`` (new content), ``editdelete`` when it is empty (a deletion), else the words written in
    it -- and other special tokens are removed, so a chain that leaves the mark out or puts it in the wrong place
    costs word errors (a plain copy of the source transcript is not a correct insertion).
  * MCD-DTW (:func:`mcd_dtw`) of the edited speech against the target rendering, and the do-nothing baseline: the
    source against the target.
  * Acoustic edits: whether the measured property moved the right way relative to the source, by more than a dead
    zone (:data:`EDIT_PROPERTIES`): speech duration (silence trimmed) for faster / slower (by > 5 %),
    :func:`rms_db` for louder / quieter (> 1 dB), :func:`snr_estimate_db` for add_noise / denoise (> 2 dB), and the
    speaker proxy for voice (cosine to the target voice above the cosine to the source voice). ``progress`` is
    the fraction of the intended change achieved: ``(edited - source) / (target - source)`` (on log durations for
    rate), 1 = as much as the target rendering, 0 = unchanged, negative = the wrong way.
  * :func:`evaluate_edit` -- all of it per item, per edit type and overall.

Plots: :func:`plot_mel_comparison` writes a PNG with generated and reference log-mel spectrograms side by side.

In-memory evaluation (what ``python -m unitok_jax.eval`` runs after loading files): :func:`evaluate_vae`,
:func:`evaluate_tts`, :func:`evaluate_asr`, :func:`evaluate_edit`, each returning ``{"rows": [...], "mean": {...}, "count", "scored"}``
with one row per item (``None`` where a metric could not be computed, ``"error"`` when the item failed).

``pesq``, ``pystoi`` and ``jiwer`` (the ``eval`` extra) are imported only by the functions that need them;
when missing they raise :class:`EvalDependencyError` saying ``pip install 'unitok-jax[eval]'``.
"""
from __future__ import annotations

import importlib
import math
import re
import unicodedata
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from unitok_jax.io import atomic_file

SAMPLE_RATE = 16000
# log-mel distance and the mel plot
LOG_MEL = dict(n_fft=1024, win_length=1024, hop_length=256, n_mels=80, fmin=0.0, fmax=None, floor=1e-5)
# mel-cepstra for MCD: c1..c24 of the natural-log mel amplitude spectrum
MCEP = dict(n_fft=1024, win_length=400, hop_length=160, n_mels=80, n_coeffs=24, floor=1e-5)
# speaker-embedding proxy: MFCC c1..c19 of the natural-log mel power spectrum
SPEAKER = dict(n_fft=1024, hop_length=256, n_mels=80, n_coeffs=19, floor=1e-10, speech_db=40.0)
TRIM_DB = 40.0
MCD_CONST = 10.0 / math.log(10.0) * math.sqrt(2.0)


class EvalDependencyError(ImportError):
    """An optional evaluation dependency (``pesq``, ``pystoi``, ``jiwer``) is not installed."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EvalDependencyError(f"the {module!r} package is needed for this metric; install the evaluation "
                                  f"extra: pip install 'unitok-jax[eval]'") from e


def _wave(x, name: str = "waveform") -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D mono waveform, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or inf samples")
    return a


def trim_to_shorter(reference, generated) -> tuple[np.ndarray, np.ndarray]:
    """Both waveforms (float64) cut to the shorter length."""
    r, g = _wave(reference, "reference"), _wave(generated, "generated")
    n = min(r.size, g.size)
    return r[:n], g[:n]


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return x
    import librosa

    return librosa.resample(x, orig_sr=sr, target_sr=target, res_type="soxr_hq")


def trim_silence(x, top_db: Optional[float] = TRIM_DB) -> np.ndarray:
    """Leading and trailing samples more than ``top_db`` below the peak removed (``None``: unchanged).
    An all-silent signal is returned unchanged."""
    x = _wave(x)
    if top_db is None:
        return x
    import librosa

    y, _ = librosa.effects.trim(x, top_db=top_db, frame_length=1024, hop_length=256)
    return y if y.size else x


# ------------------------------------------------------------------------------------------ VAE reconstruction


def pesq_wb(reference, generated, sr: int = SAMPLE_RATE) -> float:
    """Wideband PESQ (P.862.2) of ``generated`` against ``reference``; NaN if PESQ finds no speech.

    Signals at another rate are resampled to 16 kHz (wideband PESQ is defined at 16 kHz only)."""
    pesq = _require("pesq")
    r, g = trim_to_shorter(reference, generated)
    r, g = _resample(r, sr, 16000), _resample(g, sr, 16000)
    if not np.any(r) or not np.any(g):
        return float("nan")  # digital silence: no utterance to score (and pesq would divide by zero)
    try:
        return float(pesq.pesq(16000, r, g, "wb"))
    except pesq.PesqError:  # no utterances detected, buffer too short
        return float("nan")


def stoi(reference, generated, sr: int = SAMPLE_RATE, extended: bool = False) -> float:
    """STOI (or extended STOI with ``extended=True``), 0..1, higher is more intelligible."""
    pystoi = _require("pystoi")
    r, g = trim_to_shorter(reference, generated)
    return float(pystoi.stoi(r, g, sr, extended=extended))


def log_mel(x, sr: int = SAMPLE_RATE, **overrides) -> np.ndarray:
    """Natural-log mel power spectrogram ``[n_mels, frames]`` with the :data:`LOG_MEL` settings."""
    import librosa

    p = {**LOG_MEL, **overrides}
    S = librosa.feature.melspectrogram(y=_wave(x), sr=sr, n_fft=p["n_fft"], win_length=p["win_length"],
                                       hop_length=p["hop_length"], n_mels=p["n_mels"], fmin=p["fmin"],
                                       fmax=p["fmax"], power=2.0)
    return np.log(np.maximum(S, p["floor"]))


def log_mel_distance(reference, generated, sr: int = SAMPLE_RATE) -> float:
    """Mean absolute difference (L1) between the natural-log mel spectrograms (:data:`LOG_MEL`) of the two
    signals after trimming them to the shorter length. 0 for identical signals; lower is better."""
    r, g = trim_to_shorter(reference, generated)
    return float(np.mean(np.abs(log_mel(r, sr) - log_mel(g, sr))))


def si_sdr(reference, generated, eps: float = 1e-10) -> float:
    """Scale-invariant SDR in dB (Le Roux et al. 2019) after removing the means; higher is better.

    ``generated`` is projected onto ``reference``: target = a * ref with a = <gen, ref> / <ref, ref>;
    SI-SDR = 10 log10(|target|^2 / |gen - target|^2). Identical signals give a very large value (~100+ dB)."""
    r, g = trim_to_shorter(reference, generated)
    r, g = r - r.mean(), g - g.mean()
    a = float(np.dot(g, r) / (np.dot(r, r) + eps))
    target = a * r
    noise = g - target
    return float(10.0 * np.log10((np.dot(target, target) + eps) / (np.dot(noise, noise) + eps)))


# --------------------------------------------------------------------------------------------------------- TTS


def mel_cepstrum(x, sr: int = SAMPLE_RATE, **overrides) -> np.ndarray:
    """Mel-cepstra ``[n_coeffs, frames]``: c1..cD of the natural-log mel amplitude spectrum (:data:`MCEP`), scaled
    as cepstral coefficients (``log A(w) = c0 + 2 sum_k c_k cos(k w)`` over the mel-warped axis, i.e. the DCT-II
    divided by ``2 * n_mels``); c0 is dropped."""
    import librosa
    import scipy.fft

    p = {**MCEP, **overrides}
    S = librosa.feature.melspectrogram(y=_wave(x), sr=sr, n_fft=p["n_fft"], win_length=p["win_length"],
                                       hop_length=p["hop_length"], n_mels=p["n_mels"], power=1.0)
    # log A(w) = c0 + 2 sum_k c_k cos(k w) on the mel-warped axis sampled at the n_mels band centres:
    # c_k = (1 / n_mels) sum_n log A_n cos(pi k (n + 1/2) / n_mels) = unnormalised DCT-II / (2 n_mels)
    c = scipy.fft.dct(np.log(np.maximum(S, p["floor"])), type=2, axis=0) / (2.0 * p["n_mels"])
    return c[1 : p["n_coeffs"] + 1]


def mcd_dtw(reference, generated, sr: int = SAMPLE_RATE, trim_db: Optional[float] = TRIM_DB,
            details: bool = False):
    """Mel-cepstral distortion (dB) between ``generated`` and ``reference`` after DTW alignment.

    ``10 / ln 10 * sqrt(2 * sum_{d=1..24} (c_d - c'_d)^2)`` averaged over the DTW path (``librosa.sequence.dtw``,
    Euclidean cost on the cepstra, :func:`mel_cepstrum`). Leading/trailing silence more than ``trim_db`` below
    the peak is trimmed first (``None`` keeps it). 0 for identical signals; lower is better (same-speaker
    recordings of different words score a few dB; compare with :func:`copy_prompt_baseline`).

    Returns a float, or with ``details=True`` a dict ``{"mcd", "frames_reference", "frames_generated",
    "path_length"}``."""
    import librosa

    cr = mel_cepstrum(trim_silence(reference, trim_db), sr)
    cg = mel_cepstrum(trim_silence(generated, trim_db), sr)
    _, wp = librosa.sequence.dtw(X=cr, Y=cg, metric="euclidean")
    diff = cr[:, wp[:, 0]] - cg[:, wp[:, 1]]
    mcd = float(np.mean(MCD_CONST * np.sqrt(np.sum(diff * diff, axis=0))))
    if not details:
        return mcd
    return {"mcd": mcd, "frames_reference": int(cr.shape[1]), "frames_generated": int(cg.shape[1]),
            "path_length": int(wp.shape[0])}


def copy_prompt_baseline(prompt, reference, sr: int = SAMPLE_RATE, trim_db: Optional[float] = TRIM_DB) -> float:
    """MCD-DTW of the voice prompt itself against the reference rendering: the score of a "system" that returns
    its prompt unchanged (right voice, wrong words). A TTS output should score lower (better) than this."""
    return mcd_dtw(reference, prompt, sr, trim_db=trim_db)


def duration_error(reference, generated, sr: int = SAMPLE_RATE, trim_db: Optional[float] = TRIM_DB) -> dict:
    """Duration of generated vs reference speech, after trimming leading/trailing silence (``trim_db``; None
    keeps it). Returns ``{"reference_seconds", "generated_seconds", "error_seconds"`` (generated - reference),
    ``"abs_error_seconds", "rel_error"`` (absolute error / reference duration)``}``."""
    dr = trim_silence(reference, trim_db).size / sr
    dg = trim_silence(generated, trim_db).size / sr
    return {"reference_seconds": dr, "generated_seconds": dg, "error_seconds": dg - dr,
            "abs_error_seconds": abs(dg - dr), "rel_error": abs(dg - dr) / dr if dr > 0 else float("nan")}


# ---------------------------------------------------------------------------------------------------------- ASR

_INNER_APOSTROPHE = re.compile(r"(?<=\w)['\u2019\u02bc](?=\w)")


def normalize_text(text: str) -> str:
    """Lowercase, punctuation-free, single-spaced text for error rates (see the module docstring)."""
    s = unicodedata.normalize("NFKC", text).lower()
    s = _INNER_APOSTROPHE.sub("", s)
    s = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in s)
    return " ".join(s.split())


def error_rates(reference: str, hypothesis: str, normalize: bool = True) -> dict:
    """Word and character error rates of ``hypothesis`` against ``reference`` (``jiwer``), after
    :func:`normalize_text` (unless ``normalize=False``).

    Returns ``{"wer", "cer", "word_errors", "words", "substitutions", "deletions", "insertions", "char_errors",
    "chars", "reference", "hypothesis"}`` (the last two normalised). Rates are errors / reference length; with an
    empty (normalised) reference they are None (undefined) while the error counts (insertions) stay."""
    jiwer = _require("jiwer")
    ref = normalize_text(reference) if normalize else " ".join(reference.split())
    hyp = normalize_text(hypothesis) if normalize else " ".join(hypothesis.split())
    out = {"reference": ref, "hypothesis": hyp}
    if not ref:
        n_w, n_c = len(hyp.split()), len(hyp)
        return {**out, "wer": None, "cer": None, "word_errors": n_w, "words": 0, "substitutions": 0,
                "deletions": 0, "insertions": n_w, "char_errors": n_c, "chars": 0}
    w = jiwer.process_words(ref, hyp)
    c = jiwer.process_characters(ref, hyp)
    word_errors = w.substitutions + w.deletions + w.insertions
    char_errors = c.substitutions + c.deletions + c.insertions
    words, chars = len(ref.split()), len(ref)
    return {**out, "wer": word_errors / words, "cer": char_errors / chars, "word_errors": word_errors,
            "words": words, "substitutions": w.substitutions, "deletions": w.deletions,
            "insertions": w.insertions, "char_errors": char_errors, "chars": chars}


# ------------------------------------------------------------------------------------------- speaker proxy


def speaker_embedding(x, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Gain-invariant speaker-embedding proxy: ``[mean, std]`` over speech frames of MFCC c1..c19 (natural-log
    mel power, :data:`SPEAKER`); frames more than 40 dB below the loudest one are ignored. Shape ``[38]``."""
    import librosa
    import scipy.fft

    p = SPEAKER
    S = librosa.feature.melspectrogram(y=_wave(x), sr=sr, n_fft=p["n_fft"], hop_length=p["hop_length"],
                                       n_mels=p["n_mels"], power=2.0)
    c = scipy.fft.dct(np.log(np.maximum(S, p["floor"])), type=2, norm="ortho", axis=0)[1 : p["n_coeffs"] + 1]
    energy = 10.0 * np.log10(np.maximum(S.sum(axis=0), p["floor"]))
    speech = energy >= energy.max() - p["speech_db"]
    c = c[:, speech]
    return np.concatenate([c.mean(axis=1), c.std(axis=1)])


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _embedding(v, sr: int) -> np.ndarray:
    """An embedding from a waveform, a precomputed embedding (1-D, size 38), or a list of waveforms (averaged)."""
    if isinstance(v, (list, tuple)):
        return np.mean([_embedding(x, sr) for x in v], axis=0)
    a = np.asarray(v)
    if a.ndim == 1 and a.size == 2 * SPEAKER["n_coeffs"]:
        return a.astype(np.float64)
    return speaker_embedding(a, sr)


def speaker_similarity(generated, prompt, others: Sequence = (), sr: int = SAMPLE_RATE) -> dict:
    """Cosine similarity of the speaker-embedding proxy of ``generated`` to the prompt voice and to other voices.

    ``prompt`` and each of ``others`` is a waveform, a list of waveforms of one voice (embeddings averaged) or a
    precomputed :func:`speaker_embedding`. Returns ``{"similarity_prompt", "similarity_others"`` (mean over
    ``others``; None without others), ``"prompt_ranks_first"`` (prompt strictly more similar than every other
    voice; None without others), ``"rank"`` (1 = prompt voice is the most similar)``}``."""
    e = _embedding(generated, sr)
    sp = cosine(e, _embedding(prompt, sr))
    so = [cosine(e, _embedding(o, sr)) for o in others]
    return {"similarity_prompt": sp, "similarity_others": float(np.mean(so)) if so else None,
            "prompt_ranks_first": bool(all(sp > s for s in so)) if so else None,
            "rank": 1 + sum(s >= sp for s in so)}


# ------------------------------------------------------------------------------------------------------- plots


def plot_mel_comparison(generated, reference, path: str, sr: int = SAMPLE_RATE, title: Optional[str] = None,
                        labels: tuple[str, str] = ("generated", "reference")) -> str:
    """Write a PNG with the log-mel spectrograms (:data:`LOG_MEL`, shown in dB) of ``generated`` (left) and
    ``reference`` (right) on one colour scale. Uses the Agg canvas directly (no global backend change); the file
    is written atomically. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mels = [log_mel(x, sr) * (10.0 / math.log(10.0)) for x in (generated, reference)]  # ln power -> dB
    vmax = max(float(m.max()) for m in mels)
    vmin = vmax - 80.0
    hop = LOG_MEL["hop_length"]
    fig = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    im = None
    for ax, m, label in zip(axes, mels, labels):
        im = ax.imshow(m, origin="lower", aspect="auto", vmin=vmin, vmax=vmax, cmap="magma",
                       extent=(0, m.shape[1] * hop / sr, 0, m.shape[0]))
        ax.set_title(f"{label} ({m.shape[1] * hop / sr:.2f} s)")
        ax.set_xlabel("seconds")
    axes[0].set_ylabel("mel bin")
    fig.colorbar(im, ax=list(axes), label="dB")
    if title:
        fig.suptitle(title)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


# ------------------------------------------------------------------------------------------ evaluation API


def _finite(v):
    return v if v is None or not isinstance(v, float) or math.isfinite(v) else None


def summarize(rows: list[dict], keys: Iterable[str]) -> dict:
    """Mean of each key over the rows where it is a finite number (bools count as 0/1); None if there are none."""
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float)) and r.get(k) is not None
                and math.isfinite(float(r[k]))]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def _items(pairs) -> list:
    return list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)


VAE_KEYS = ("pesq", "stoi", "log_mel_l1", "si_sdr")


def evaluate_vae(pairs, sr: int = SAMPLE_RATE, metrics: Sequence[str] = VAE_KEYS) -> dict:
    """Reconstruction metrics per item and their means.

    ``pairs``: an iterable of ``(id, reference_wave, generated_wave)`` or a mapping ``id -> (reference,
    generated)``. ``metrics``: a subset of ``("pesq", "stoi", "log_mel_l1", "si_sdr")``. Rows:
    ``{"id", "reference_seconds", "generated_seconds", <metrics>}`` (a metric that cannot be computed is None,
    e.g. PESQ on silence); an item whose audio is unusable gets ``"error"``."""
    fns = {"pesq": lambda r, g: pesq_wb(r, g, sr), "stoi": lambda r, g: stoi(r, g, sr),
           "log_mel_l1": lambda r, g: log_mel_distance(r, g, sr), "si_sdr": lambda r, g: si_sdr(r, g)}
    unknown = set(metrics) - set(fns)
    if unknown:
        raise ValueError(f"unknown VAE metrics {sorted(unknown)}; choose from {list(fns)}")
    rows = []
    for item in _items(pairs):
        rid, (ref, gen) = (item[0], item[1]) if len(item) == 2 else (item[0], item[1:])
        row = {"id": str(rid)}
        try:
            r, g = _wave(ref, "reference"), _wave(gen, "generated")
            row.update(reference_seconds=r.size / sr, generated_seconds=g.size / sr)
            for k in metrics:
                row[k] = _finite(fns[k](r, g))
        except ValueError as e:
            row["error"] = str(e)
        rows.append(row)
    return _report(rows, list(metrics))


TTS_KEYS = ("mcd", "baseline_mcd", "duration_error_seconds", "duration_abs_error_seconds", "duration_rel_error",
            "speaker_similarity_prompt", "speaker_similarity_others", "speaker_top1", "speaker_similarity_reference")


def evaluate_tts(items: Iterable[Mapping], sr: int = SAMPLE_RATE, voices: Optional[Mapping] = None,
                 trim_db: Optional[float] = TRIM_DB) -> dict:
    """TTS metrics per item and their means.

    ``items``: mappings ``{"id", "generated": wave, "reference": wave, "prompt"?: wave, "voice"?: label}``.
    ``reference`` is the same sentence in the prompt voice (a recording or another rendering). With a
    ``prompt``: ``baseline_mcd`` (:func:`copy_prompt_baseline`) and the speaker proxy, comparing the generated
    speech with its own voice against every other voice. ``voices``: optional mapping ``label -> wave | [waves] |
    embedding`` of the candidate voices; by default they are the items' prompts grouped by ``voice`` label (an
    item without a label is its own voice ``"prompt:<id>"``; the same array object appearing several times in a
    voice counts once).

    Rows: ``{"id", "mcd", "baseline_mcd", "reference_seconds", "generated_seconds", "duration_error_seconds",
    "duration_abs_error_seconds", "duration_rel_error", "speaker_similarity_prompt", "speaker_similarity_others",
    "speaker_top1", "speaker_rank", "speaker_similarity_reference", "voice"}`` (None where not applicable)."""
    items = [dict(it) for it in items]
    emb_cache: dict[int, np.ndarray] = {}

    def emb(w) -> np.ndarray:
        if id(w) not in emb_cache:
            emb_cache[id(w)] = _embedding(w, sr)
        return emb_cache[id(w)]

    for it in items:
        if it.get("voice") is None and it.get("prompt") is not None:
            it["voice"] = f"prompt:{it['id']}"
    if voices is None:
        groups: dict[str, list] = {}
        for it in items:
            if it.get("prompt") is not None:
                g = groups.setdefault(str(it["voice"]), [])
                if all(x is not it["prompt"] for x in g):
                    g.append(it["prompt"])
        voice_emb = {}
        for label, waves in groups.items():
            try:
                voice_emb[label] = np.mean([emb(w) for w in waves], axis=0)
            except ValueError:
                pass  # an unusable prompt is reported on its item
    else:
        voice_emb = {str(k): _embedding(v, sr) for k, v in voices.items()}

    rows = []
    for it in items:
        row = {"id": str(it["id"])}
        try:
            ref, gen = _wave(it["reference"], "reference"), _wave(it["generated"], "generated")
            row["mcd"] = _finite(mcd_dtw(ref, gen, sr, trim_db=trim_db))
            d = duration_error(ref, gen, sr, trim_db)
            row.update(reference_seconds=d["reference_seconds"], generated_seconds=d["generated_seconds"],
                       duration_error_seconds=d["error_seconds"], duration_abs_error_seconds=d["abs_error_seconds"],
                       duration_rel_error=_finite(d["rel_error"]))
            row["speaker_similarity_reference"] = cosine(emb(it["generated"]), emb(it["reference"]))
            prompt = it.get("prompt")
            if prompt is not None:
                row["baseline_mcd"] = _finite(copy_prompt_baseline(_wave(prompt, "prompt"), ref, sr, trim_db))
                label = str(it["voice"])
                row["voice"] = label
                own = voice_emb.get(label, emb(prompt))
                others = [e for k, e in voice_emb.items() if k != label]
                s = speaker_similarity(emb(it["generated"]), own, others, sr)
                row.update(speaker_similarity_prompt=s["similarity_prompt"],
                           speaker_similarity_others=s["similarity_others"], speaker_top1=s["prompt_ranks_first"],
                           speaker_rank=s["rank"] if others else None)
        except ValueError as e:
            row["error"] = str(e)
        rows.append(row)
    return _report(rows, list(TTS_KEYS))


ASR_KEYS = ("wer", "cer")


def evaluate_asr(pairs, normalize: bool = True) -> dict:
    """Error rates per item, their means, and corpus rates.

    ``pairs``: an iterable of ``(id, reference_text, hypothesis_text)`` or a mapping ``id -> (reference,
    hypothesis)``. Rows are :func:`error_rates` dicts plus ``"id"``. ``"mean"`` averages the per-utterance
    rates; ``"corpus"`` is total errors / total reference words (characters) -- the usual headline number."""
    rows = []
    for item in _items(pairs):
        rid, (ref, hyp) = (item[0], item[1]) if len(item) == 2 else (item[0], item[1:])
        rows.append({"id": str(rid), **error_rates(ref, hyp, normalize)})
    out = _report(rows, list(ASR_KEYS))
    words, chars = sum(r["words"] for r in rows), sum(r["chars"] for r in rows)
    out["corpus"] = {"wer": sum(r["word_errors"] for r in rows) / words if words else None,
                     "cer": sum(r["char_errors"] for r in rows) / chars if chars else None,
                     "words": words, "chars": chars}
    return out


def _report(rows: list[dict], keys: list[str]) -> dict:
    ok = [r for r in rows if "error" not in r]
    return {"count": len(rows), "scored": len(ok), "mean": summarize(ok, keys), "rows": rows}


# ------------------------------------------------------------------------------------------------------- editing

# acoustic edit type -> (measured property, direction it must move relative to the source, dead zone)
EDIT_PROPERTIES: dict[str, tuple[str, int, float]] = {
    "faster": ("speech_seconds", -1, math.log(1.05)),  # dead zone on |ln(edited / source)|
    "slower": ("speech_seconds", +1, math.log(1.05)),
    "louder": ("rms_db", +1, 1.0),
    "quieter": ("rms_db", -1, 1.0),
    "voice": ("speaker", +1, 0.0),  # cosine(edited, target voice) - cosine(edited, source voice) > 0
    "add_noise": ("snr_estimate_db", -1, 2.0),
    "denoise": ("snr_estimate_db", +1, 2.0),
}
SEMANTIC_EDITS = ("delete", "insert", "substitute")
EDIT_MASK_WORD, EDIT_DELETE_WORD = "editmask", "editdelete"
# frame power percentiles for the SNR estimate: 25 ms frames, 10 ms hop, capped (digital silence)
SNR_ESTIMATE = dict(frame_length=400, hop_length=160, low=10.0, high=90.0, floor=1e-12, cap_db=60.0)


def rms_db(x, trim_db: Optional[float] = TRIM_DB) -> float:
    """Level in dB (re full scale 1.0) of the RMS of ``x`` after trimming leading / trailing silence
    (:func:`trim_silence`; the trim is relative to the peak, so a gain change moves this by exactly its dB)."""
    y = trim_silence(x, trim_db)
    return float(10.0 * np.log10(max(float(np.mean(y * y)), 1e-20)))


def snr_estimate_db(x) -> float:
    """Blind signal-to-noise estimate in dB: the 90th minus the 10th percentile of the frame power (dB) over 25 ms
    frames with a 10 ms hop (:data:`SNR_ESTIMATE`), at most 60 dB. Speech frames set the top, the quietest frames
    (pauses, weak phones) the noise floor: added background noise lowers it, denoising raises it. Gain-invariant."""
    import librosa

    p = SNR_ESTIMATE
    y = _wave(x)
    y = np.pad(y, (0, max(p["frame_length"] - y.size, 0)))
    frames = librosa.util.frame(y, frame_length=p["frame_length"], hop_length=p["hop_length"])
    power = 10.0 * np.log10(np.maximum(np.mean(frames * frames, axis=0), p["floor"]))
    return float(min(np.percentile(power, p["high"]) - np.percentile(power, p["low"]), p["cap_db"]))


def render_markup(markup: str) -> str:
    """An edit transcript with ``<edit>…</edit>`` markup as plain words for error rates: each span becomes
    ``editmask`` (it holds ``<framePatch>``), ``editdelete`` (empty) or the words written inside it; every other
    special token of :data:`unitok_jax.text.SPECIAL_TOKENS` (``<cot_text>``, ``<gen_audio>``, ...) is removed.
    Text without markup comes back with only the special tokens removed and whitespace collapsed."""
    from unitok_jax.text import SPECIAL_TOKENS, strip_special_tokens

    e0, e1 = re.escape(SPECIAL_TOKENS["edit"]), re.escape(SPECIAL_TOKENS["edit_end"])

    def span(m: "re.Match") -> str:
        if SPECIAL_TOKENS["frame_patch"] in m.group(1):
            return f" {EDIT_MASK_WORD} "
        words = strip_special_tokens(m.group(1)).strip()
        return f" {words} " if words else f" {EDIT_DELETE_WORD} "

    return " ".join(strip_special_tokens(re.sub(f"{e0}(.*?){e1}", span, markup, flags=re.S)).split())


def _progress(prop: str, source: float, target: float, edited: float) -> Optional[float]:
    if prop == "speech_seconds":
        if min(source, target, edited) <= 0:
            return None
        source, target, edited = math.log(source), math.log(target), math.log(edited)
    span = target - source
    return (edited - source) / span if abs(span) > 1e-9 else None


EDIT_KEYS = ("wer", "cer", "cot_exact", "cot_found", "mcd", "baseline_mcd", "moved_right", "progress",
             "speaker_similarity_target", "speaker_similarity_source", "edited_seconds", "has_audio")


def evaluate_edit(items: Iterable[Mapping], sr: int = SAMPLE_RATE, normalize: bool = True,
                  trim_db: Optional[float] = TRIM_DB) -> dict:
    """Speech-editing metrics per item, per edit type and overall.

    ``items``: mappings ``{"id", "edit_type", "source": wave, "target": wave, "edited": wave | None,
    "cot": str | None, "reference_cot": str | None}`` (or ``{"id", "edit_type", "error"}``: an item that failed
    before scoring, counted in its type): ``target`` is the rendering of the intended result,
    ``edited`` the model's speech (None or empty: the model produced no audio), ``cot`` the model's ``<cot_text>``
    (raw markup, or its transcript; None: the model wrote none), ``reference_cot`` the intended one (the corpus's
    ``target_markup``; given for semantic edits). Both texts go through :func:`render_markup`.

    Rows: ``{"id", "edit_type", "edit_kind", "has_audio", "source_seconds", "target_seconds", "edited_seconds",
    "mcd", "baseline_mcd", "speaker_similarity_target", "speaker_similarity_source"}``; semantic edits (a
    ``reference_cot``) add ``"cot_found", "cot_exact"`` and the :func:`error_rates` fields (``wer``, ``cer``,
    counts, the rendered ``reference`` / ``hypothesis``); acoustic edits (:data:`EDIT_PROPERTIES`) add
    ``"property", "source_value", "target_value", "edited_value", "moved_right", "progress"`` (an item without
    audio has not moved: ``moved_right`` False). Speech durations are silence-trimmed (:func:`duration_error`).

    Returns ``{"count", "scored", "mean", "rows", "corpus", "by_type": {type: {"count", "scored", "no_audio",
    "mean", "corpus"}}}``; ``mean["moved_right"]`` is the fraction of pairs that moved the right way, ``corpus``
    the total-errors / total-length CoT rates (:func:`evaluate_asr`)."""
    rows = []
    for it in items:
        etype = str(it["edit_type"])
        if "error" in it:  # an item that failed before scoring (missing result, unreadable audio): counted
            rows.append({"id": str(it["id"]), "edit_type": etype, "error": str(it["error"])})
            continue
        row = {"id": str(it["id"]), "edit_type": etype,
               "edit_kind": "semantic" if it.get("reference_cot") is not None else "acoustic"}
        try:
            src, tgt = _wave(it["source"], "source"), _wave(it["target"], "target")
            edited = it.get("edited")
            has_audio = edited is not None and np.asarray(edited).size > 0
            gen = _wave(edited, "edited") if has_audio else None
            e_src, e_tgt = speaker_embedding(src, sr), speaker_embedding(tgt, sr)
            row.update(has_audio=has_audio, source_seconds=trim_silence(src, trim_db).size / sr,
                       target_seconds=trim_silence(tgt, trim_db).size / sr,
                       edited_seconds=trim_silence(gen, trim_db).size / sr if has_audio else 0.0,
                       baseline_mcd=_finite(mcd_dtw(tgt, src, sr, trim_db=trim_db)), mcd=None,
                       speaker_similarity_target=None, speaker_similarity_source=None)
            if has_audio:
                e_gen = speaker_embedding(gen, sr)
                row.update(mcd=_finite(mcd_dtw(tgt, gen, sr, trim_db=trim_db)),
                           speaker_similarity_target=cosine(e_gen, e_tgt),
                           speaker_similarity_source=cosine(e_gen, e_src))
            if it.get("reference_cot") is not None:
                found = it.get("cot") is not None
                er = error_rates(render_markup(it["reference_cot"]), render_markup(it["cot"]) if found else "",
                                 normalize)
                row.update(cot_found=found, cot_exact=er["reference"] == er["hypothesis"], **er)
            elif etype in EDIT_PROPERTIES:
                prop, sign, dead = EDIT_PROPERTIES[etype]
                row["property"] = prop
                if prop == "speaker":
                    row.update(source_value=None, target_value=None, edited_value=None, progress=None,
                               moved_right=bool(has_audio and row["speaker_similarity_target"]
                                                > row["speaker_similarity_source"] + dead))
                else:
                    measure = {"speech_seconds": lambda w: trim_silence(w, trim_db).size / sr,
                               "rms_db": lambda w: rms_db(w, trim_db), "snr_estimate_db": snr_estimate_db}[prop]
                    s_val, t_val = measure(src), measure(tgt)
                    g_val = measure(gen) if has_audio else None
                    moved = None
                    if has_audio:
                        change = math.log(g_val / s_val) if prop == "speech_seconds" else g_val - s_val
                        moved = bool(sign * change > dead)
                    row.update(source_value=s_val, target_value=t_val, edited_value=g_val,
                               moved_right=bool(moved),
                               progress=_progress(prop, s_val, t_val, g_val) if has_audio else None)
        except ValueError as e:
            row = {"id": row["id"], "edit_type": etype, "error": str(e)}
        rows.append(row)

    def summary(rs: list[dict]) -> dict:
        out = _report(rs, list(EDIT_KEYS))
        sem = [r for r in out["rows"] if "error" not in r and "wer" in r]
        words, chars = sum(r["words"] for r in sem), sum(r["chars"] for r in sem)
        out["corpus"] = {"wer": sum(r["word_errors"] for r in sem) / words if words else None,
                         "cer": sum(r["char_errors"] for r in sem) / chars if chars else None,
                         "words": words, "chars": chars} if sem else None
        out["no_audio"] = sum(1 for r in rs if r.get("has_audio") is False)
        return out

    report = summary(rows)
    types = sorted({r["edit_type"] for r in rows},
                   key=lambda t: (list(SEMANTIC_EDITS) + list(EDIT_PROPERTIES)).index(t)
                   if t in SEMANTIC_EDITS or t in EDIT_PROPERTIES else 99)
    report["by_type"] = {}
    for t in types:
        s = summary([r for r in rows if r["edit_type"] == t])
        del s["rows"]
        report["by_type"][t] = s
    return report


def edit_summary(name: str, t: dict) -> dict:
    """One summary line of an edit report (:func:`evaluate_edit`; ``t`` is the report or one of its ``by_type``
    entries): ``{"name", "pairs", "scored", "no_audio", "cot_wer", "cot_cer", "cot_exact", "mcd", "baseline_mcd",
    "moved_right", "progress", "speaker_similarity_target"}`` (None where it does not apply)."""
    m, c = t["mean"], t.get("corpus") or {}
    return {"name": name, "pairs": t["count"], "scored": t["scored"], "no_audio": t["no_audio"],
            "cot_wer": c.get("wer"), "cot_cer": c.get("cer"),
            **{k: m.get(k) for k in ("cot_exact", "mcd", "baseline_mcd", "moved_right", "progress",
                                     "speaker_similarity_target")}}
