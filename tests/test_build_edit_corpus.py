"""The offline speech-editing corpus (unitok_jax.data.build_edit_corpus): markup, pairs, split, determinism."""
from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import pytest
import soundfile as sf

from unitok_jax.data import build_corpus as bc
from unitok_jax.data import build_edit_corpus as E
from unitok_jax.data.manifest import read_manifest
from unitok_jax.text import parse_edit_output

PAIRS = 40  # 10 held out (one per edit type), 30 train (three per type)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("edit") / "c"
    summary = E.build_edit_corpus(str(out), pairs=PAIRS, seed=5, corpus_seed=2, progress=False)
    recs = {s: read_manifest(str(out / f"{s}.jsonl")) for s in ("train", "heldout")}
    return out, summary, recs


def _rms_db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2))


def _all(recs) -> list:
    return recs["train"].records + recs["heldout"].records


def _audio(out, rec, key: str) -> np.ndarray:
    wav, sr = sf.read(os.path.join(out, rec[key]), dtype="float64")  # "audio" is absolute after read_manifest
    assert sr == E.SAMPLE_RATE and wav.ndim == 1
    return wav


# ---------------------------------------------------------------- text edits and markup


@pytest.mark.parametrize("etype, k, new, target, markup", [
    ("delete", 1, "", "The sat down.", "The <edit></edit> sat down."),
    ("insert", 2, "really", "The cat really sat down.", "The cat <edit><framePatch></edit> sat down."),
    ("substitute", 1, "dog", "The dog sat down.", "The <edit><framePatch></edit> sat down."),
])
def test_semantic_edit_and_markup(etype, k, new, target, markup):
    e = E.semantic_edit("The cat sat down.", etype, k, new)
    assert e["target_text"] == target and e["target_markup"] == markup
    parsed = parse_edit_output(f"<cot_text>{markup}</cot_text><gen_audio>")  # the project's own parser
    assert parsed["markup"] == markup and parsed["gen_audio"]
    assert parsed["edits"] == (["" if etype == "delete" else "<framePatch>"])


def test_semantic_edit_rejects_bad_requests():
    with pytest.raises(ValueError):
        E.semantic_edit("The cat sat.", "delete", 3)
    with pytest.raises(ValueError):
        E.semantic_edit("The cat sat.", "insert", 1, "")
    with pytest.raises(ValueError):
        E.semantic_edit("The cat sat.", "louder", 1)


def test_chosen_edits_keep_articles_and_anchors():
    words = "She saw a small dog and an old owl near the tall tower".split()
    for etype in E.SEMANTIC_TYPES:
        for seed in range(40):
            k, new = E.choose_semantic_edit(etype, words, ["apple", "enormous", "yellow"], np.random.default_rng(seed))
            assert k >= 1 and words.count(words[k]) == 1 and words[k].isalpha() and words[k].islower()
            t = E.semantic_edit(" ".join(words), etype, k, new)["target_text"].split()
            for i in range(1, len(t)):  # "a"/"an" still fit the next word
                if t[i - 1] in ("a", "an"):
                    assert t[i - 1] == ("an" if t[i][0] in "aeiou" else "a"), (etype, t)
            if etype == "substitute":
                assert any(words[k] in g and new in g for g in E.SUBSTITUTION_GROUPS)  # a same-group word exists
    assert E.choose_semantic_edit("delete", ["Hello", "there."], [], np.random.default_rng(0)) is None


def test_instruction_table_and_voice_descriptions():
    assert set(E.INSTRUCTIONS) == set(E.EDIT_TYPES) and len(E.EDIT_TYPES) == 10
    fields = dict(w="cat", o="cat", n="dog", b="sat", p=2, gender="female", accent="Scottish",
                  a_accent="a Scottish")
    for etype, phr in E.INSTRUCTIONS.items():
        assert 3 <= len(phr) <= 5 and len(set(phr)) == len(phr), etype
        assert all(p.format(**fields).strip() for p in phr)
    assert {s["id"] for s in bc.SPEAKERS} <= set(E.VOICE_DESCRIPTIONS)
    assert len({E.VOICE_DESCRIPTIONS[s["id"]] for s in bc.SPEAKERS}) == len(bc.SPEAKERS)  # voices told apart


def test_noise_generators():
    rng = np.random.default_rng(0)
    for kind in E.NOISE_KINDS:
        n = E.make_noise(16000, kind, rng)
        assert abs(np.sqrt(np.mean(n ** 2)) - 1) < 1e-6
    spec = {k: np.abs(np.fft.rfft(E.make_noise(32000, k, np.random.default_rng(1)))) ** 2 for k in E.NOISE_KINDS}
    low = {k: v[1:len(v) // 16].sum() / v.sum() for k, v in spec.items()}
    assert low["pink"] > 4 * low["white"]
    clean = np.sin(np.linspace(0, 400, 16000)).astype(np.float32) * 0.3
    noisy = E.add_noise(clean, 10.0, "white", np.random.default_rng(2))
    assert abs(_rms_db(clean) - _rms_db(noisy - clean) - 10.0) < 0.05


# ---------------------------------------------------------------- the built corpus


def test_manifests_read_back_with_all_fields(corpus):
    out, summary, recs = corpus
    assert not recs["train"].errors and not recs["heldout"].errors
    assert len(recs["train"]) + len(recs["heldout"]) == PAIRS == summary["total"]["pairs"]
    assert len(recs["heldout"]) == len(E.EDIT_TYPES)
    raw = [json.loads(ln) for ln in (out / "train.jsonl").read_text().splitlines()]
    assert list(raw[0]) == list(E._RECORD_KEYS)
    ids = [r["id"] for r in _all(recs)]
    assert len(set(ids)) == len(ids)
    for r in _all(recs):
        assert os.path.isfile(r["audio"]) and os.path.isfile(out / r["target_audio"])
        assert r["edit_kind"] == E.edit_kind(r["edit_type"])
        assert (r["target_markup"] is None) == (r["edit_kind"] == "acoustic")
        assert r["instruction"].strip() and r["id"].endswith(r["edit_type"])
    for split, rs in recs.items():  # each split is balanced over the edit types
        assert {r["edit_type"] for r in rs.records} == set(E.EDIT_TYPES)
        assert summary["splits"][split]["edit_types"] == {t: sum(r["edit_type"] == t for r in rs.records)
                                                          for t in E.EDIT_TYPES}


def test_semantic_pairs_are_consistent(corpus):
    out, _, recs = corpus
    n = 0
    for r in _all(recs):
        if r["edit_kind"] != "semantic":
            continue
        n += 1
        src, tgt, mk = r["text"].split(), r["target_text"].split(), r["target_markup"].split()
        p = r["edit_params"]
        k, old, new = p["index"], p["old"], p["new"]
        assert r["target_speaker"] == r["speaker"]
        if r["edit_type"] == "delete":
            assert new == "" and src[k] == old and tgt == src[:k] + src[k + 1:]
            assert mk == src[:k] + [E.DELETE_MARK] + src[k + 1:]
            assert f"'{old}'" in r["instruction"]
            assert r["target_duration"] < r["duration"]
        elif r["edit_type"] == "insert":
            assert old == "" and tgt == src[:k] + [new] + src[k:]
            assert mk == src[:k] + [E.EDIT_MARK] + src[k:]
            assert f"'{new}'" in r["instruction"]
            assert f"'{src[k]}'" in r["instruction"] or f"word number {k + 1}" in r["instruction"]
            assert r["target_duration"] > r["duration"]
        else:
            assert src[k] == old != new and tgt == src[:k] + [new] + src[k + 1:]
            assert mk == src[:k] + [E.EDIT_MARK] + src[k + 1:]
            assert f"'{old}'" in r["instruction"] and f"'{new}'" in r["instruction"]
        assert mk.count(E.EDIT_MARK) + mk.count(E.DELETE_MARK) == 1
        # filling the mask with the new word gives the target transcript
        assert " ".join(new if w == E.EDIT_MARK else w for w in mk if w != E.DELETE_MARK) == r["target_text"]
    assert n == 4 * len(E.SEMANTIC_TYPES)


def test_acoustic_edits_move_the_property(corpus):
    out, _, recs = corpus
    seen = set()
    for r in _all(recs):
        t = r["edit_type"]
        if r["edit_kind"] != "acoustic":
            continue
        seen.add(t)
        assert r["target_text"] == r["text"] and r["target_markup"] is None
        src, tgt = _audio(out, r, "audio"), _audio(out, r, "target_audio")
        p = r["edit_params"]
        if t == "faster":
            assert p["target_rate"] > p["source_rate"] and r["target_duration"] < 0.85 * r["duration"]
        elif t == "slower":
            assert p["target_rate"] < p["source_rate"] and r["target_duration"] > 1.15 * r["duration"]
        elif t in ("louder", "quieter"):
            assert len(src) == len(tgt)
            gain = _rms_db(tgt) - _rms_db(src)
            assert abs(gain - (p["target_gain_db"] - p["source_gain_db"])) < 0.2
            assert gain > 5 if t == "louder" else gain < -5
        elif t == "voice":
            assert r["target_speaker"] != r["speaker"] and p["target_speaker"] == r["target_speaker"]
            gender, accent = E.VOICE_DESCRIPTIONS[r["target_speaker"]]
            assert gender in r["instruction"] and accent in r["instruction"]
            assert len(src) != len(tgt) or not np.array_equal(src, tgt)
        else:
            assert len(src) == len(tgt)
            clean, noisy = (src, tgt) if t == "add_noise" else (tgt, src)
            snr = _rms_db(clean) - _rms_db(noisy - clean)
            assert abs(snr - p["snr_db"]) < 0.5 and p["snr_db"] <= 15
            # the noisy side has energy in the pauses where the clean one has (almost) none
            quiet = np.abs(clean) < 1e-3
            assert quiet.sum() > 1000 and _rms_db(noisy[quiet]) > _rms_db(clean[quiet]) + 10
        if t not in ("voice",):
            assert r["target_speaker"] == r["speaker"]
    assert seen == set(E.ACOUSTIC_TYPES)


def test_heldout_split_matches_build_corpus(corpus):
    _, _, recs = corpus
    utts = bc.plan(bc.load_sentences(), seed=2)  # the speech corpus built with --seed 2
    held = {u["sentence"] for u in utts if u["split"] == "heldout"}
    train_sent = {u["sentence"] for u in utts if u["split"] == "train"}
    pool = list(dict.fromkeys(bc.load_sentences()))
    seen = {s["id"] for s in bc.SPEAKERS if not s["heldout"]}
    held_texts = {pool[i] for i in held}
    for r in recs["train"].records:
        assert r["sentence"] in train_sent and r["text"] == pool[r["sentence"]]
        assert r["speaker"] in seen and r["target_speaker"] in seen
        assert r["text"] not in held_texts and r["target_text"] not in held_texts
    for r in recs["heldout"].records:
        assert r["sentence"] in held and r["text"] == pool[r["sentence"]]
    speakers = {r["speaker"] for r in recs["heldout"].records} | {r["target_speaker"] for r in recs["heldout"].records}
    assert speakers - seen  # held-out voices appear
    assert E.split_sentences(pool, 2)["heldout"] == sorted(held)


@pytest.mark.parametrize("corpus_seed, corpus_sentences", [(0, None), (7, 60)])
def test_plan_split_at_scale(corpus_seed, corpus_sentences):
    """The full default plan (no audio): split sentences and voices as build_corpus, balanced edit types."""
    sentences = bc.load_sentences()
    specs = E.plan_pairs(sentences, pairs=E.DEFAULT_PAIRS, seed=3, corpus_seed=corpus_seed,
                         corpus_sentences=corpus_sentences)
    utts = bc.plan(sentences, seed=corpus_seed, limit=corpus_sentences)
    sent = {s: {u["sentence"] for u in utts if u["split"] == s} for s in ("train", "heldout")}
    seen = {s["id"] for s in bc.SPEAKERS if not s["heldout"]}
    by = {s: [p for p in specs if p["split"] == s] for s in ("train", "heldout")}
    assert len(by["heldout"]) == round(bc.HELDOUT_FRACTION * E.DEFAULT_PAIRS)
    for split, ps in by.items():
        assert {p["sentence"] for p in ps} <= sent[split]
        counts = {t: sum(p["edit_type"] == t for p in ps) for t in E.EDIT_TYPES}
        assert max(counts.values()) - min(counts.values()) <= 1
        assert {p["instruction"] for p in ps if p["edit_type"] == "faster"} <= set(E.INSTRUCTIONS["faster"])
    assert all(p["speaker"] in seen and p["target_speaker"] in seen for p in by["train"])
    held_src = [p["speaker"] not in seen for p in by["heldout"]]
    assert 0.25 < np.mean(held_src) < 0.75  # about half the held-out sources are held-out voices
    assert any(p["target_speaker"] not in seen for p in by["heldout"] if p["edit_type"] == "voice")
    assert len({p["instruction"] for p in by["train"] if p["edit_type"] == "louder"}) >= 3  # phrasings vary
    held_texts = {p["text"] for p in by["heldout"]}
    assert not held_texts & ({p["text"] for p in by["train"]} | {p["target_text"] for p in by["train"]})


def test_same_command_same_bytes_other_seed_differs(corpus, tmp_path):
    out, _, _ = corpus
    again = tmp_path / "again"
    E.build_edit_corpus(str(again), pairs=PAIRS, seed=5, corpus_seed=2, progress=False)
    for name in ("train.jsonl", "heldout.jsonl", "corpus.json"):
        assert filecmp.cmp(out / name, again / name, shallow=False), name
    wavs = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs
                  if f.endswith(".wav"))
    assert len(wavs) == 2 * PAIRS
    for rel in wavs:
        assert filecmp.cmp(out / rel, again / rel, shallow=False), rel
    other = E.plan_pairs(bc.load_sentences(), pairs=PAIRS, seed=6, corpus_seed=2)
    assert [s["instruction"] for s in other] != [json.loads(ln)["instruction"] for ln in
                                                 ((out / "train.jsonl").read_text() +
                                                  (out / "heldout.jsonl").read_text()).splitlines()]


def test_cli_and_output_folder_rules(tmp_path, capsys):
    out = tmp_path / "cli"
    assert E.main(["--out", str(out), "--pairs", "12", "--seed", "1", "--quiet"]) == 0
    assert "12 edit pairs" in capsys.readouterr().out
    summary = json.loads((out / "corpus.json").read_text())
    assert summary["builder"] == "unitok_jax.data.build_edit_corpus" and summary["splits"]["heldout"]["pairs"] == 10
    assert E.main(["--out", str(out), "--pairs", "12", "--quiet"]) == 2  # not empty, no --overwrite
    assert "not empty" in capsys.readouterr().err
    assert E.main(["--out", str(out), "--pairs", "14", "--quiet", "--overwrite"]) == 0
    assert len(read_manifest(str(out / "train.jsonl"))) == 4
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    assert E.main(["--out", str(foreign), "--pairs", "12", "--quiet", "--overwrite"]) == 2
    assert (foreign / "x.txt").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    with pytest.raises(SystemExit):
        E.main(["--out", str(tmp_path / "z"), "--pairs", "1"])
