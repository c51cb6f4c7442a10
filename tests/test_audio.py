"""Audio I/O: real speech, resampling, downmix, PCM input, the clear errors, and atomic saves."""
from __future__ import annotations


import numpy as np
import pytest
import soundfile as sf

from conftest import SHARED_DATA
from unitok_jax import audio
from unitok_jax.audio import SAMPLE_RATE, AudioError, duration_seconds, load_audio, save_audio

LIBRISPEECH = SHARED_DATA / "librispeech-1089-134686-0000.flac"


def _sine(freq, sr, n, amp):
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def _interior_err(got, want, margin=400):
    """Max abs difference away from the edges (where resampler filters see zero padding)."""
    return float(np.max(np.abs(got[margin:-margin] - want[margin:-margin])))


def test_librispeech_flac_loads_at_16k():
    wav = load_audio(LIBRISPEECH)
    assert wav.dtype == np.float32 and wav.shape == (166960,)
    assert duration_seconds(wav) == pytest.approx(10.435)
    ref, sr = sf.read(LIBRISPEECH, dtype="float32")
    assert sr == SAMPLE_RATE
    np.testing.assert_array_equal(wav, ref)  # no resampling, no rescaling at the native rate
    assert 0.05 < np.abs(wav).max() <= 1.0


def test_stereo_44k_is_16k_channel_mean(tmp_path):
    sr, n = 44100, 66150  # 1.5 s
    left, right = _sine(440, sr, n, 0.6), _sine(1000, sr, n, 0.2)
    p = tmp_path / "stereo.wav"
    sf.write(p, np.stack([left, right], axis=1), sr, subtype="FLOAT")

    wav = load_audio(p)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.shape[0] - 24000) <= 1
    want = 0.3 * _sine(440, SAMPLE_RATE, wav.shape[0], 1.0) + 0.1 * _sine(1000, SAMPLE_RATE, wav.shape[0], 1.0)
    assert _interior_err(wav, want) < 2e-3

    left_only = load_audio(p, channel=0)
    assert _interior_err(left_only, _sine(440, SAMPLE_RATE, left_only.shape[0], 0.6)) < 2e-3
    both = load_audio(p, mono=False)
    assert both.shape == (2, wav.shape[0])
    np.testing.assert_allclose(both.mean(axis=0), wav, atol=1e-6)
    with pytest.raises(AudioError, match="channel=2"):
        load_audio(p, channel=2)


def test_signal_on_one_channel_comes_back_at_half_amplitude(tmp_path):
    sr, n = 44100, 44100
    x = np.zeros((n, 2), np.float32)
    x[:, 1] = _sine(440, sr, n, 0.8)
    p = tmp_path / "right_only.flac"
    sf.write(p, x, sr, subtype="PCM_24")
    wav = load_audio(p)
    assert abs(wav.shape[0] - 16000) <= 1
    assert np.abs(wav[400:-400]).max() == pytest.approx(0.4, abs=2e-3)


@pytest.mark.parametrize("sr,seconds", [(8000, 1.0), (48000, 0.75), (22050, 0.5)])
def test_other_rates_resample_to_16k(tmp_path, sr, seconds):
    n = int(sr * seconds)
    p = tmp_path / f"tone_{sr}.wav"
    sf.write(p, _sine(440, sr, n, 0.5), sr, subtype="FLOAT")
    wav = load_audio(p)
    assert abs(wav.shape[0] - int(SAMPLE_RATE * seconds)) <= 1
    assert duration_seconds(wav) == pytest.approx(seconds, abs=1e-4)
    assert _interior_err(wav, _sine(440, SAMPLE_RATE, wav.shape[0], 0.5)) < 2e-3
    # Asking for the file's own rate leaves it alone.
    np.testing.assert_array_equal(load_audio(p, sr=sr), sf.read(p, dtype="float32")[0])


def test_int16_pcm_reads_as_k_over_32768(tmp_path):
    k = np.array([-32768, -16384, -1, 0, 1, 12345, 32767], np.int16)
    p = tmp_path / "int16.wav"
    sf.write(p, k, SAMPLE_RATE, subtype="PCM_16")
    wav = load_audio(p)
    assert wav.dtype == np.float32
    np.testing.assert_array_equal(wav, k.astype(np.float32) / 32768)


def test_mp3_is_read(tmp_path):
    p = tmp_path / "tone.mp3"
    sf.write(p, _sine(440, SAMPLE_RATE, SAMPLE_RATE, 0.5), SAMPLE_RATE, format="MP3")
    wav = load_audio(p)
    assert abs(wav.shape[0] - SAMPLE_RATE) < 2000  # MP3 encoders pad with a few frames
    assert 0.4 < np.abs(wav).max() < 0.6


@pytest.mark.parametrize("ext,subtype", [("wav", "PCM_16"), ("wav", "FLOAT"), ("flac", "PCM_16"), ("ogg", "VORBIS")])
@pytest.mark.parametrize("keep", ["half", "header"])
def test_truncated_file_raises_naming_it(tmp_path, ext, subtype, keep):
    good = tmp_path / f"good.{ext}"
    sf.write(good, _sine(440, SAMPLE_RATE, SAMPLE_RATE, 0.5), SAMPLE_RATE, subtype=subtype)
    data = good.read_bytes()
    header = 44 if ext == "wav" and subtype == "PCM_16" else 100
    bad = tmp_path / f"cut_{keep}.{ext}"
    bad.write_bytes(data[: len(data) // 2 if keep == "half" else header])
    load_audio(good)  # the intact file is fine
    with pytest.raises(AudioError) as e:
        load_audio(bad)
    assert str(bad) in str(e.value) and e.value.path == str(bad)


def test_damaged_known_format_is_not_handed_to_the_fallback_decoder(tmp_path, monkeypatch):
    # A lenient fallback decoder (ffmpeg via audioread) could return part of a damaged file; it is only tried
    # when libsndfile does not know the format at all.
    import librosa

    monkeypatch.setattr(librosa, "load", lambda *a, **k: (np.zeros(100, np.float32), SAMPLE_RATE))
    good = tmp_path / "good.ogg"
    sf.write(good, _sine(440, SAMPLE_RATE, SAMPLE_RATE, 0.5), SAMPLE_RATE, subtype="VORBIS")
    bad = tmp_path / "cut.ogg"
    bad.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(AudioError, match="damaged or truncated"):
        load_audio(bad)
    text = tmp_path / "unknown.xyz"
    text.write_text("not a format libsndfile knows")
    assert load_audio(text).shape == (100,)  # an unrecognised format does reach the fallback


def test_non_audio_file_raises(tmp_path):
    p = tmp_path / "notes.wav"
    p.write_text("this is a text file, not audio\n" * 20)
    with pytest.raises(AudioError, match="notes.wav") as e:
        load_audio(p)
    assert "not a readable audio file" in str(e.value)


def test_missing_path_and_directory_raise(tmp_path):
    with pytest.raises(AudioError, match="no such file") as e:
        load_audio(tmp_path / "nope.wav")
    assert str(tmp_path / "nope.wav") in str(e.value)
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="0 bytes"):
        load_audio(tmp_path / "zero.wav")


def test_empty_audio_raises(tmp_path):
    p = tmp_path / "empty.wav"
    sf.write(p, np.zeros(0, np.float32), SAMPLE_RATE, subtype="PCM_16")
    assert sf.info(p).frames == 0  # a valid file with no samples
    with pytest.raises(AudioError, match="no audio samples") as e:
        load_audio(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_raise(tmp_path, bad):
    x = _sine(440, SAMPLE_RATE, 4000, 0.5)
    x[1234] = bad
    p = tmp_path / "nan.wav"
    sf.write(p, x, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match="non-finite") as e:
        load_audio(p)
    assert str(p) in str(e.value) and "frame 1234" in str(e.value)


def test_max_seconds_guard(tmp_path):
    p = tmp_path / "two_seconds.wav"
    sf.write(p, np.zeros(2 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    assert load_audio(p, max_seconds=2.5).shape == (2 * SAMPLE_RATE,)
    with pytest.raises(AudioError, match="max_seconds=1.5"):
        load_audio(p, max_seconds=1.5)


def test_fallback_to_librosa_when_soundfile_does_not_know_the_format(tmp_path, monkeypatch):
    p = tmp_path / "tone.wav"
    x = (np.arange(-800, 800) * 20).astype(np.int16)
    sf.write(p, x, 8000, subtype="PCM_16")

    class Refusing(sf.SoundFile):  # a subclass, since librosa checks isinstance(path, sf.SoundFile)
        def __init__(self, *a, **k):
            raise sf.LibsndfileError(1, "pretend: ")  # 1 = SF_ERR_UNRECOGNISED_FORMAT

    monkeypatch.setattr(sf, "SoundFile", Refusing)  # librosa's own soundfile attempt fails too -> audioread
    wav = load_audio(p, sr=8000)
    np.testing.assert_array_equal(wav, x.astype(np.float32) / 32768)


@pytest.mark.parametrize("shape", ["flat", "row"])
def test_pcm16_round_trip(tmp_path, shape):
    rng = np.random.default_rng(0)
    x = np.concatenate([[-1.0, 1.0, 0.0, 0.5], rng.uniform(-1, 1, 4000)]).astype(np.float32)
    p = tmp_path / "out" / "nested" / "pcm.wav"  # parent folders are created
    save_audio(p, x if shape == "flat" else x[None], subtype="PCM_16")
    info = sf.info(p)
    assert (info.samplerate, info.channels, info.subtype, info.format) == (SAMPLE_RATE, 1, "PCM_16", "WAV")
    y = load_audio(p)
    assert y.shape == x.shape
    assert np.abs(y - x).max() <= 1 / 32768
    q = tmp_path / "pcm.flac"  # the container follows the extension
    save_audio(q, x)
    assert sf.info(q).format == "FLAC"
    np.testing.assert_array_equal(load_audio(q), y)
    # Values already on the int16 grid come back exactly; out-of-range values are clipped.
    k = np.array([-32768, -3, 0, 7, 32767], np.float32) / 32768
    save_audio(p, np.concatenate([k, [1.7, -2.0]]).astype(np.float32))
    np.testing.assert_array_equal(load_audio(p), np.concatenate([k, [32767 / 32768, -1.0]]).astype(np.float32))


def test_float_round_trip_is_exact(tmp_path):
    x = np.random.default_rng(1).normal(0, 0.7, 3000).astype(np.float32)  # includes |x| > 1, kept as is
    p = tmp_path / "f.wav"
    save_audio(p, x, sr=24000, subtype="FLOAT")
    assert sf.info(p).subtype == "FLOAT"
    np.testing.assert_array_equal(load_audio(p, sr=24000), x)


def test_save_refuses_bad_input(tmp_path):
    p = tmp_path / "x.wav"
    with pytest.raises(AudioError, match="non-finite") as e:
        save_audio(p, np.array([0.1, np.nan], np.float32))
    assert str(p) in str(e.value)
    with pytest.raises(AudioError, match=r"\[L\] or \[1, L\]"):
        save_audio(p, np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match="subtype"):
        save_audio(p, np.zeros(10, np.float32), subtype="PCM_24")
    with pytest.raises(ValueError, match="FLOAT in format FLAC"):
        save_audio(tmp_path / "x.flac", np.zeros(10, np.float32), subtype="FLOAT")
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "a.wav"
    save_audio(p, np.full(100, 0.25, np.float32))
    save_audio(p, np.full(200, -0.5, np.float32))  # overwrite in place
    assert [f.name for f in tmp_path.iterdir()] == ["a.wav"]  # no temporary files left
    before = p.read_bytes()

    real_write = sf.write

    def write_then_fail(file, data, *a, **k):
        real_write(file, data, *a, **k)  # the temporary file is fully written...
        raise OSError("disk full (simulated)")  # ...but the save fails before the rename

    monkeypatch.setattr(audio.sf, "write", write_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_audio(p, np.zeros(50, np.float32))
    with pytest.raises(OSError, match="simulated"):
        save_audio(tmp_path / "new.wav", np.zeros(50, np.float32))
    assert p.read_bytes() == before  # the old file is untouched
    assert [f.name for f in tmp_path.iterdir()] == ["a.wav"]  # no partial new.wav, no temporary file


def test_duration_seconds():
    assert duration_seconds(np.zeros(24000)) == 1.5
    assert duration_seconds(np.zeros((3, 8000)), sr=8000) == 1.0
