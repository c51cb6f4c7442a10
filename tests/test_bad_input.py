"""Bad input everywhere a user gives it: audio files (formats, rates, channels, PCM kinds, silence, 0.01 s and
10-minute files), the Python API (arrays, texts, lengths), ``sample.py`` request files, and checkpoint folders
(missing / truncated parameter files, a config that does not match the weights). Each case is either handled as
documented (resampled, downmixed, scaled) or refused with an error naming the input and the problem; generated
audio is never NaN. Training-data cases (bad manifest lines and unreadable records) are in ``test_preemption.py``,
which trains on such a manifest; the basic unreadable-file cases of ``load_audio`` are in ``test_audio.py``."""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, save_tiny_checkpoint, tiny_uniaudio
from unitok_jax import generate, text
from unitok_jax.api import InputError, NonFiniteAudioWarning, UniAudio
from unitok_jax.audio import AudioError, load_audio
from unitok_jax.convert import ConversionError, load

SR = 16000
WORDS = ["he hoped there would be stew for dinner", "turnips and carrots and bruised potatoes"]


def _sine(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


# ----------------------------------------------------------------------------------------------- audio files


@pytest.mark.parametrize("case", ["5.1 48k float", "stereo 44.1k int16", "8k int32", "8k uint8", "float64 > 1",
                                  "silence", "0.01 s 44.1k"])
def test_audio_files_are_resampled_downmixed_and_scaled(tmp_path, case):
    """What load_audio makes of each kind of file: 16 kHz mono float32, the channel mean, integer PCM k / 2^(b-1),
    float files as stored (not clipped)."""
    path = tmp_path / "x.wav"
    if case == "5.1 48k float":  # six channels of one sine at different gains: the mean has the mean gain
        gains = np.array([1.0, 0.5, 0.25, 0.0, 0.75, 0.5])
        sf.write(path, _sine(1.0, 48000)[:, None] * gains[None], 48000, subtype="FLOAT")
        want_len, want_rms = SR, 0.5 * gains.mean() / np.sqrt(2)
    elif case == "stereo 44.1k int16":
        x = _sine(1.0, 44100)
        sf.write(path, np.stack([x, 0.5 * x], 1), 44100, subtype="PCM_16")
        want_len, want_rms = SR, 0.75 * 0.5 / np.sqrt(2)
    elif case == "8k int32":
        sf.write(path, _sine(1.0, 8000, freq=300.0), 8000, subtype="PCM_32")
        want_len, want_rms = SR, 0.5 / np.sqrt(2)
    elif case == "8k uint8":
        sf.write(path, _sine(1.0, 8000, freq=300.0), 8000, subtype="PCM_U8")
        want_len, want_rms = SR, 0.5 / np.sqrt(2)
    elif case == "float64 > 1":
        sf.write(path, _sine(0.5, SR, amp=2.0).astype(np.float64), SR, subtype="DOUBLE")
        want_len, want_rms = SR // 2, 2.0 / np.sqrt(2)
    elif case == "silence":
        sf.write(path, np.zeros(SR, np.float32), SR)
        want_len, want_rms = SR, 0.0
    else:  # 0.01 s at 44.1 kHz: 441 frames -> 160 samples
        sf.write(path, _sine(0.01, 44100), 44100)
        want_len, want_rms = 160, None
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1 and len(y) == want_len
    assert np.isfinite(y).all()
    if want_rms is not None:
        mid = y[len(y) // 8 : -len(y) // 8]  # away from the resampler's edges
        assert _rms(mid) == pytest.approx(want_rms, rel=0.03, abs=1e-6)
    if case == "float64 > 1":
        assert y.max() > 1.9  # kept as stored: the user's float file is not silently clipped


def test_ten_minute_file_loads_whole_and_max_seconds_refuses_it_from_the_header(tmp_path):
    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", SR, 1, subtype="PCM_16") as f:  # written in pieces: 10 min of noise
        rng = np.random.default_rng(0)
        for _ in range(10):
            f.write(0.1 * rng.standard_normal(60 * SR).astype(np.float32))
    y = load_audio(path)
    assert len(y) == 600 * SR and np.isfinite(y).all()
    t0 = time.perf_counter()
    with pytest.raises(AudioError, match=r"long\.wav: audio is 600\.00 s long, more than max_seconds=30"):
        load_audio(path, max_seconds=30)
    assert time.perf_counter() - t0 < 1.0  # refused from the header, nothing decoded


def test_unsupported_format_is_refused_naming_the_file(tmp_path):
    png = tmp_path / "picture.flac"  # a PNG with an audio extension
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    with pytest.raises(AudioError, match=r"picture\.flac: .*(not a readable audio file|cannot be opened)"):
        load_audio(png)
    header_only = tmp_path / "noframes.wav"
    sf.write(header_only, np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match=r"noframes\.wav: contains no audio samples"):
        load_audio(header_only)


# ----------------------------------------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A tiny full checkpoint with random params (numpy, no compilation) and a BPE tokenizer, plus a copy whose
    flow head is all NaN (a model that has diverged)."""
    tok, cfg, params = tiny_uniaudio(WORDS * 4, normal_scale=0.05)
    root = tmp_path_factory.mktemp("ckpt")
    save_tiny_checkpoint(root / "ok", tok, cfg, params)
    params["flowloss"] = jax.tree.map(lambda x: np.full_like(x, np.nan), params["flowloss"])
    save_tiny_checkpoint(root / "nan", tok, cfg, params)
    return root


@pytest.fixture(scope="module")
def m(ckpt_dir):
    return UniAudio.load(str(ckpt_dir / "ok"))


def _refused(fn, index: int, pattern: str):
    with pytest.raises(InputError, match=pattern) as e:
        fn()
    assert e.value.index == index, e.value
    assert str(e.value).startswith(f"input {index}: ")


def test_api_refuses_bad_audio_naming_the_input(m, tmp_path):
    ok = _sine(0.5, SR)
    patch_s = m.cfg.patch_size * m.cfg.vae.hop / SR
    short = _sine(0.01, SR)
    assert len(short) < patch_s * SR  # 0.01 s is less than one patch of the tiny model too
    _refused(lambda: m.asr([ok, short]), 1, r"audio of 0\.010 s is shorter than one patch")
    _refused(lambda: m.edit([short], ["louder"]), 0, "shorter than one patch")
    _refused(lambda: m.tts(["hello", "there"], [ok, short], ["a", "b"]), 1, "voice prompt of 0.010 s")
    _refused(lambda: m.asr([ok, np.stack([ok, ok])]), 1, r"shape \(2, 8000\): expected mono")
    nan = ok.copy()
    nan[7] = np.nan
    _refused(lambda: m.asr([nan]), 0, r"1 non-finite sample\(s\) \(NaN/inf\), the first at sample 7")
    _refused(lambda: m.asr([ok, np.zeros(0, np.float32)]), 1, "audio array is empty")
    _refused(lambda: m.asr([np.array(["a", "b"])]), 0, "dtype <U1")
    _refused(lambda: m.asr([ok, str(tmp_path / "missing.wav")]), 1, r"missing\.wav: no such file")
    # a 10-minute array: refused before any encoding, it does not fit the tiny model's positions
    t0 = time.perf_counter()
    _refused(lambda: m.asr([np.zeros(600 * SR, np.float32)]), 0,
             rf"prompt tokens \+ 128 to generate exceed the model's {m.cfg.llm.max_position_embeddings} positions")
    assert time.perf_counter() - t0 < 5.0
    # integer PCM arrays are scaled like integer PCM files: int16 k -> k / 32768
    pcm = (np.round(ok * 32767)).astype(np.int16)
    np.testing.assert_array_equal(m._wave(pcm), pcm.astype(np.float32) / 32768)
    np.testing.assert_array_equal(m._wave(pcm.astype(np.int32) << 16), pcm.astype(np.float32) / 32768)


def test_api_refuses_bad_text_naming_the_input(m):
    _refused(lambda: m.tts(["fine", "  "]), 1, "TTS text is empty")
    _refused(lambda: m.tts([None]), 0, "TTS text must be a str, got NoneType")
    _refused(lambda: m.tts(["fine", "bad \ud800 surrogate"]), 1, "not valid Unicode")
    _refused(lambda: m.tts(["a <audioPatch> b"]), 0, "reserved placeholder token '<audioPatch>'")
    _refused(lambda: m.asr([_sine(0.5, SR)], [[3]]), 0, "context word must be a str, got int")
    _refused(lambda: m.edit([_sine(0.5, SR)], [""]), 0, "instruction is empty")
    huge = "stew for dinner " * 2000  # 32 000 characters
    _refused(lambda: m.tts(["fine", huge]), 1, r"exceed the model's 1024 positions")
    with pytest.raises(text.TextError, match="not valid Unicode"):
        m.tok.encode("x\udcff")


def test_unknown_characters_work_and_generation_never_emits_nan(m, ckpt_dir):
    """Text the BPE never saw (accents, CJK, emoji, control and zero-width characters) byte-falls back; a model
    whose flow head went NaN still returns finite audio and reports the replaced samples."""
    odd = "h\u00e9llo \u6f22\u5b57 \U0001f642 \x00\x07 \u200b\ufffd tab\there"
    sampler = generate.Sampler(steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteAudioWarning)
        (wave,) = m.tts([odd], max_patches=2, sampler=sampler)
    assert wave.size > 0 and np.isfinite(wave).all()
    bad = UniAudio.load(str(ckpt_dir / "nan"))
    with pytest.warns(NonFiniteAudioWarning, match=r"output 0: \d+ non-finite sample") as rec:
        (wave,) = bad.tts([odd], max_patches=2, sampler=sampler)
    (w,) = [w.message for w in rec if isinstance(w.message, NonFiniteAudioWarning)]
    assert w.count == wave.size > 0  # every sample was NaN
    assert np.isfinite(wave).all() and not wave.any()


# ----------------------------------------------------------------------------------------------- sample.py


def test_sample_py_reports_each_bad_request_and_writes_finite_audio(ckpt_dir, tmp_path):
    """One sample.py tts job on the NaN model: every bad request is reported with its line number and what was
    wrong (before any model work: one compilation for the whole job), the good ones (one in odd characters) are
    written with the NaN samples replaced and counted in results.jsonl; no temporary files."""
    sf.write(tmp_path / "short.wav", _sine(0.01, SR), SR)
    nan = _sine(0.5, SR)
    nan[3] = np.inf
    sf.write(tmp_path / "inf.wav", nan, SR, subtype="FLOAT")
    with sf.SoundFile(tmp_path / "long.wav", "w", SR, 1) as f:  # 10 minutes (refused from the header)
        for _ in range(10):
            f.write(np.zeros(60 * SR, np.float32))
    rows = [{"id": "good", "text": WORDS[0]},
            {"id": "odd", "text": "h\u00e9llo \u6f22\u5b57 \U0001f642 \u200b"},
            {"id": "short", "text": "x", "prompt_wav": "short.wav"},
            {"id": "inf", "text": "x", "prompt_wav": "inf.wav"},
            {"id": "long", "text": "x", "prompt_wav": "long.wav"},
            {"id": "huge", "text": "stew " * 3000},
            {"id": "surrogate", "text": "bad \ud800"},
            {"id": "patch", "text": "a <audioPatch> b"},
            {"id": "num", "text": 12},
            {"id": "../escape", "text": "x"}]
    with open(tmp_path / "req.jsonl", "wb") as f:
        for r in rows:
            f.write(json.dumps(r).encode() + b"\n")
        f.write(b'{"id": "latin1", "text": "caf\xe9"}\n')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "sample.py", "tts", "--checkpoint", str(ckpt_dir / "nan"), "--input",
                        str(tmp_path / "req.jsonl"), "--out", str(out), "--quiet", "--steps", "2", "--max-patches",
                        "2", "--batch-size", "4", "--max-seconds", "30"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    expect = {3: "shorter than one patch", 4: "inf.wav: 1 frame(s) hold non-finite samples",
              5: "long.wav: audio is 600.00 s long, more than max_seconds=30", 6: "exceed the model's 1024 positions",
              7: "not valid Unicode", 8: "reserved placeholder token", 9: "'text' must be str",
              10: "id '../escape' must use only", 11: "not valid UTF-8"}
    for line, why in expect.items():
        assert any(x.startswith(f"skipped {tmp_path / 'req.jsonl'}:{line}: ") and why in x
                   for x in r.stderr.splitlines()), (line, why, r.stderr)
    assert "Traceback" not in r.stderr
    assert "2 done, 0 already done, 9 failed" in r.stdout
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in results] == ["good", "odd"]
    for x in results:
        wave, sr = sf.read(out / x["wav"], dtype="float32")
        assert sr == SR and len(wave) == round(x["seconds"] * SR) > 0 and np.isfinite(wave).all()
        assert x["nonfinite_samples"] == len(wave)  # the NaN model's samples were all replaced...
        assert f"req.jsonl:{x['line']}: {len(wave)} non-finite sample(s)" in r.stderr  # ...and reported
    assert sorted(os.listdir(out)) == ["good.wav", "odd.wav", "results.jsonl"]


# ----------------------------------------------------------------------------------------------- checkpoints


def _biggest_param_file(path) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, "params")) for f in fs]
    return max(files, key=os.path.getsize)


def _damage(path, how: str) -> None:
    if how == "missing shard":
        os.remove(_biggest_param_file(path))
    elif how == "truncated shard":
        f = _biggest_param_file(path)
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
    elif how == "no params index":
        os.remove(os.path.join(path, "params", "index.json"))
    elif how == "truncated config":
        cfg = os.path.join(path, "unitok_config.json")
        data = open(cfg).read()
        open(cfg, "w").write(data[: len(data) // 2])
    else:  # a config of another model: a wider VAE encoder MLP, a larger vocabulary
        cfg = os.path.join(path, "unitok_config.json")
        meta = json.load(open(cfg))
        meta["components"]["uniaudio"]["vae"]["encoder"]["mlp_dim"] *= 2
        meta["components"]["uniaudio"]["llm"]["vocab_size"] += 64
        json.dump(meta, open(cfg, "w"))


@pytest.mark.parametrize("how,pattern", [
    ("missing shard", r"params: cannot restore params"),
    ("truncated shard", r"params: cannot restore params"),
    ("no params index", r"params: cannot restore params: index\.json is missing"),
    ("truncated config", r"unitok_config\.json is not valid JSON"),
    ("config not matching the weights",
     r"unitok_config\.json does not match the weights in params/: \['audio'\]\['encoder'\].* has shape "
     r"\(.*64\), the config implies \(.*128\)"),
])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_is_refused_naming_the_file(ckpt_dir, tmp_path, how, pattern):
    path = str(tmp_path / "ck")
    shutil.copytree(ckpt_dir / "ok", path)
    _damage(path, how)
    with pytest.raises(ConversionError, match=pattern):
        load(path)
    # orbax leaves the read coroutines of the failed restore unfinished; finalise them here, where their "exception
    # ignored" reports are expected, instead of in whichever test the garbage collector happens to run next
    gc.collect()


def test_sample_py_refuses_a_damaged_checkpoint_with_exit_2(ckpt_dir, tmp_path):
    path = str(tmp_path / "ck")
    shutil.copytree(ckpt_dir / "ok", path)
    _damage(path, "config not matching the weights")
    (tmp_path / "req.jsonl").write_text(json.dumps({"id": "a", "text": "hello"}) + "\n")
    r = subprocess.run([sys.executable, "sample.py", "tts", "--checkpoint", path, "--input",
                        str(tmp_path / "req.jsonl"), "--out", str(tmp_path / "out"), "--quiet"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "does not match the weights" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "out" / "a.wav")
