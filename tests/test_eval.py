"""unitok_jax.eval: metric properties on real speech, hand-counted error rates, the CLI end to end."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile as sf

from unitok_jax.eval import metrics as M
from unitok_jax.eval.__main__ import main

from conftest import REPO, SHARED_DATA

SR = 16000
FLAC = SHARED_DATA / "librispeech-1089-134686-0000.flac"


@pytest.fixture(scope="module")
def speech():
    """Two different stretches of one LibriSpeech utterance (speaker 1089), plus altered copies."""
    w, sr = sf.read(FLAC, dtype="float32")
    assert sr == SR
    a, b = w[: 4 * SR], w[5 * SR : 9 * SR]
    return {
        "a": a,  # "he hoped there would be stew for dinner ..."
        "b": b,  # later words, same speaker
        "a_stretched": librosa.effects.time_stretch(a, rate=1.15),  # same words, 13 % faster
        "a_low": librosa.effects.pitch_shift(a, sr=SR, n_steps=-4),  # another "voice" (pitch and formants down)
        "b_low": librosa.effects.pitch_shift(b, sr=SR, n_steps=-4),
    }


def with_noise(x, snr_db, seed=0):
    n = np.random.default_rng(seed).standard_normal(x.size)
    return (x + n * np.sqrt(np.mean(x.astype(np.float64) ** 2) / 10 ** (snr_db / 10))).astype(np.float32)


# ------------------------------------------------------------------------------------------------- VAE metrics


def test_identical_signals(speech):
    a = speech["a"]
    assert M.pesq_wb(a, a) == pytest.approx(4.64, abs=0.01)
    assert M.stoi(a, a) == pytest.approx(1.0, abs=1e-6)
    assert M.si_sdr(a, a) > 80
    assert M.log_mel_distance(a, a) == 0.0
    assert M.mcd_dtw(a, a) == pytest.approx(0.0, abs=1e-9)


def test_noise_lowers_quality_monotonically(speech):
    a = speech["a"]
    snrs = [30, 15, 5, -5]
    noisy = [with_noise(a, s) for s in snrs]
    pesq = [M.pesq_wb(a, g) for g in noisy]
    stoi = [M.stoi(a, g) for g in noisy]
    sdr = [M.si_sdr(a, g) for g in noisy]
    lmd = [M.log_mel_distance(a, g) for g in noisy]
    assert all(x > y for x, y in zip(pesq, pesq[1:])), pesq
    assert all(x > y for x, y in zip(stoi, stoi[1:])), stoi
    assert all(x > y for x, y in zip(sdr, sdr[1:])), sdr
    assert all(x < y for x, y in zip(lmd, lmd[1:])), lmd
    # additive noise uncorrelated with the signal: SI-SDR is the SNR
    np.testing.assert_allclose(sdr, snrs, atol=0.3)
    assert pesq[0] < 4.0 and stoi[-1] < 0.8


def test_si_sdr_scale_invariant_and_lengths_trimmed(speech):
    a = speech["a"]
    g = with_noise(a, 10)
    assert M.si_sdr(a, 0.25 * g) == pytest.approx(M.si_sdr(a, g), abs=1e-6)
    longer = np.concatenate([a, np.zeros(3000, np.float32)])  # a reconstruction padded to the hop
    assert M.si_sdr(a, longer) > 80 and M.log_mel_distance(longer, a) == 0.0
    assert M.stoi(a, longer) == pytest.approx(1.0, abs=1e-6)
    r = M.evaluate_vae([("x", a, longer), ("y", a, g)])
    assert r["count"] == r["scored"] == 2
    assert r["rows"][0]["reference_seconds"] == pytest.approx(4.0)
    assert r["rows"][0]["generated_seconds"] == pytest.approx(4.0 + 3000 / SR)
    assert r["mean"]["si_sdr"] == pytest.approx((r["rows"][0]["si_sdr"] + r["rows"][1]["si_sdr"]) / 2)


def test_pesq_on_silence_is_none_not_nan():
    z = np.zeros(SR, np.float32)
    assert math.isnan(M.pesq_wb(z, z))
    r = M.evaluate_vae({"silent": (z, z)}, metrics=("pesq", "si_sdr"))
    assert r["rows"][0]["pesq"] is None and r["mean"]["pesq"] is None
    bad = M.evaluate_vae([("nan", z, np.full(SR, np.nan))])
    assert bad["scored"] == 0 and "NaN" in bad["rows"][0]["error"]


# ------------------------------------------------------------------------------------------------- TTS metrics


def test_mcd_formula_by_hand(monkeypatch):
    # every frame differs by exactly 1 in c1 -> MCD = 10 / ln 10 * sqrt(2 * 1^2) whatever the DTW path
    cep = {0: np.zeros((24, 30)), 1: np.zeros((24, 41))}
    cep[1][0] = 1.0
    calls = iter([cep[0], cep[1]])
    monkeypatch.setattr(M, "mel_cepstrum", lambda x, sr: next(calls))
    x = np.random.default_rng(0).standard_normal(SR)
    assert M.mcd_dtw(x, x, trim_db=None) == pytest.approx(10 / math.log(10) * math.sqrt(2), rel=1e-12)


def test_mcd_ignores_gain_and_prefers_same_words(speech):
    a, b, fast = speech["a"], speech["b"], speech["a_stretched"]
    assert M.mcd_dtw(a, 3.0 * a) < 1e-6  # c0 (energy) excluded
    same_words = M.mcd_dtw(a, fast)
    other_words = M.mcd_dtw(a, b)
    assert 0 < same_words < other_words
    # the copy-the-prompt baseline (prompt = other words, same voice) is beaten by the same words
    assert M.copy_prompt_baseline(b, a) == pytest.approx(other_words)
    d = M.mcd_dtw(a, fast, details=True)
    assert d["mcd"] == pytest.approx(same_words) and d["frames_generated"] < d["frames_reference"]


def test_duration_error(speech):
    a, fast = speech["a"], speech["a_stretched"]
    d = M.duration_error(a, fast, trim_db=None)
    assert d["reference_seconds"] == pytest.approx(4.0)
    assert d["generated_seconds"] == pytest.approx(4.0 / 1.15, abs=0.01)
    assert d["error_seconds"] == pytest.approx(4.0 / 1.15 - 4.0, abs=0.01)
    assert d["abs_error_seconds"] == pytest.approx(-d["error_seconds"])
    assert d["rel_error"] == pytest.approx(1 - 1 / 1.15, abs=0.003)
    padded = np.concatenate([np.zeros(SR, np.float32), a, np.zeros(SR, np.float32)])  # 2 s of added silence
    assert M.duration_error(a, padded)["abs_error_seconds"] < 0.05
    assert M.duration_error(a, padded, trim_db=None)["error_seconds"] == pytest.approx(2.0)


def test_speaker_proxy_ranks_the_prompt_voice(speech):
    a, b, a_low, b_low = speech["a"], speech["b"], speech["a_low"], speech["b_low"]
    np.testing.assert_allclose(M.speaker_embedding(0.2 * a), M.speaker_embedding(a), atol=1e-6)  # gain-invariant
    same = M.speaker_similarity(b, a, [a_low])  # different words, prompt voice vs another voice
    assert same["prompt_ranks_first"] is True and same["rank"] == 1
    assert same["similarity_prompt"] > same["similarity_others"]
    wrong = M.speaker_similarity(b_low, a, [a_low])  # generated in the wrong voice
    assert wrong["prompt_ranks_first"] is False and wrong["rank"] == 2
    alone = M.speaker_similarity(b, a)
    assert alone["similarity_others"] is None and alone["prompt_ranks_first"] is None


def test_evaluate_tts_api(speech):
    a, b, fast, a_low, b_low = (speech[k] for k in ("a", "b", "a_stretched", "a_low", "b_low"))
    r = M.evaluate_tts([
        {"id": "u1", "generated": fast, "reference": a, "prompt": b, "voice": "1089"},
        {"id": "u2", "generated": b_low, "reference": b_low, "prompt": a_low, "voice": "low"},
        {"id": "u3", "generated": a, "reference": a},  # no prompt: MCD and duration only
    ])
    u1, u2, u3 = r["rows"]
    assert u1["mcd"] < u1["baseline_mcd"] and u2["mcd"] == pytest.approx(0, abs=1e-9)
    assert u1["speaker_top1"] is True and u2["speaker_top1"] is True and u1["speaker_rank"] == 1
    assert u3["mcd"] == pytest.approx(0, abs=1e-9) and "speaker_top1" not in u3
    assert r["mean"]["speaker_top1"] == 1.0 and r["mean"]["mcd"] == pytest.approx((u1["mcd"] + u2["mcd"]) / 3)


def test_plot_mel_comparison(speech, tmp_path):
    out = tmp_path / "plots" / "u1.png"
    assert M.plot_mel_comparison(speech["a_stretched"], speech["a"], str(out), title="u1") == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert os.listdir(out.parent) == ["u1.png"]  # no temporary file left


# ------------------------------------------------------------------------------------------------- ASR metrics


def test_normalisation():
    assert M.normalize_text("  Hello,   World! Don't  STOP\u2014now. ") == "hello world dont stop now"
    assert M.normalize_text("\u201cQuoted\u201d (text); e.g. semi-colon") == "quoted text e g semi colon"
    assert M.normalize_text("今天，天气很好。") == "今天 天气很好"
    assert M.normalize_text("...") == ""


def test_error_rates_hand_counted():
    ref = "the cat sat down"  # 4 words, 16 characters
    sub = M.error_rates(ref, "the cat sit down")
    assert (sub["wer"], sub["substitutions"], sub["cer"]) == (0.25, 1, 1 / 16)
    dele = M.error_rates(ref, "the cat down")
    assert (dele["wer"], dele["deletions"], dele["char_errors"]) == (0.25, 1, 4)  # "sat " deleted
    ins = M.error_rates(ref, "the big cat sat down")
    assert (ins["wer"], ins["insertions"], ins["cer"]) == (0.25, 1, 4 / 16)
    assert M.error_rates(ref, "")["wer"] == 1.0
    two = M.error_rates("one two", "three four five")  # 2 substitutions + 1 insertion
    assert two["wer"] == 1.5
    # normalisation makes case and punctuation free; without it they are errors
    assert M.error_rates("The cat, sat down.", "the cat sat down")["wer"] == 0.0
    assert M.error_rates("The cat, sat down.", "the cat sat down", normalize=False)["wer"] == 0.75
    zh = M.error_rates("今天天气很好。", "今天天汽很好")
    assert zh["cer"] == pytest.approx(1 / 6)
    empty = M.error_rates("!", "uh")
    assert empty["wer"] is None and empty["insertions"] == 1


def test_evaluate_asr_means_and_corpus():
    r = M.evaluate_asr([("a", "the cat sat down", "the cat sit down"), ("b", "hello world", "hello")])
    assert r["mean"]["wer"] == pytest.approx((0.25 + 0.5) / 2)
    assert r["corpus"]["wer"] == pytest.approx(2 / 6) and r["corpus"]["words"] == 6
    assert r["corpus"]["cer"] == pytest.approx((1 + 6) / (16 + 11))  # "sat"->"sit"; " world" deleted


def test_missing_dependency_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "jiwer", None)  # import jiwer -> ImportError
    with pytest.raises(M.EvalDependencyError, match=r"pip install 'unitok-jax\[eval\]'"):
        M.error_rates("a", "b")


# ------------------------------------------------------------------------------------------------------- CLI


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _wav(path, x, subtype="FLOAT"):
    sf.write(str(path), x, SR, subtype=subtype)
    return str(path)


def test_cli_vae(speech, tmp_path, capsys):
    a, b = speech["a"], speech["b"]
    (tmp_path / "audio").mkdir()
    (tmp_path / "recon").mkdir()
    _wav(tmp_path / "audio" / "utt-a.wav", a)
    _wav(tmp_path / "audio" / "utt-b.flac", b, "PCM_16")
    _wav(tmp_path / "recon" / "a.wav", with_noise(a, 20))  # named by id (reconstruct --input)
    _wav(tmp_path / "recon" / "utt-b.wav", b, "PCM_16")  # named by the reference stem (reconstruct FILES)
    man = _jsonl(tmp_path / "manifest.jsonl", [
        {"id": "a", "audio": "audio/utt-a.wav", "text": "x", "speaker": 1089},
        {"id": "b", "audio": "audio/utt-b.flac", "text": "y", "speaker": 1089},
    ])
    out = tmp_path / "reports" / "vae.json"
    rc = main(["vae", "--reference", man, "--generated", str(tmp_path / "recon"), "--json", str(out),
               "--plots", str(tmp_path / "plots"), "--judge", "none"])  # the judge: tests/test_whisper.py
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["task"] == "vae" and rep["count"] == rep["scored"] == 2 and rep["failed"] == []
    rows = {r["id"]: r for r in rep["rows"]}
    assert rows["b"]["pesq"] == pytest.approx(4.64, abs=0.01) and rows["a"]["pesq"] < rows["b"]["pesq"]
    assert rows["a"]["si_sdr"] == pytest.approx(20, abs=0.5)
    assert rep["mean"]["stoi"] == pytest.approx((rows["a"]["stoi"] + rows["b"]["stoi"]) / 2)
    assert sorted(os.listdir(tmp_path / "plots")) == ["a.png", "b.png"]
    assert os.listdir(out.parent) == ["vae.json"]
    table = capsys.readouterr().out
    assert "PESQ" in table and "mean" in table and "2/2 items scored" in table

    # a missing reconstruction is a failed item (exit 1), the others are still scored
    os.remove(tmp_path / "recon" / "utt-b.wav")
    assert main(["vae", "--reference", man, "--generated", str(tmp_path / "recon"), "--json", str(out),
                 "--metrics", "si_sdr", "--quiet", "--judge", "none"]) == 1
    rep = json.loads(out.read_text())
    assert rep["scored"] == 1 and rep["failed"][0]["id"] == "b" and "no reconstruction" in rep["failed"][0]["error"]
    assert set(rep["mean"]) == {"si_sdr"}


def test_cli_tts(speech, tmp_path):
    a, b, fast, a_low, b_low = (speech[k] for k in ("a", "b", "a_stretched", "a_low", "b_low"))
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir()
    ref.mkdir()
    # sample.py tts output: OUT/<id>.wav and OUT/results.jsonl
    _wav(gen / "u1.wav", fast)
    _wav(gen / "u2.wav", b_low)
    _wav(gen / "u3.wav", a)
    _jsonl(gen / "results.jsonl", [{"id": "u1", "line": 1, "wav": "u1.wav", "seconds": 3.5},
                                   {"id": "u2", "line": 2, "wav": "u2.wav", "seconds": 4.0},
                                   {"id": "u3", "line": 3, "wav": "u3.wav", "seconds": 4.0}])
    prompts = [_wav(ref / "p1.wav", b), _wav(ref / "p2.wav", a_low)]
    reqs = _jsonl(tmp_path / "requests.jsonl", [
        {"id": "u1", "text": "he hoped there would be stew", "prompt_wav": "ref/p1.wav"},
        {"id": "u2", "text": "for dinner turnips", "prompt_wav": prompts[1]},
        {"id": "u3", "text": "no reference for this one"},
        {"id": "u4", "text": "generation failed"},
    ])
    man = _jsonl(tmp_path / "reference.jsonl", [
        {"id": "u1", "audio": _wav(ref / "r1.wav", a), "text": "t", "speaker": "1089"},
        {"id": "u2", "audio": "ref/r2.wav", "text": "t", "speaker": "low"},
    ])
    _wav(ref / "r2.wav", b_low)
    out = tmp_path / "tts.json"
    rc = main(["tts", "--results", str(gen), "--reference", man, "--requests", reqs, "--json", str(out),
               "--plots", str(tmp_path / "plots"), "--judge", "none"])
    assert rc == 1  # u3 has no reference, u4 no result
    rep = json.loads(out.read_text())
    assert rep["count"] == 4 and rep["scored"] == 2
    failed = {f["id"]: f["error"] for f in rep["failed"]}
    assert "no reference" in failed["u3"] and "no result" in failed["u4"]
    rows = {r["id"]: r for r in rep["rows"]}
    assert rows["u1"]["mcd"] < rows["u1"]["baseline_mcd"]
    assert rows["u2"]["mcd"] == pytest.approx(0, abs=1e-3)
    assert rows["u1"]["voice"] == "1089" and rows["u1"]["speaker_top1"] is True
    assert rows["u2"]["speaker_top1"] is True and rep["mean"]["speaker_top1"] == 1.0
    assert rows["u1"]["duration_rel_error"] == pytest.approx(1 - 1 / 1.15, abs=0.05)
    assert rows["u1"]["generated"] == str(gen / "u1.wav")
    assert sorted(os.listdir(tmp_path / "plots")) == ["u1.png", "u2.png"]


def test_cli_tts_unreadable_audio(tmp_path, capsys):
    (tmp_path / "u1.wav").write_bytes(b"RIFF not really a wav file")
    res = _jsonl(tmp_path / "results.jsonl", [{"id": "u1", "wav": "u1.wav"}])
    man = _jsonl(tmp_path / "m.jsonl", [{"id": "u1", "audio": str(FLAC), "text": "t", "speaker": "s"}])
    out = tmp_path / "r.json"
    assert main(["tts", "--results", res, "--reference", man, "--json", str(out), "--quiet",
                 "--judge", "none"]) == 1
    rep = json.loads(out.read_text())
    assert rep["scored"] == 0 and str(tmp_path / "u1.wav") in rep["failed"][0]["error"]


def test_cli_asr(tmp_path, capsys):
    res = _jsonl(tmp_path / "results.jsonl", [
        {"id": "a", "line": 1, "language": "en", "text": "The cat sat down."},
        {"id": "b", "line": 2, "language": "en", "text": "hello"},
        {"id": 7, "line": 3, "language": "en", "text": "HE HOPED THERE WOULD BE STEW"},
    ])
    man = _jsonl(tmp_path / "manifest.jsonl", [
        {"id": "a", "audio": "a.wav", "text": "the cat sat down", "speaker": 1},
        {"id": "b", "audio": "b.wav", "text": "Hello, world!", "speaker": 1},
        {"id": "7", "audio": "c.wav", "text": "he hoped there would be stew", "speaker": 2},
        {"id": "extra", "audio": "d.wav", "text": "not transcribed", "speaker": 2},
    ])
    out = tmp_path / "asr.json"
    assert main(["asr", "--results", res, "--manifest", man, "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    rows = {r["id"]: r for r in rep["rows"]}
    assert rows["a"]["wer"] == 0.0 and rows["b"]["wer"] == 0.5 and rows["7"]["wer"] == 0.0
    assert rep["mean"]["wer"] == pytest.approx(0.5 / 3)
    assert rep["corpus"]["wer"] == pytest.approx(1 / 12) and rep["count"] == 3
    assert "corpus: WER 0.0833" in capsys.readouterr().out


def test_cli_bad_inputs_are_reported_by_name(tmp_path, capsys):
    res = _jsonl(tmp_path / "results.jsonl", [{"id": "a", "text": "x"}, "not an object", {"text": "no id"}])
    man = _jsonl(tmp_path / "manifest.jsonl", [{"id": "a", "text": "x"}])
    missing = str(tmp_path / "nope.jsonl")
    assert main(["asr", "--results", res, "--manifest", missing]) == 2
    err = capsys.readouterr().err
    assert missing in err and "no such file" in err
    assert main(["asr", "--results", res, "--manifest", man, "--json", str(tmp_path / "r.json")]) == 1
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["scored"] == 1 and len(rep["problems"]) == 2 and "results.jsonl:2" in rep["problems"][0]
    assert main(["vae", "--reference", man, "--generated", str(tmp_path / "nothing")]) == 2
    assert "--generated" in capsys.readouterr().err


def test_cli_module_subprocess(tmp_path):
    """python -m unitok_jax.eval end to end: a good run, then a missing file -> clear message, exit 2."""
    res = _jsonl(tmp_path / "results.jsonl", [{"id": "a", "text": "the cat sit down"}])
    man = _jsonl(tmp_path / "manifest.jsonl", [{"id": "a", "audio": "a.wav", "text": "the cat sat down",
                                                "speaker": 1}])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = [sys.executable, "-m", "unitok_jax.eval", "asr", "--results"]
    p = subprocess.run(run + [res, "--manifest", man, "--json", str(tmp_path / "o.json")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "o.json").read_text())["mean"]["wer"] == 0.25
    p = subprocess.run(run + [str(tmp_path / "missing.jsonl"), "--manifest", man], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "missing.jsonl" in p.stderr and "Traceback" not in p.stderr
