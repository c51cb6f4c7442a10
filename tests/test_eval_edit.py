"""``python -m unitok_jax.eval edit`` and :func:`unitok_jax.eval.metrics.evaluate_edit` on cases whose answers are
known without the evaluator: results that are the target renderings, results that are the unedited sources, a CoT
with one wrong word, a gain applied by hand, a pair without audio, and broken inputs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf

from unitok_jax.data.build_edit_corpus import ACOUSTIC_TYPES, EDIT_TYPES, SEMANTIC_TYPES, build_edit_corpus
from unitok_jax.eval import __main__ as cli
from unitok_jax.eval import metrics as M


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """An eSpeak edit corpus whose held-out split has one pair of each edit type."""
    out = tmp_path_factory.mktemp("edit") / "corpus"
    build_edit_corpus(str(out), pairs=11, progress=False)
    rows = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert sorted(r["edit_type"] for r in rows) == sorted(EDIT_TYPES)
    return out, {r["edit_type"]: r for r in rows}


def _results(path, corpus, side: str, cot: str, **extra):
    """A sample.py-style results.jsonl whose edited speech is the pair's target (side="target_audio") or source
    (side="audio") file, with CoT ``cot``: "markup" (the intended one), "source" (the source transcript)."""
    root, pairs = corpus
    with open(path, "w") as f:
        for t, r in pairs.items():
            row = {"id": r["id"], "line": 1, "wav": str(root / r[side]), "text": "", "seconds": 1.0,
                   "target_transcript": None, "target_markup": None}
            if r["target_markup"] is not None:
                row["target_markup"] = r["target_markup"] if cot == "markup" else r["text"]
            row.update(extra.get(t, {}))
            f.write(json.dumps(row) + "\n")
    return path


def _run(tmp_path, results, manifest, *extra):
    out = tmp_path / "report.json"
    rc = cli.main(["edit", "--results", str(results), "--manifest", str(manifest), "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_results_equal_to_the_targets_score_perfectly(corpus, tmp_path, capsys):
    root, pairs = corpus
    res = _results(tmp_path / "results.jsonl", corpus, "target_audio", "markup")
    rc, rep = _run(tmp_path, res, root / "heldout.jsonl")
    assert rc == 0 and rep["task"] == "edit" and rep["count"] == rep["scored"] == 10 and not rep["failed"]
    table = capsys.readouterr().out
    assert "edit type" in table and all(t in table for t in EDIT_TYPES)
    assert list(rep["by_type"]) == list(EDIT_TYPES)  # the corpus's order
    rows = {r["edit_type"]: r for r in rep["rows"]}
    for t, r in rows.items():
        assert r["mcd"] == pytest.approx(0.0, abs=1e-6), t  # identical signals
        assert r["speaker_similarity_target"] == pytest.approx(1.0, abs=1e-9)
        assert r["baseline_mcd"] > 0.0 or t in ("louder", "quieter"), t  # c0 (level) is not in MCD
        assert rep["by_type"][t]["count"] == rep["by_type"][t]["scored"] == 1
    for t in SEMANTIC_TYPES:
        assert rows[t]["wer"] == 0.0 and rows[t]["cer"] == 0.0 and rows[t]["cot_exact"] and rows[t]["cot_found"]
        assert rows[t]["cot_markup"] is True
    for t in ACOUSTIC_TYPES:
        assert rows[t]["moved_right"] is True, (t, rows[t])
        assert "wer" not in rows[t]
        if t != "voice":
            assert rows[t]["progress"] == pytest.approx(1.0, abs=1e-9), t
    assert rows["voice"]["speaker_similarity_source"] < 1.0
    assert rep["mean"]["moved_right"] == 1.0 and rep["corpus"]["wer"] == 0.0
    for t in ACOUSTIC_TYPES:
        assert rep["by_type"][t]["mean"]["moved_right"] == 1.0


def test_results_equal_to_the_sources_move_nothing(corpus, tmp_path):
    root, pairs = corpus
    res = _results(tmp_path / "results.jsonl", corpus, "audio", "source")
    rc, rep = _run(tmp_path, res, root / "heldout.jsonl", "--quiet")
    assert rc == 0
    rows = {r["edit_type"]: r for r in rep["rows"]}
    for t in ACOUSTIC_TYPES:
        assert rows[t]["moved_right"] is False, t
        if t != "voice":
            assert rows[t]["progress"] == pytest.approx(0.0, abs=1e-9), t
            assert rows[t]["edited_value"] == pytest.approx(rows[t]["source_value"], abs=1e-9)
    for t in EDIT_TYPES:  # the do-nothing output scores exactly the do-nothing baseline
        assert rows[t]["mcd"] == pytest.approx(rows[t]["baseline_mcd"], abs=1e-9)
    assert rows["voice"]["speaker_similarity_source"] == pytest.approx(1.0, abs=1e-9)
    # the source transcript has the old word (or nothing) where the intended CoT has its one <edit> mark
    for t in SEMANTIC_TYPES:
        n = len(pairs[t]["target_markup"].split())
        assert rows[t]["word_errors"] == 1 and rows[t]["words"] == n and rows[t]["wer"] == pytest.approx(1 / n), t
        assert not rows[t]["cot_exact"]
    assert rep["mean"]["moved_right"] == 0.0
    for t in ACOUSTIC_TYPES:
        assert rep["by_type"][t]["mean"]["moved_right"] == 0.0


def _item(pair, root, edited, **kw):
    load = cli.AudioCache()
    return {"id": pair["id"], "edit_type": pair["edit_type"], "source": load(str(root / pair["audio"])),
            "target": load(str(root / pair["target_audio"])), "edited": edited,
            "reference_cot": pair["target_markup"], **kw}


def test_gain_and_voice_directions(corpus):
    root, pairs = corpus
    load = cli.AudioCache()
    lo, q, v = pairs["louder"], pairs["quieter"], pairs["voice"]
    g = lo["edit_params"]["target_gain_db"] - lo["edit_params"]["source_gain_db"]
    assert g > 0
    src = load(str(root / lo["audio"]))
    half_wrong = src * 10.0 ** (-g / 2 / 20)  # half the intended change, the wrong way
    double = load(str(root / q["audio"])) * 10.0 ** (-6.0 / 20)  # quieter by 6 dB
    rep = M.evaluate_edit([_item(lo, root, half_wrong), _item(q, root, double),
                           _item(v, root, load(str(root / v["audio"])) * 0.5)])
    r_lo, r_q, r_v = rep["rows"]
    assert r_lo["moved_right"] is False and r_lo["progress"] == pytest.approx(-0.5, abs=1e-3)
    gq = q["edit_params"]["source_gain_db"] - q["edit_params"]["target_gain_db"]
    assert r_q["moved_right"] is True and r_q["progress"] == pytest.approx(6.0 / gq, abs=1e-3)
    assert r_q["edited_value"] - r_q["source_value"] == pytest.approx(-6.0, abs=1e-3)
    assert r_v["moved_right"] is False  # the source voice, only quieter (the speaker proxy ignores the level)
    assert rep["by_type"]["louder"]["mean"]["moved_right"] == 0.0 and rep["mean"]["moved_right"] == pytest.approx(1 / 3)


def test_cot_error_rates_and_missing_audio(corpus):
    root, pairs = corpus
    sub = dict(pairs["substitute"], target_markup="the big <edit><framePatch></edit> cat sat down")
    cases = {
        "one wrong word": "<cot_text>the big <edit><framePatch></edit> dog sat down</cot_text><gen_audio>",
        "no mark": "The big cat sat down.",
        "mark elsewhere": "the <edit><framePatch></edit> big cat sat down",
        "none": None,
    }
    items = [dict(_item(sub, root, None, cot=c), id=name) for name, c in cases.items()]
    rep = M.evaluate_edit(items)
    rows = {r["id"]: r for r in rep["rows"]}
    # reference words: the big editmask cat sat down (6 words, 29 characters)
    assert rows["one wrong word"]["wer"] == pytest.approx(1 / 6) and rows["one wrong word"]["cer"] == pytest.approx(3 / 29)
    assert rows["no mark"]["wer"] == pytest.approx(1 / 6) and rows["no mark"]["deletions"] == 1
    assert rows["mark elsewhere"]["word_errors"] == 2  # the mark moved one word: one deletion, one insertion
    assert rows["none"]["cot_found"] is False and rows["none"]["wer"] == 1.0
    for r in rows.values():  # no audio: no MCD, counted as such
        assert r["has_audio"] is False and r["mcd"] is None and r["baseline_mcd"] > 0
    assert rep["no_audio"] == 4 and rep["by_type"]["substitute"]["no_audio"] == 4
    assert rep["corpus"]["words"] == 24 and rep["corpus"]["wer"] == pytest.approx((1 + 1 + 2 + 6) / 24)
    # an acoustic edit without audio has not moved
    r = M.evaluate_edit([_item(pairs["faster"], root, np.zeros(0, np.float32))])["rows"][0]
    assert r["moved_right"] is False and r["progress"] is None and r["has_audio"] is False
    assert M.render_markup("a <edit></edit> b <edit>new words</edit> c<gen_audio>") == "a editdelete b new words c"


def test_cli_failures_and_exit_status(corpus, tmp_path, capsys):
    root, pairs = corpus
    keep = {"delete", "faster", "louder"}
    res = tmp_path / "out"
    res.mkdir()
    rows = []
    for t in sorted(keep):
        r = pairs[t]
        rows.append({"id": r["id"], "wav": str(root / r["target_audio"]), "seconds": 1.0,
                     "target_transcript": None, "target_markup": r["target_markup"]})
    d = pairs["delete"]["id"]  # as sample.py writes it: <id>.wav next to results.jsonl, relative
    wave, sr = sf.read(root / pairs["delete"]["target_audio"])
    sf.write(res / f"{d}.wav", wave, sr)
    rows[0]["wav"] = f"{d}.wav"
    rows[1]["wav"] = "missing.wav"  # faster: unreadable
    rows[2]["seconds"] = 0  # louder: the model produced no audio (file not even read)
    rows[2]["wav"] = "also_missing.wav"
    rows.append({"id": "not_in_manifest", "wav": str(root / pairs["delete"]["audio"]), "seconds": 1.0})
    (res / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    req = tmp_path / "requests.jsonl"
    req.write_text(json.dumps({"id": pairs["voice"]["id"], "wav": str(root / pairs["voice"]["audio"]),
                               "instruction": pairs["voice"]["instruction"]}) + "\n")
    rc, rep = _run(tmp_path, res, root / "heldout.jsonl", "--requests", str(req))
    assert rc == 1
    failed = {f["id"]: f["error"] for f in rep["failed"]}
    assert set(failed) == {pairs["faster"]["id"], "not_in_manifest", pairs["voice"]["id"]}
    assert "missing.wav" in failed[pairs["faster"]["id"]] and "no edit pair" in failed["not_in_manifest"]
    assert "no result" in failed[pairs["voice"]["id"]]
    assert any("not valid JSON" in p for p in rep["problems"])
    assert rep["count"] == 5 and rep["scored"] == 2 and rep["no_audio"] == 1
    assert [r["id"] for r in rep["rows"]][:3] == [r["id"] for r in rows[:3]]
    assert rep["by_type"]["faster"]["count"] == 1 and rep["by_type"]["faster"]["scored"] == 0
    assert rep["by_type"]["louder"]["mean"]["moved_right"] == 0.0
    assert rep["by_type"]["delete"]["mean"]["wer"] == 0.0
    assert not any(math.isnan(v) for v in rep["mean"].values() if isinstance(v, float))
    # inputs that cannot be used at all: exit status 2
    assert cli.main(["edit", "--results", str(tmp_path / "nope"), "--manifest", str(root / "heldout.jsonl")]) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["edit", "--results", str(empty), "--manifest", str(root / "heldout.jsonl"), "--quiet"]) == 2
    assert "no usable lines" in capsys.readouterr().err
