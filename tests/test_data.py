"""Manifests and grain pipelines: validation with line numbers, crops, buckets, sharding, resumable iterators."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from unitok_jax.data.manifest import read_manifest, write_manifest
from unitok_jax.data.pipeline import bucketed_batches, plan_buckets, vae_batches


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    recs = []
    for i, secs in enumerate([0.5, 1.0, 1.5, 2.5, 3.0, 0.7, 1.2, 2.2]):
        sr = 16000 if i % 2 else 22050  # resampled on load
        sf.write(root / f"u{i}.wav", 0.1 * rng.standard_normal(int(secs * sr)).astype(np.float32), sr)
        recs.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": f"utterance {i}", "speaker": f"s{i % 3}"})
    write_manifest(str(root / "m.jsonl"), recs)
    return root


def test_manifest_validation_reports_line_numbers(tmp_path):
    lines = [json.dumps({"id": "a", "audio": "a.wav", "text": "x", "speaker": 1}), "{broken",
             json.dumps({"id": "b", "audio": 3, "text": "x", "speaker": "s"}),
             json.dumps({"id": "a", "audio": "c.wav", "text": "y", "speaker": "s"}),
             json.dumps({"id": "d", "audio": "d.wav", "speaker": "s"})]
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n")
    m = read_manifest(str(p))
    assert [r["id"] for r in m.records] == ["a"]
    assert m.records[0]["audio"] == str(tmp_path / "a.wav") and m.records[0]["speaker"] == "1"
    assert [e.split(":")[1] for e in m.errors] == ["2", "3", "4", "5"]
    assert "not valid JSON" in m.errors[0] and "'audio' must be str" in m.errors[1]
    assert "duplicate id" in m.errors[2] and "missing field 'text'" in m.errors[3]
    assert [r["id"] for r in read_manifest(str(p), require_text=False).records] == ["a", "d"]


def test_vae_crops_resume_exactly_and_flag_bad_audio(corpus, tmp_path):
    m = read_manifest(str(corpus / "m.jsonl"))
    recs = m.records + [{"id": "bad", "audio": str(tmp_path / "missing.wav"), "speaker": "x", "text": ""}]
    ds = vae_batches(recs, batch_size=3, crop_seconds=1.0, seed=7, shard_index=0, shard_count=1)
    it = iter(ds)
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    rest = [next(it) for _ in range(4)]
    assert first[0]["wave"].shape == (3, 16000) and first[0]["wave"].dtype == np.float32
    for b in first + rest:
        assert np.all(b["lengths"] <= 16000)
        for w, n in zip(b["wave"], b["lengths"]):
            assert np.all(w[n:] == 0)
    assert sum(int((~b["ok"]).sum()) for b in first + rest) >= 1  # the missing file is flagged, not raised
    it2 = iter(ds)
    it2.set_state(state)
    for a, b in zip(rest, [next(it2) for _ in range(4)]):
        np.testing.assert_array_equal(a["wave"], b["wave"])
    again = iter(vae_batches(recs, batch_size=3, crop_seconds=1.0, seed=7, shard_index=0, shard_count=1))
    np.testing.assert_array_equal(next(again)["wave"], first[0]["wave"])  # deterministic in the seed


def test_shards_are_disjoint(corpus):
    recs = read_manifest(str(corpus / "m.jsonl")).records
    seen = []
    for k in range(2):
        it = iter(vae_batches(recs, batch_size=2, crop_seconds=0.2, seed=1, shard_index=k, shard_count=2,
                              num_epochs=1))
        seen.append({int(round(float(np.abs(w).sum()) * 1e3)) for b in it for w in b["wave"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_bucketed_batches_group_lengths_and_resume(corpus):
    m = read_manifest(str(corpus / "m.jsonl"), add_durations=True)
    assert abs(m.records[0]["duration"] - 0.5) < 1e-3
    plan = plan_buckets([r["duration"] for r in m.records], batch_size=2, seed=0, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(8))
    assert plan != plan_buckets([r["duration"] for r in m.records], batch_size=2, seed=0, epoch=1)
    ds = bucketed_batches(m.records, batch_size=2, seed=0, buckets_seconds=(1.0, 2.0, 4.0), shard_index=0,
                          shard_count=1)
    it = iter(ds)
    batches = [next(it) for _ in range(6)]
    for b in batches:
        assert b["wave"].shape[1] in (16000, 32000, 64000)
        assert b["wave"].shape[1] >= b["lengths"].max() and b["ok"].all()
        assert b["text"][0].startswith("utterance")
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    it2 = iter(ds)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["wave"], batches[3]["wave"])
