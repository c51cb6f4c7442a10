"""Offline speech synthesis with eSpeak NG, loaded with ``ctypes`` from the ``espeakng-loader`` wheel.

The wheel ships ``libespeak-ng`` and its voice data, so nothing is needed from the system.

Determinism: eSpeak keeps synthesiser state in C statics that outlive ``espeak_Terminate`` (pitch flutter
phase, wave phase, echo buffer) and draws noise from libc ``rand()``, so the same text would come out slightly
differently depending on what was spoken before. Each :func:`synthesize` call therefore opens a private copy of
the library (copied once per process into a temporary folder, so nobody else holds it), initialises it, seeds
both random generators, speaks, and unloads it again (about 1 ms of overhead): the same arguments always give
the same samples, in any order, in any process. A module lock serialises the calls.

Voices are eSpeak names: a language voice (``"en-us"``, ``"en-gb"``, ``"en-gb-scotland"``, ``"en-029"``, ...)
optionally followed by a variant (``"en-us+f2"``, ``"en-gb+m3"``; see :func:`list_variants`).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import sys
import tempfile
import threading
from typing import Optional

import numpy as np

__all__ = ["EspeakError", "synthesize", "version", "native_rate", "list_voices", "list_variants", "check_voice"]

# espeak_AUDIO_OUTPUT, espeak_PARAMETER, flags (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE, _VOLUME, _PITCH, _RANGE, _PUNCTUATION, _WORDGAP = 1, 2, 3, 4, 5, 7
_SYNTH_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

RATE_RANGE = (80, 450)  # words per minute accepted by eSpeak
_SEED = 12345


class EspeakError(RuntimeError):
    """eSpeak NG cannot be used: library or data missing, unknown voice, bad parameter or synthesis failure."""


class _VOICE(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


_lock = threading.RLock()
_chunks: list = []
_info: dict = {}  # path, data, rate, version, voices, resolved


def _collect(wav, n, _events) -> int:
    if n > 0 and wav:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0


_callback = _SYNTH_CB(_collect)


def _libc():
    if "libc" not in _info:
        _info["libc"] = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)
        _info["libc"].srand.argtypes = [ctypes.c_uint]
    return _info["libc"]


def _paths() -> tuple[str, str]:
    """(private copy of the library, voice data folder); copies the library on first use."""
    if "path" in _info:
        return _info["path"], _info["data"]
    try:
        import espeakng_loader
    except ImportError as e:
        raise EspeakError("the espeakng-loader package is not installed (pip install espeakng-loader)") from e
    src = espeakng_loader.get_library_path()
    if not os.path.isfile(src):
        raise EspeakError(f"the eSpeak NG library is missing: {src}")
    try:
        data = espeakng_loader.get_data_path()
    except RuntimeError as e:
        raise EspeakError(f"eSpeak NG voice data not found: {e}") from e
    folder = tempfile.mkdtemp(prefix="unitok-espeak-")
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, os.path.basename(src))
    shutil.copyfile(src, path)
    _info.update(path=path, data=data, src=src)
    return path, data


def _open() -> ctypes.CDLL:
    """A freshly loaded, initialised library instance (caller holds the lock; release with :func:`_close`)."""
    path, data = _paths()
    try:
        lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_LOCAL", 0))
    except OSError as e:
        raise EspeakError(f"cannot load the eSpeak NG library {_info['src']}: {e}") from e
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CB]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_VOICE))
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, os.fsencode(data), _INITIALIZE_DONT_EXIT)
    if rate <= 0:
        _close(lib, terminate=False)
        raise EspeakError(f"eSpeak NG failed to initialise (data path {data}, status {rate})")
    lib.espeak_SetSynthCallback(_callback)
    _info.setdefault("rate", rate)
    return lib


def _close(lib: ctypes.CDLL, terminate: bool = True) -> None:
    if terminate:
        lib.espeak_Terminate()
    import _ctypes

    (_ctypes.FreeLibrary if sys.platform == "win32" else _ctypes.dlclose)(lib._handle)


def _load_info() -> dict:
    """Version, native rate and voice list (read once; caller holds the lock)."""
    if "voices" not in _info:
        lib = _open()
        try:
            version = lib.espeak_Info(None).decode()
            arr = lib.espeak_ListVoices(None)
            voices, i = [], 0
            while arr[i]:
                v = arr[i].contents
                langs, ptr = [], v.languages  # sequence of (priority byte, NUL-terminated code), then a 0 byte
                while ptr and ctypes.string_at(ptr, 1) != b"\x00":
                    code = ctypes.string_at(ptr + 1)
                    langs.append(code.decode())
                    ptr += len(code) + 2
                voices.append({"name": v.name.decode(), "identifier": v.identifier.decode(), "languages": langs})
                i += 1
        finally:
            _close(lib)
        folder = os.path.join(_info["data"], "voices", "!v")
        variants = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        _info.update(version=version, voices=voices, variants=variants, resolved={})
    return _info


def version() -> str:
    """The eSpeak NG library version, e.g. ``"1.52.0"``."""
    with _lock:
        return _load_info()["version"]


def native_rate() -> int:
    """eSpeak's own output sample rate (22050 Hz)."""
    with _lock:
        return _load_info()["rate"]


def list_voices() -> list[dict]:
    """Installed language voices: ``{"name", "identifier", "languages"}`` (languages: list of codes)."""
    with _lock:
        return [dict(v) for v in _load_info()["voices"]]


def list_variants() -> list[str]:
    """Voice variant names usable after ``+`` (``m1``..``m8``, ``f1``..``f5``, ...)."""
    with _lock:
        return list(_load_info()["variants"])


def check_voice(voice: str) -> str:
    """Check ``voice`` (``"lang"`` or ``"lang+variant"``) and return the name eSpeak selects it by.

    The base may be a voice file name (``en-us``, ``gmw/en``), a voice's full name or a language code
    (``en-gb``). eSpeak itself falls back silently on unknown variants, so both parts are checked against the
    installed voice data. Raises :class:`EspeakError` for an unknown voice or variant."""
    with _lock:
        info = _load_info()
        if voice in info["resolved"]:
            return info["resolved"][voice]
        base, _, variant = voice.partition("+")
        key, spec = base.lower(), None
        for v in info["voices"]:
            if key in (v["name"].lower(), v["identifier"].lower(), os.path.basename(v["identifier"]).lower()):
                spec = v["identifier"]
                break
        else:  # a language code: prefer the voice it is the primary language of
            for v in sorted(info["voices"], key=lambda v: v["languages"][:1] != [key]):
                if key in v["languages"]:
                    spec = v["identifier"]
                    break
        if not key or spec is None:
            raise EspeakError(f"unknown eSpeak voice {base!r} in {voice!r} (e.g. en-us, en-gb, en-gb-scotland, "
                              f"en-029; see unitok_jax.data.espeak.list_voices())")
        if variant:
            if variant not in info["variants"]:
                raise EspeakError(f"unknown eSpeak voice variant {variant!r} in {voice!r} "
                                  f"(e.g. m1..m8, f1..f5; see unitok_jax.data.espeak.list_variants())")
            spec += "+" + variant
        info["resolved"][voice] = spec
        return spec


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, *, pitch_range: int = 50,
               volume: int = 100, word_gap: int = 0, gain_db: float = 0.0,
               sample_rate: Optional[int] = 16000) -> np.ndarray:
    """Speak ``text`` and return mono float32 samples in [-1, 1] at ``sample_rate`` Hz (deterministic).

    Args:
      text: plain UTF-8 text (no SSML).
      voice: eSpeak voice, ``"lang"`` or ``"lang+variant"`` (e.g. ``"en-gb+f2"``).
      rate: speaking rate in words per minute (80..450).
      pitch: base pitch 0..100 (50 = the voice's default), ``pitch_range``: intonation range 0..100.
      volume: eSpeak amplitude 0..200 (100 = default; loud voices may clip above ~80);
        ``gain_db``: extra gain applied to the samples (then clipped to [-1, 1]).
      word_gap: extra pause between words, in units of 10 ms.
      sample_rate: output rate (resampled with soxr); None keeps eSpeak's native rate (:func:`native_rate`).

    Raises:
      EspeakError: library unavailable, unknown voice, parameter out of range, or no audio produced.
    """
    if not text or not text.strip():
        raise EspeakError("cannot synthesise empty text")
    for name, value, (lo, hi) in (("rate", rate, RATE_RANGE), ("pitch", pitch, (0, 100)),
                                  ("pitch_range", pitch_range, (0, 100)), ("volume", volume, (0, 200)),
                                  ("word_gap", word_gap, (0, 1000))):
        if not lo <= value <= hi:
            raise EspeakError(f"{name}={value} is out of range [{lo}, {hi}]")
    data = text.encode("utf-8") + b"\x00"
    with _lock:
        spec = check_voice(voice)
        native = _info["rate"]
        lib = _open()
        try:
            if lib.espeak_SetVoiceByName(spec.encode()) != 0:
                raise EspeakError(f"eSpeak NG could not select voice {voice!r} (as {spec!r})")
            for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range), (_VOLUME, volume),
                                 (_WORDGAP, word_gap), (_PUNCTUATION, 0)):
                lib.espeak_SetParameter(param, int(value), 0)
            lib.espeak_ng_SetRandSeed(_SEED)
            _libc().srand(_SEED)
            _chunks.clear()
            status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            lib.espeak_Synchronize()
            chunks = list(_chunks)
            _chunks.clear()
        finally:
            _close(lib)
    if status != 0:
        raise EspeakError(f"eSpeak NG synthesis failed (status {status}) for {text[:60]!r}")
    if not chunks:
        raise EspeakError(f"eSpeak NG produced no audio for {text[:60]!r}")
    wav = np.concatenate(chunks).astype(np.float32) / 32768.0
    if sample_rate is not None and sample_rate != native:
        import soxr

        wav = soxr.resample(wav, native, sample_rate, quality="HQ").astype(np.float32)
    if gain_db:
        wav *= np.float32(10.0 ** (gain_db / 20.0))
    return np.clip(wav, -1.0, 1.0).astype(np.float32)
