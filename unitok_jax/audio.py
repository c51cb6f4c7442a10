"""Audio file I/O: any readable file -> 16 kHz mono float32, and WAV writing.

Reading uses ``soundfile`` (libsndfile: WAV, FLAC, OGG/Vorbis, MP3, AIFF, ...); formats it does not recognise
fall back to ``librosa.load`` (audioread, which needs ffmpeg or a similar decoder on the machine). Samples come
back as float32 in [-1, 1) for integer PCM (int16 ``k`` reads as ``k / 32768``), float files as stored.
Resampling is ``librosa.resample(..., res_type="soxr_hq")`` (the ``soxr`` package, a hard dependency of
librosa >= 0.10, so nothing beyond librosa is needed).

Every problem with an input file raises :class:`AudioError`, whose message starts with the file name.
"""
from __future__ import annotations

import os
import struct
import warnings

import numpy as np
import soundfile as sf

from unitok_jax.io import atomic_file

SAMPLE_RATE = 16000
RESAMPLE_TYPE = "soxr_hq"
SUBTYPES = ("PCM_16", "FLOAT")

# libsndfile open errors after which another decoder may still succeed: format not recognised, unsupported encoding.
_FALLBACK_CODES = (1, 4)


class AudioError(ValueError):
    """An audio file that cannot be used: missing, unreadable, truncated, empty, non-finite or too long.

    ``str(err)`` is ``"<path>: <what was wrong>"``; ``err.path`` is the path.
    """

    def __init__(self, path, what: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {what}")


def load_audio(path, sr: int = SAMPLE_RATE, *, mono: bool = True, channel: int | None = None,
               max_seconds: float | None = None) -> np.ndarray:
    """Read an audio file into float32 samples at ``sr`` Hz.

    Args:
      path: file path (str or os.PathLike).
      sr: output sample rate; the file is resampled when its own rate differs.
      mono: average all channels into one (``[L]``); with ``mono=False`` return ``[C, L]``.
      channel: take only this channel (negative counts from the end); overrides ``mono``.
      max_seconds: refuse files longer than this (checked from the header before decoding where possible).

    Returns:
      float32 ``[L]`` (mono or one channel) or ``[C, L]`` (``mono=False``), ``L`` = ceil(frames * sr / file_sr).

    Raises:
      AudioError: missing / unreadable / truncated file, no samples, NaN or inf samples, bad ``channel``, too long.
    """
    if sr <= 0:
        raise ValueError(f"sr must be positive, got {sr}")
    name = os.fspath(path)
    if not os.path.exists(name):
        raise AudioError(name, "no such file")
    if os.path.isdir(name):
        raise AudioError(name, "is a directory, not an audio file")
    if os.path.getsize(name) == 0:
        raise AudioError(name, "file is empty (0 bytes)")

    data, file_sr = _read(name, max_seconds)  # [F, C] float32
    if data.shape[0] == 0:
        raise AudioError(name, "contains no audio samples")
    finite = np.isfinite(data)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise AudioError(name, f"{bad.size} frame(s) hold non-finite samples (NaN/inf), the first at frame "
                               f"{bad[0]} ({bad[0] / file_sr:.3f} s)")
    _check_duration(name, data.shape[0], file_sr, max_seconds)

    n_ch = data.shape[1]
    if channel is not None:
        if not -n_ch <= channel < n_ch:
            raise AudioError(name, f"has {n_ch} channel(s); channel={channel} is out of range")
        y = data[:, channel]
    elif mono:
        y = data.mean(axis=1) if n_ch > 1 else data[:, 0]
    else:
        y = data.T
    if file_sr != sr:
        y = resample(y, file_sr, sr)
    return np.ascontiguousarray(y, dtype=np.float32)


def save_audio(path, wav, sr: int = SAMPLE_RATE, *, subtype: str = "PCM_16") -> None:
    """Write a mono waveform atomically (:func:`unitok_jax.io.atomic_file`, flushed to disk before the rename).

    Args:
      path: target file; its parent folder is created. The container follows the extension (``.wav``, or e.g.
        ``.flac`` when soundfile supports the subtype there); no extension writes WAV.
      wav: ``[L]`` or ``[1, L]`` samples (numpy or any array ``np.asarray`` accepts), nominally in [-1, 1].
      sr: sample rate written in the header.
      subtype: ``"PCM_16"`` (clipped to [-1, 1], quantised as ``round(x * 32768)`` limited to int16, which
        ``load_audio`` reads back within 1/32768) or ``"FLOAT"`` (32-bit float, exact).

    Raises:
      AudioError: wrong shape or non-finite samples (nothing is written). A failed write leaves any existing
        file at ``path`` untouched and no temporary file behind.
    """
    name = os.fspath(path)
    if subtype not in SUBTYPES:
        raise ValueError(f"subtype must be one of {SUBTYPES}, got {subtype!r}")
    if sr <= 0:
        raise ValueError(f"sr must be positive, got {sr}")
    x = np.asarray(wav)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        raise AudioError(name, f"cannot save samples of shape {x.shape}: expected [L] or [1, L]")
    if not np.issubdtype(x.dtype, np.floating):
        raise AudioError(name, f"cannot save samples of dtype {x.dtype}: expected floating point in [-1, 1]")
    if not np.isfinite(x).all():
        raise AudioError(name, f"refusing to save {int((~np.isfinite(x)).sum())} non-finite sample(s) (NaN/inf)")
    if subtype == "PCM_16":
        x = np.clip(np.round(np.clip(x, -1.0, 1.0) * 32768.0), -32768, 32767).astype(np.int16)
    else:
        x = x.astype(np.float32)

    ext = os.path.splitext(name)[1][1:].upper()
    fmt = "WAV" if ext in ("", "WAV") else ext
    if not sf.check_format(fmt, subtype):
        raise ValueError(f"{name}: soundfile cannot write subtype {subtype} in format {fmt}")

    with atomic_file(name, "wb", fsync=True) as f:
        sf.write(f, x, int(sr), format=fmt, subtype=subtype)


def duration_seconds(wav, sr: int = SAMPLE_RATE) -> float:
    """Length in seconds of ``wav`` (``[L]``, ``[C, L]`` or ``[B, L]``: the last axis is time) at ``sr`` Hz."""
    return np.shape(wav)[-1] / sr


def resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample along the last axis with soxr (``librosa.resample``, ``res_type="soxr_hq"``); float32 out."""
    import librosa  # deferred: librosa's import is slow and only needed off 16 kHz

    return librosa.resample(np.asarray(y, np.float32), orig_sr=orig_sr, target_sr=target_sr,
                            res_type=RESAMPLE_TYPE, axis=-1).astype(np.float32, copy=False)


def _check_duration(name, frames: int, file_sr: int, max_seconds: float | None) -> None:
    if max_seconds is not None and frames / file_sr > max_seconds:
        raise AudioError(name, f"audio is {frames / file_sr:.2f} s long, more than max_seconds={max_seconds}")


def _read(name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """All frames of the file as float32 ``[F, C]`` and its sample rate, or AudioError.

    Truncation is caught where libsndfile's decoder fails (FLAC, OGG, CAF, ...) and, for WAV, by comparing the data
    chunk's declared size with the file size. libsndfile silently shortens other truncated PCM containers (AIFF,
    AU, ...) and MP3 to the frames present; those are returned as read.
    """
    try:
        f = sf.SoundFile(name)
    except (sf.SoundFileError, RuntimeError) as e:
        if getattr(e, "code", None) in _FALLBACK_CODES:
            return _read_librosa(name, e)
        raise AudioError(name, f"cannot be opened as audio (damaged or truncated?): {_sf_reason(e)}") from e
    with f:
        file_sr, fmt = f.samplerate, f.format
        _check_duration(name, f.frames, file_sr, max_seconds)
        try:
            data = f.read(dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError) as e:
            raise AudioError(name, f"cannot be decoded (damaged or truncated?): {_sf_reason(e)}") from e
    if fmt in ("WAV", "WAVEX"):
        short = _wav_data_shortfall(name)
        if short is not None:
            raise AudioError(name, f"is truncated: its data chunk declares {short[0]} bytes, the file holds "
                                   f"only {short[1]}")
    return data, file_sr


def _read_librosa(name: str, sf_error: Exception) -> tuple[np.ndarray, int]:
    """Fallback decoder (librosa -> audioread) for formats libsndfile does not know."""
    import librosa

    try:
        with warnings.catch_warnings():  # librosa warns that its audioread fallback is deprecated
            warnings.simplefilter("ignore")
            y, file_sr = librosa.load(name, sr=None, mono=False, dtype=np.float32)
    except Exception as e:  # audioread raises several unrelated types (NoBackendError, DecodeError, OSError...)
        raise AudioError(name, f"not a readable audio file (soundfile: {_sf_reason(sf_error)}; "
                               f"librosa/audioread: {type(e).__name__}: {e})") from e
    y = np.asarray(y, np.float32)
    return (y[:, None] if y.ndim == 1 else y.T), int(file_sr)


def _sf_reason(e: Exception) -> str:
    return getattr(e, "error_string", None) or str(e)


def _wav_data_shortfall(name: str) -> tuple[int, int] | None:
    """``(declared, present)`` bytes when a RIFF WAV file ends before its ``data`` chunk does, else None.

    libsndfile silently shortens such files to the bytes present, so truncation is checked here. A declared size
    of 0 or 0xFFFFFFFF (streamed WAV of unknown length, RF64) is not a truncation.
    """
    size = os.path.getsize(name)
    with open(name, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, n = struct.unpack("<4sI", f.read(8))
            if cid == b"data":
                present = size - pos - 8
                return None if n in (0, 0xFFFFFFFF) or n <= present else (n, present)
            pos += 8 + n + (n & 1)
    return None
