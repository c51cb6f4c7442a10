"""eSpeak NG wrapper, the offline corpus builder and the manifest builders for corpora on disk."""
from __future__ import annotations

import filecmp
import json
import os
import re

import numpy as np
import pytest
import soundfile as sf

from unitok_jax.audio import load_audio
from unitok_jax.data import build_corpus as bc
from unitok_jax.data import espeak, manifests
from unitok_jax.data.manifest import read_manifest

SHORT = "The cat sat down."
LONG = ("The cat sat down on the warm kitchen floor and watched the rain run slowly down the window "
        "for the whole afternoon.")


def _dur(wav: np.ndarray, sr: int = 16000) -> float:
    return len(wav) / sr


# ---------------------------------------------------------------- eSpeak wrapper


def test_synthesize_speech_at_16k():
    wav = espeak.synthesize(LONG, "en-us", 160)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert 3.0 < _dur(wav) < 12.0
    assert np.sqrt(np.mean(wav ** 2)) > 0.02 and np.abs(wav).max() <= 1.0
    assert espeak.native_rate() == 22050
    native = espeak.synthesize(LONG, "en-us", 160, sample_rate=None)
    assert abs(len(native) / 22050 - _dur(wav)) < 0.01  # same speech, resampled
    spec = np.abs(np.fft.rfft(wav))  # speech energy mostly below 4 kHz, not noise
    freqs = np.fft.rfftfreq(len(wav), 1 / 16000)
    assert spec[freqs < 4000].sum() > 3 * spec[freqs >= 4000].sum()
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?.*", espeak.version())


def test_duration_scales_with_text_and_rate():
    short, long = espeak.synthesize(SHORT), espeak.synthesize(LONG)
    assert _dur(long) > 3 * _dur(short)
    slow, fast = espeak.synthesize(LONG, rate=120), espeak.synthesize(LONG, rate=220)
    assert _dur(fast) < 0.75 * _dur(slow)
    gap = espeak.synthesize(LONG, rate=120, word_gap=10)
    assert _dur(gap) > _dur(slow) + 1.0  # 23 word gaps of 100 ms


def test_voices_differ_and_output_is_deterministic():
    m = espeak.synthesize(SHORT, "en-us+m1")
    f = espeak.synthesize(SHORT, "en-us+f2")
    gb = espeak.synthesize(SHORT, "en-gb")  # a language code resolves to its voice
    assert len({m.tobytes(), f.tobytes(), gb.tobytes()}) == 3
    assert np.array_equal(f, espeak.synthesize(SHORT, "en-us+f2"))
    loud = espeak.synthesize(SHORT, "en-us+f2", gain_db=-6.0)
    assert np.allclose(loud, f * 10 ** (-6 / 20), atol=1e-6)


def test_synthesize_is_thread_safe_and_order_independent():
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(SHORT, "en-gb+m3", 150), (LONG, "en-us+f2", 190), (SHORT, "en-029+f3", 170)] * 2
    with ThreadPoolExecutor(3) as pool:
        parallel = list(pool.map(lambda j: espeak.synthesize(*j), jobs))
    sequential = [espeak.synthesize(*j) for j in reversed(jobs)][::-1]
    assert all(np.array_equal(p, q) for p, q in zip(parallel, sequential))


@pytest.mark.parametrize("voice, needle", [("xx-nowhere", "unknown eSpeak voice 'xx-nowhere'"),
                                           ("en-us+nobody", "unknown eSpeak voice variant 'nobody'")])
def test_unknown_voice_is_a_clear_error(voice, needle):
    with pytest.raises(espeak.EspeakError, match=re.escape(needle)):
        espeak.synthesize(SHORT, voice)


def test_bad_parameters_are_clear_errors():
    with pytest.raises(espeak.EspeakError, match="rate=20"):
        espeak.synthesize(SHORT, rate=20)
    with pytest.raises(espeak.EspeakError, match="pitch=150"):
        espeak.synthesize(SHORT, pitch=150)
    with pytest.raises(espeak.EspeakError, match="empty"):
        espeak.synthesize("   ")


def test_all_corpus_voices_exist():
    for s in bc.SPEAKERS:
        espeak.check_voice(s["voice"])
    assert len({s["voice"] for s in bc.SPEAKERS}) == len(bc.SPEAKERS)


# ---------------------------------------------------------------- sentences and split plan


def test_packaged_sentences():
    sents = bc.load_sentences()
    assert 300 <= len(sents) <= 400
    assert len(set(sents)) == len(sents)
    counts = [len(s.split()) for s in sents]
    assert min(counts) >= 4 and max(counts) <= 20
    assert not any(re.search(r"\d", s) for s in sents)  # numbers are spelled out
    assert sum(s.endswith("?") for s in sents) >= 30


def test_plan_split_full_size():
    sents = bc.load_sentences()
    utts = bc.plan(sents, seed=0)
    assert utts == bc.plan(sents, seed=0)
    assert utts != bc.plan(sents, seed=1)
    held_spk = {s["id"] for s in bc.SPEAKERS if s["heldout"]}
    train = [u for u in utts if u["split"] == "train"]
    held = [u for u in utts if u["split"] == "heldout"]
    assert not {u["text"] for u in train} & {u["text"] for u in held}
    assert not {u["speaker"] for u in train} & held_spk
    assert {u["speaker"] for u in held} > held_spk  # held-out voices plus seen ones
    assert len({u["id"] for u in utts}) == len(utts)
    assert len({u["text"] for u in utts}) == len(sents)
    per_spk = {s: sum(u["speaker"] == s for u in train) for s in {u["speaker"] for u in train}}
    assert len(per_spk) == 8 and min(per_spk.values()) > 0.6 * max(per_spk.values())


def test_composed_sentences_are_many_distinct_and_deterministic():
    from unitok_jax.data.compose import compose_sentences

    hand = bc.load_sentences()
    comp = compose_sentences(4000, seed=0, exclude=hand)
    assert len(set(comp)) == 4000 and not set(comp) & set(hand)
    assert comp[:100] == compose_sentences(100, seed=0, exclude=hand)  # a larger list extends a smaller one
    assert comp != compose_sentences(4000, seed=1, exclude=hand)
    assert not any(re.search(r"\d|\{|\}", s) for s in comp)
    assert all(s[0].isupper() and s[-1] in ".?" for s in comp)
    assert len({w.lower().strip(".,?") for s in comp for w in s.split()}) > 500


def test_composed_sentences_join_the_training_split_only():
    """The handwritten split (and so the edit corpus's) is the same with or without composed sentences."""
    from unitok_jax.data.compose import compose_sentences

    sents = bc.load_sentences()
    base = bc.plan(sents, seed=0)
    extra = compose_sentences(300, seed=0, exclude=sents)
    utts = bc.plan(sents, seed=0, extra_train=extra + sents[:5], extra_readers=2)
    assert utts[: len(base)] == base
    added = utts[len(base):]
    assert len(added) == 2 * 300 and all(u["split"] == "train" for u in added)
    assert {u["text"] for u in added} == set(extra)
    assert len({u["id"] for u in utts}) == len(utts)
    assert not {u["speaker"] for u in added} & {s["id"] for s in bc.SPEAKERS if s["heldout"]}
    held = [u for u in utts if u["split"] == "heldout"]
    assert len({u["text"] for u in held}) == bc.MAX_HELDOUT  # 10% of 400, the cap


# ---------------------------------------------------------------- building a small corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    a, b = root / "a", root / "b"
    summary = bc.build_corpus(str(a), sentences=12, seed=3, progress=False)
    assert bc.main(["--out", str(b), "--sentences", "12", "--seed", "3", "--quiet"]) == 0
    return a, b, summary


def _files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_corpus_is_byte_identical(corpus):
    a, b, _ = corpus
    files = _files(a)
    assert files == _files(b)
    assert {"train.jsonl", "heldout.jsonl", "corpus.json"} <= set(files)
    assert sum(f.endswith(".wav") for f in files) == 12 * 3 - 2 * 3 + 2 * 3  # 10 train x 3, 2 held out x 3
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files)
    assert not [p for p in os.listdir(a.parent) if p.startswith(".")]  # no temporary folders left


def test_corpus_split_and_manifest(corpus):
    a, _, summary = corpus
    train, held = read_manifest(str(a / "train.jsonl")), read_manifest(str(a / "heldout.jsonl"))
    assert not train.errors and not held.errors
    assert len(train) == 30 and len(held) == 6
    assert not {r["text"] for r in train.records} & {r["text"] for r in held.records}
    held_spk = {s["id"] for s in bc.SPEAKERS if s["heldout"]}
    assert held_spk and not held_spk & {r["speaker"] for r in train.records}
    held_readers = {r["speaker"] for r in held.records}
    assert held_spk < held_readers and held_readers - held_spk  # unseen and seen voices
    for r in train.records[:4] + held.records[:4]:
        assert os.path.isabs(r["audio"]) and r["audio"].startswith(str(a))
        wav = load_audio(r["audio"])
        assert sf.info(r["audio"]).samplerate == 16000
        assert abs(len(wav) / 16000 - r["duration"]) < 1e-3
        assert np.abs(wav).max() > 0.1 and r["split"] in ("train", "heldout")
    with open(a / "train.jsonl") as f:
        assert json.loads(f.readline())["audio"].startswith("wavs/")  # relative: the folder can move
    on_disk = json.loads((a / "corpus.json").read_text())
    assert on_disk == summary
    assert summary["espeak_version"] == espeak.version()
    assert summary["total"]["utterances"] == 36 and len(summary["total"]["speakers"]) <= 10
    hours = sum(r["duration"] for r in train.records + held.records) / 3600
    assert summary["total"]["hours"] == pytest.approx(hours, abs=1e-3)


def test_corpus_refuses_non_empty_and_overwrites(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(bc.CorpusError, match="not empty"):
        bc.build_corpus(str(out), sentences=4, progress=False)
    with pytest.raises(bc.CorpusError, match="corpus.json"):  # --overwrite replaces only a previous corpus
        bc.build_corpus(str(out), sentences=4, progress=False, overwrite=True)
    assert bc.main(["--out", str(out), "--sentences", "4", "--quiet"]) == 2
    assert (out / "notes.txt").read_text() == "mine"
    new = tmp_path / "d"
    bc.build_corpus(str(new), sentences=4, progress=False)
    first = read_manifest(str(new / "train.jsonl"))
    bc.build_corpus(str(new), sentences=5, progress=False, overwrite=True)
    assert len(read_manifest(str(new / "train.jsonl"))) > len(first)
    assert sorted(os.listdir(tmp_path)) == ["c", "d"]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = espeak.synthesize

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(espeak, "synthesize", flaky)
    with pytest.raises(KeyboardInterrupt):
        bc.build_corpus(str(tmp_path / "c"), sentences=6, progress=False)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- manifests for corpora on disk


def _wav(path, seconds: float = 0.1, sr: int = 16000, fmt: str = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, format=fmt)


def _write_and_read(result, out):
    manifests.write(result.records, str(out))
    m = read_manifest(str(out))
    assert not m.errors and len(m) == len(result.records)
    assert all(os.path.isfile(r["audio"]) for r in m.records)
    return m


def test_librispeech_layout(tmp_path):
    ch = tmp_path / "LibriSpeech" / "train-clean" / "19" / "198"
    for i in (1, 2, 4):
        _wav(str(ch / f"19-198-000{i}.flac"), fmt="FLAC")
    (ch / "19-198.trans.txt").write_text("19-198-0001 NORTHANGER ABBEY\n19-198-0002 THIS LITTLE WORK\n"
                                         "19-198-0003 NO AUDIO FOR THIS ONE\n")
    tts = tmp_path / "LibriSpeech" / "LibriTTS" / "84" / "121123"
    _wav(str(tts / "84_121123_000007_000001.wav"), seconds=0.25, sr=24000)
    (tts / "84_121123_000007_000001.normalized.txt").write_text("Hello there, Mr. Smith.\n")
    (tts / "84_121123_000007_000001.original.txt").write_text("Hello there, Mr Smith!\n")
    _wav(str(tts / "84_121123_000008_000000.wav"))  # no transcript
    with pytest.warns(UserWarning, match=r"2 missing transcript.*|1 missing audio"):
        res = manifests.librispeech(str(tmp_path / "LibriSpeech"))
    assert [r["id"] for r in res.records] == ["19-198-0001", "19-198-0002", "84_121123_000007_000001"]
    assert [r["speaker"] for r in res.records] == ["19", "19", "84"]
    assert res.records[2]["text"] == "Hello there, Mr. Smith."
    assert res.records[2]["duration"] == pytest.approx(0.25)
    assert res.skipped == {"missing transcript": 2, "missing audio": 1}
    m = _write_and_read(res, tmp_path / "ls.jsonl")
    assert m.records[0]["text"] == "NORTHANGER ABBEY"
    with open(tmp_path / "ls.jsonl") as f:
        assert not os.path.isabs(json.loads(f.readline())["audio"])


def test_ljspeech_layout(tmp_path):
    root = tmp_path / "LJSpeech-1.1"
    _wav(str(root / "wavs" / "LJ001-0001.wav"))
    _wav(str(root / "wavs" / "LJ001-0002.wav"))
    _wav(str(root / "wavs" / "LJ001-0009.wav"))  # not in metadata
    (root / "metadata.csv").write_text(
        'LJ001-0001|Printing, in the 1st sense|Printing, in the first sense\n'
        'LJ001-0002|in being "comparatively" modern.|\n'
        'LJ001-0003|no wav for this one|no wav for this one\n'
        'garbage line without separators\n')
    with pytest.warns(UserWarning, match="LJSpeech"):
        res = manifests.ljspeech(str(root))
    assert [(r["id"], r["text"], r["speaker"]) for r in res.records] == [
        ("LJ001-0001", "Printing, in the first sense", "ljspeech"),
        ("LJ001-0002", 'in being "comparatively" modern.', "ljspeech")]
    assert res.skipped == {"missing audio": 1, "missing transcript": 1, "malformed metadata line": 1}
    out = tmp_path / "elsewhere" / "lj.jsonl"  # audio outside the manifest folder: absolute paths
    _write_and_read(res, out)
    with open(out) as f:
        assert os.path.isabs(json.loads(f.readline())["audio"])


def test_folder_layout_and_cli(tmp_path, capsys):
    root = tmp_path / "mine"
    _wav(str(root / "alice" / "a1.wav"))
    (root / "alice" / "a1.txt").write_text("  first line\nsecond line ")
    _wav(str(root / "bob" / "b1.wav"))
    (root / "bob" / "b1.txt").write_text("bob speaks")
    _wav(str(root / "bob" / "b2.wav"))  # missing transcript
    (root / "bob" / "b3.txt").write_text("no audio")
    _wav(str(root / "bob" / "b4.wav"))
    (root / "bob" / "b4.txt").write_text("   ")  # empty transcript
    (root / "bob" / "b5.wav").write_bytes(b"not audio at all")
    (root / "bob" / "b5.txt").write_text("broken file")
    with pytest.warns(UserWarning):
        res = manifests.folder(str(root))
    assert [(r["id"], r["text"], r["speaker"]) for r in res.records] == [
        ("alice/a1", "first line second line", "alice"), ("bob/b1", "bob speaks", "bob")]
    assert res.skipped == {"missing transcript": 1, "missing audio": 1, "empty transcript": 1,
                           "unreadable audio": 1}
    out = tmp_path / "folder.jsonl"
    assert manifests.main(["folder", str(root), "--out", str(out)]) == 0
    assert "2 utterances" in capsys.readouterr().out
    assert [r["id"] for r in read_manifest(str(out)).records] == ["alice/a1", "bob/b1"]


def test_nothing_found_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(manifests.ManifestBuildError, match="no usable"):
        manifests.folder(str(tmp_path / "empty"))
    with pytest.raises(manifests.ManifestBuildError, match="metadata.csv"):
        manifests.ljspeech(str(tmp_path / "empty"))
    with pytest.raises(manifests.ManifestBuildError, match="not a folder"):
        manifests.librispeech(str(tmp_path / "missing"))
    _wav(str(tmp_path / "only_audio" / "x.wav"))
    with pytest.warns(UserWarning), pytest.raises(manifests.ManifestBuildError, match="1 missing transcript"):
        manifests.folder(str(tmp_path / "only_audio"))
    assert manifests.main(["librispeech", str(tmp_path / "empty"), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "no usable" in capsys.readouterr().err and not (tmp_path / "m.jsonl").exists()
