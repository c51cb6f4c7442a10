"""sample.py tts / asr / edit end to end on a tiny random full checkpoint written by the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, SHARED_DATA, save_tiny_checkpoint, speech_clip, tiny_uniaudio
from unitok_jax import generate
from unitok_jax.api import UniAudio

SENTENCES = ["he hoped there would be stew for dinner", "turnips and carrots and bruised potatoes",
             "fat mutton pieces to be ladled out", "please translate the text to speech"]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    tok, cfg, params = tiny_uniaudio(SENTENCES * 4)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_tiny_checkpoint(path, tok, cfg, params)
    return path


def _run(task, ckpt, req, out, *extra):
    return subprocess.run([sys.executable, "sample.py", task, "--checkpoint", str(ckpt), "--input", str(req),
                           "--out", str(out), "--quiet", "--steps", "2", "--max-patches", "3", "--batch-size", "2",
                           *extra], cwd=REPO, capture_output=True, text=True)


def test_tts_jsonl_writes_outputs_skips_bad_lines_and_resumes(ckpt_dir, tmp_path):
    speech = speech_clip(tmp_path)
    lines = [json.dumps({"id": "a", "text": SENTENCES[0], "prompt_wav": speech, "prompt_text": SENTENCES[1]}),
             "{not json",
             json.dumps({"id": "b", "text": SENTENCES[2]}),
             json.dumps({"id": "c", "text": "   "}),
             json.dumps({"id": "d", "text": "hello", "prompt_wav": "missing.wav"}),
             json.dumps({"text": "no id"})]
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    r = _run("tts", ckpt_dir, req, out)
    assert r.returncode == 1, r.stdout + r.stderr
    for n, why in ((2, "not valid JSON"), (4, "empty text"), (5, "missing.wav"), (6, "missing field 'id'")):
        assert f"req.jsonl:{n}:" in r.stderr and why in r.stderr, r.stderr
    assert sorted(p for p in os.listdir(out) if p.endswith(".wav")) == ["a.wav", "b.wav"]
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in rows] == ["a", "b"]
    wav, sr = sf.read(out / "a.wav")
    assert sr == 16000 and 0 < len(wav) <= 3 * 5 * 40  # at most 3 patches of the tiny model's 40-sample hop
    before = (out / "a.wav").read_bytes()
    r = _run("tts", ckpt_dir, req, out)
    assert "2 already done" in r.stdout and "0 done" in r.stdout
    assert (out / "a.wav").read_bytes() == before
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary files left


def test_asr_and_edit_jsonl(ckpt_dir, tmp_path):
    speech = str(SHARED_DATA / "librispeech-1089-134686-0000.flac")
    short = tmp_path / "short.wav"
    sf.write(short, sf.read(speech)[0][:8000], 16000)
    req = tmp_path / "asr.jsonl"
    req.write_text(json.dumps({"id": "s1", "wav": "short.wav", "context": ["stew"]}) + "\n"
                   + json.dumps({"id": "s2", "wav": 5}) + "\n")
    r = _run("asr", ckpt_dir, req, tmp_path / "asr_out", "--max-new-tokens", "4")
    assert r.returncode == 1 and "asr.jsonl:2:" in r.stderr and "'wav' must be str" in r.stderr
    rows = [json.loads(x) for x in (tmp_path / "asr_out" / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in rows] == ["s1"] and isinstance(rows[0]["text"], str)
    req = tmp_path / "edit.jsonl"
    req.write_text(json.dumps({"id": "e1", "wav": str(short), "instruction": "make it louder"}) + "\n")
    r = _run("edit", ckpt_dir, req, tmp_path / "edit_out")
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.path.isfile(tmp_path / "edit_out" / "e1.wav")
    row = json.loads((tmp_path / "edit_out" / "results.jsonl").read_text())
    assert row["id"] == "e1" and "text" in row and "target_markup" in row  # read by python -m unitok_jax.eval edit


def test_python_api_batch_equals_single(ckpt_dir, tmp_path):
    m = UniAudio.load(str(ckpt_dir))
    speech = speech_clip(tmp_path, 1.5)
    both = m.tts(SENTENCES[:2], prompt_wavs=[speech, speech], prompt_texts=["", ""], max_patches=3,
                 sampler=generate.Sampler(steps=2), request_ids=[0, 1])
    one = m.tts(SENTENCES[1:2], prompt_wavs=[speech], prompt_texts=[""], max_patches=3,
                sampler=generate.Sampler(steps=2), request_ids=[1])
    np.testing.assert_allclose(both[1], one[0], atol=1e-5)
    rec = m.reconstruct([speech])
    assert rec[0].shape[0] >= 24000 - 40 and np.all(np.isfinite(rec[0]))  # the 1.5 s clip, whole


def test_requests_are_batched_by_expected_length(tmp_path):
    """sample.py batches requests of similar cost together (prompt audio, patch budget / input duration), not in
    file order; equal keys keep the file order."""
    from unitok_jax.cli import sample

    def wav(name, seconds):
        path = tmp_path / name
        sf.write(path, np.zeros(int(16000 * seconds), np.float32), 16000)
        return str(path)

    long_p, short_p = wav("long.wav", 2.0), wav("short.wav", 0.5)
    words = lambda n: " ".join(["word"] * n)  # noqa: E731  (25 patches per 3 words)
    tts = [sample.Request(1, "a", {"text": words(30), "prompt_wav": long_p}),
           sample.Request(2, "b", {"text": words(3)}),
           sample.Request(3, "c", {"text": words(30), "prompt_wav": short_p}),
           sample.Request(4, "d", {"text": words(3), "prompt_wav": short_p}),
           sample.Request(5, "e", {"text": words(60)}),
           sample.Request(6, "f", {"text": words(3) + "!"})]
    assert [r.id for r in sample.by_expected_length(tts, "tts")] == ["b", "f", "e", "d", "c", "a"]
    # a cap on the patches makes the budgets equal: the text length decides
    assert [r.id for r in sample.by_expected_length(tts, "tts", max_patches=10)] == ["b", "f", "e", "d", "c", "a"]
    asr = [sample.Request(1, "x", {"wav": long_p}), sample.Request(2, "y", {"wav": str(tmp_path / "missing.wav")}),
           sample.Request(3, "z", {"wav": short_p})]
    assert [r.id for r in sample.by_expected_length(asr, "asr")] == ["y", "z", "x"]
