"""Whisper tiny.en offline (unitok_jax.eval.whisper): the judge on eSpeak speech and on noise, the teacher features'
50 Hz row layout, the teacher folder the S1 stage reads, and the judge in ``python -m unitok_jax.eval``."""
from __future__ import annotations

import json

import numpy as np
import pytest

from unitok_jax.audio import save_audio
from unitok_jax.data import espeak
from unitok_jax.data.pipeline import load_teacher, teacher_rows, vae_batches
from unitok_jax.eval import whisper as W
from unitok_jax.eval.__main__ import main as eval_main

SR = 16000
TEXTS = ("Please close the gate behind you when you leave.", "She painted the fence a pale shade of green.")


@pytest.fixture(scope="module")
def speech():
    """Two corpus sentences in a seen voice of the demo corpus."""
    return [espeak.synthesize(t, "en-us+m1", 165, 45, volume=80, sample_rate=SR) for t in TEXTS]


def test_model_comes_from_disk_not_a_hub(monkeypatch, tmp_path):
    assert W.model_path().endswith("model")
    monkeypatch.setenv(W.MODEL_ENV, str(tmp_path))  # a folder without weights: a clear error, no download
    with pytest.raises(W.EvalDependencyError, match="no model.bin"):
        W.model_path()


def test_numbers_are_spelled_like_the_corpus():
    assert W.spell_numbers("at 7:15 on the 3rd, 25% of 1,000 in the 1990s") == \
        "at seven fifteen on the third, twenty five percent of one thousand in the nineteen nineties"


def test_teacher_features_have_the_50hz_row_layout(speech):
    """ceil(samples / 320) rows of 384 channels; delaying the audio by k x 320 samples delays the features by k rows
    (row i describes samples [320 i, 320 (i + 1)), the frames the S1 stage pairs them with)."""
    w = speech[0]
    k = 7
    late = np.concatenate([np.zeros(k * W.HOP, np.float32), w])
    a, b = W.encoder_features([w, late])
    assert a.shape == (-(-len(w) // 320), 384) and b.shape == (len(a) + k, 384) and a.dtype == np.float32

    def cos(x, y):
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
        return float(np.mean(np.sum(x * y, 1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)))

    sims = {s: cos(a, b[s:]) for s in range(k - 2, k + 3)}
    assert max(sims, key=sims.get) == k and sims[k] > 0.95, sims
    # what the S1 pipeline takes for a frame-aligned crop starting at frame 3
    rows, n = teacher_rows(a, 3, 10)
    assert n == 10 and np.array_equal(rows, a[3:13])


def test_teacher_folder_feeds_the_s1_pipeline(speech, tmp_path):
    from unitok_jax.data.teacher import build_teacher

    recs = []
    for i, w in enumerate(speech):
        save_audio(str(tmp_path / f"u{i}.wav"), w, SR)
        recs.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": TEXTS[i], "speaker": "s"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = build_teacher(str(tmp_path / "train.jsonl"), str(tmp_path / "teacher"), dim=16, progress=False)
    assert s["records"] == 2 and s["dim"] == 16 and 0.5 < s["explained"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "teacher" / "manifest.jsonl").read_text().splitlines()]
    for r, w in zip(rows, speech):
        f = load_teacher(str(tmp_path / "teacher" / r["teacher"]), 16)
        assert f.shape == (-(-len(w) // 320), 16)
    recs = [dict(r, audio=str(tmp_path / r["audio"]), teacher=str(tmp_path / "teacher" / r["teacher"]))
            for r in rows]
    batch = next(iter(vae_batches(recs, batch_size=2, crop_seconds=1.0, seed=0, shard_index=0, shard_count=1,
                                  teacher_key="teacher", teacher_dim=16)))
    assert batch["teacher"].shape == (2, 50, 16) and list(batch["teacher_frames"]) == [50, 50]
    assert batch["ok"].all()


def test_eval_vae_judge_understands_espeak_and_not_noise(speech, tmp_path):
    """``eval vae`` runs the judge on the originals (eSpeak: low WER) and on the reconstructions: a perfect one
    scores the original's rates, noise a high WER."""
    recs = []
    (tmp_path / "rec").mkdir()
    for i, w in enumerate(speech):
        save_audio(str(tmp_path / f"u{i}.wav"), w, SR)
        out = w if i == 0 else np.random.default_rng(i).normal(0.0, 0.1, len(w)).astype(np.float32)
        save_audio(str(tmp_path / "rec" / f"u{i}.wav"), out, SR)
        recs.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": TEXTS[i], "speaker": "s"})
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "vae.json"
    assert eval_main(["vae", "--reference", str(tmp_path / "ref.jsonl"), "--generated", str(tmp_path / "rec"),
                      "--metrics", "stoi", "--json", str(out), "--quiet"]) == 0
    rep = json.loads(out.read_text())
    j = rep["judge"]
    assert j["items"] == 2 and j["reference"]["wer"] <= 0.2
    rows = {r["id"]: r for r in rep["rows"]}
    assert rows["u0"]["judge_wer"] == rows["u0"]["judge_ref_wer"]
    assert rows["u1"]["judge_wer"] >= 0.8 and j["generated"]["wer"] >= 0.4 + j["reference"]["wer"]
    assert j["wer_ratio"] is None if j["reference"]["wer"] == 0 else j["wer_ratio"] > 2
