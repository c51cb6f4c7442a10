"""Build a small English speech corpus offline with eSpeak NG (no network, no system packages).

    python -m unitok_jax.data.build_corpus --out data/espeak [--sentences N] [--composed M] [--seed 0] [--overwrite]

Writes into ``--out``::

    wavs/<speaker>/<id>.wav   16 kHz mono PCM-16
    train.jsonl               manifest (see unitok_jax.data.manifest), audio paths relative to the folder
    heldout.jsonl             held-out sentences, spoken by a seen speaker and by every held-out speaker
    corpus.json               summary: counts, hours, speakers, eSpeak version, parameters

Sentences come from ``sentences.txt`` (package data). A seeded numpy RNG picks the held-out sentences and which
seen speakers read each training sentence, so the same command gives a byte-identical corpus. Held-out
sentences never occur in train; held-out speakers (voices) occur only in ``heldout.jsonl``. ``--composed M`` adds
M sentences composed from templates and word lists (:mod:`unitok_jax.data.compose`) to the training split only,
each read by ``--composed-readers`` seen speakers (default 1): the held-out sentences stay the handwritten ones
(the same split as without them, so the edit corpus's split is unchanged), never a template's. The corpus is built
in a temporary sibling folder and renamed into place at the end: an interrupted run leaves ``--out`` untouched.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from importlib import resources
from typing import Optional, Sequence

import numpy as np

from unitok_jax.data import espeak
from unitok_jax.io import atomic_dir, write_json

SAMPLE_RATE = 16000
FORMAT_VERSION = 1
HELDOUT_FRACTION = 0.1
MIN_HELDOUT = 2  # a held-out speaker needs >= 2 utterances (one as voice prompt, one as target)
MAX_HELDOUT = 40  # held-out sentences at most (the evaluation's size)

# id, eSpeak voice, rate (words per minute), pitch (0..100), amplitude (0..200; < 100 keeps peaks below 0.9),
# held-out speakers appear only in heldout.jsonl
SPEAKERS: tuple[dict, ...] = (
    dict(id="us_m1", voice="en-us+m1", rate=165, pitch=45, volume=80, heldout=False),
    dict(id="us_f2", voice="en-us+f2", rate=150, pitch=55, volume=75, heldout=False),
    dict(id="gb_m3", voice="en-gb+m3", rate=175, pitch=40, volume=70, heldout=False),
    dict(id="gb_f4", voice="en-gb+f4", rate=145, pitch=60, volume=75, heldout=False),
    dict(id="scot_m2", voice="en-gb-scotland+m2", rate=160, pitch=50, volume=70, heldout=False),
    dict(id="rp_f1", voice="en-gb-x-rp+f1", rate=185, pitch=50, volume=70, heldout=False),
    dict(id="nyc_m6", voice="en-us-nyc+m6", rate=170, pitch=35, volume=80, heldout=False),
    dict(id="car_f3", voice="en-029+f3", rate=155, pitch=65, volume=75, heldout=False),
    dict(id="wmd_m4", voice="en-gb-x-gbcwmd+m4", rate=180, pitch=45, volume=70, heldout=True),
    dict(id="lan_f5", voice="en-gb-x-gbclan+f5", rate=140, pitch=58, volume=80, heldout=True),
)


class CorpusError(RuntimeError):
    """The corpus cannot be built (bad options, output folder in the way, no sentences)."""


def load_sentences(path: Optional[str] = None) -> list[str]:
    """Non-empty, stripped lines of ``path`` (default: the packaged ``sentences.txt``); ``#`` starts a comment."""
    if path is None:
        text = resources.files("unitok_jax.data").joinpath("sentences.txt").read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def plan(sentences: Sequence[str], *, seed: int = 0, per_sentence: int = 3, limit: Optional[int] = None,
         speakers: Sequence[dict] = SPEAKERS, extra_train: Sequence[str] = (), extra_readers: int = 1) -> list[dict]:
    """Deterministic list of utterances ``{id, text, speaker, split, sentence}`` (no audio yet).

    ``limit`` sentences are drawn (seeded) from ``sentences``; about 10% (at least 2, at most 40) are held out. Each
    training sentence is read by ``per_sentence`` distinct seen speakers; each held-out sentence by one seen speaker
    and every held-out speaker. ``extra_train``: more sentences for the training split only (those also in
    ``sentences`` are dropped), each read by ``extra_readers`` seen speakers drawn by an RNG of their own, so the
    plan of ``sentences`` is the same with or without them (ids ``<speaker>_c<n>``, ``sentence`` counting on after
    the pool)."""
    seen = [s["id"] for s in speakers if not s["heldout"]]
    unseen = [s["id"] for s in speakers if s["heldout"]]
    if not seen or not unseen:
        raise CorpusError("need at least one seen and one held-out speaker")
    if not 1 <= per_sentence <= len(seen):
        raise CorpusError(f"per_sentence must be in [1, {len(seen)}], got {per_sentence}")
    # duplicates would put one text in both splits
    unique = list(dict.fromkeys(sentences))
    n = len(unique) if limit is None else min(limit, len(unique))
    if n < MIN_HELDOUT + 1:
        raise CorpusError(f"need at least {MIN_HELDOUT + 1} distinct sentences, got {n}")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(unique))[:n]
    n_held = min(n - 1, max(MIN_HELDOUT, min(MAX_HELDOUT, round(HELDOUT_FRACTION * n))))
    held, train = sorted(chosen[:n_held]), sorted(chosen[n_held:])
    utts = []
    for i in train:
        for spk in sorted(rng.choice(len(seen), size=per_sentence, replace=False)):
            utts.append(dict(id=f"{seen[spk]}_{i:04d}", text=unique[i], speaker=seen[spk], split="train",
                             sentence=int(i)))
    for i in held:
        readers = [seen[int(rng.integers(len(seen)))]] + unseen
        for spk in readers:
            utts.append(dict(id=f"{spk}_{i:04d}", text=unique[i], speaker=spk, split="heldout", sentence=int(i)))
    if extra_train:
        if not 1 <= extra_readers <= len(seen):
            raise CorpusError(f"extra_readers must be in [1, {len(seen)}], got {extra_readers}")
        pool = set(unique)
        extra = [t for t in dict.fromkeys(extra_train) if t not in pool]
        rng_x = np.random.default_rng([seed, 1])
        for j, text in enumerate(extra):
            for spk in sorted(rng_x.choice(len(seen), size=extra_readers, replace=False)):
                utts.append(dict(id=f"{seen[spk]}_c{j:05d}", text=text, speaker=seen[spk], split="train",
                                 sentence=len(unique) + j))
    return utts


def build_corpus(out: str, *, sentences: Optional[int] = None, seed: int = 0, per_sentence: int = 3,
                 overwrite: bool = False, text_file: Optional[str] = None, progress: bool = True,
                 composed: int = 0, composed_readers: int = 1) -> dict:
    """Synthesise the corpus into ``out`` (see the module docstring) and return the ``corpus.json`` summary.

    Raises :class:`CorpusError` if ``out`` is a non-empty folder and ``overwrite`` is False (with ``overwrite``,
    only a folder holding a previous ``corpus.json`` is replaced), and
    :class:`~unitok_jax.data.espeak.EspeakError` if eSpeak NG is unusable."""
    from tqdm import tqdm

    from unitok_jax.audio import save_audio
    from unitok_jax.data.manifest import write_manifest

    out = check_output(out, overwrite)
    from unitok_jax.data.compose import compose_sentences

    all_sentences = load_sentences(text_file)
    extra = compose_sentences(composed, seed=seed, exclude=all_sentences) if composed else []
    utts = plan(all_sentences, seed=seed, per_sentence=per_sentence, limit=sentences, extra_train=extra,
                extra_readers=composed_readers)
    by_id = {s["id"]: s for s in SPEAKERS}
    for s in SPEAKERS:  # fail before any work on an unknown voice
        espeak.check_voice(s["voice"])

    with atomic_dir(out) as tmp:
        records: dict[str, list] = {"train": [], "heldout": []}
        for u in tqdm(utts, desc="synthesising", unit="utt", disable=not progress, file=sys.stderr):
            spk = by_id[u["speaker"]]
            wav = espeak.synthesize(u["text"], spk["voice"], spk["rate"], spk["pitch"], volume=spk["volume"],
                                    sample_rate=SAMPLE_RATE)
            rel = f"wavs/{u['speaker']}/{u['id']}.wav"
            save_audio(os.path.join(tmp, rel), wav, SAMPLE_RATE)
            records[u["split"]].append(dict(id=u["id"], audio=rel, text=u["text"], speaker=u["speaker"],
                                            duration=round(len(wav) / SAMPLE_RATE, 4), split=u["split"]))
        for split, recs in records.items():
            write_manifest(os.path.join(tmp, f"{split}.jsonl"), recs)
        summary = _summary(records, utts, all_sentences, seed=seed, per_sentence=per_sentence, limit=sentences,
                           composed=composed, composed_readers=composed_readers)
        write_json(os.path.join(tmp, "corpus.json"), summary, indent=2)
    return summary


def check_output(out: str, overwrite: bool) -> str:
    """Absolute ``out`` after checking it may be written: absent, an empty folder, or (with ``overwrite``) a
    folder holding a previous ``corpus.json``. Raises :class:`CorpusError` otherwise."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CorpusError(f"{out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise CorpusError(f"{out} is not empty; pass --overwrite to replace it")
        if not os.path.isfile(os.path.join(out, "corpus.json")):
            raise CorpusError(f"{out} is not empty and holds no corpus.json; refusing to replace a folder this "
                              f"tool did not write")
    return out


def _summary(records: dict, utts: list, all_sentences: list, *, seed: int, per_sentence: int,
             limit: Optional[int], composed: int = 0, composed_readers: int = 1) -> dict:
    def stats(recs: list) -> dict:
        return {"utterances": len(recs), "sentences": len({r["text"] for r in recs}),
                "speakers": sorted({r["speaker"] for r in recs}),
                "hours": round(sum(r["duration"] for r in recs) / 3600, 4)}

    every = records["train"] + records["heldout"]
    return {
        "format_version": FORMAT_VERSION,
        "builder": "unitok_jax.data.build_corpus",
        "synthesiser": f"eSpeak NG {espeak.version()}",
        "espeak_version": espeak.version(),
        "sample_rate": SAMPLE_RATE,
        "audio_format": "WAV PCM_16 mono",
        "parameters": {"seed": seed, "sentences": limit, "per_sentence": per_sentence,
                       "heldout_fraction": HELDOUT_FRACTION, "min_heldout": MIN_HELDOUT, "max_heldout": MAX_HELDOUT,
                       "composed": composed, "composed_readers": composed_readers},
        "sentence_pool": {"count": len(all_sentences),
                          "sha256": hashlib.sha256("\n".join(all_sentences).encode()).hexdigest()},
        "total": stats(every),
        "splits": {k: stats(v) for k, v in records.items()},
        "speakers": [dict(s, utterances=sum(u["speaker"] == s["id"] for u in utts)) for s in SPEAKERS],
        "manifests": {"train": "train.jsonl", "heldout": "heldout.jsonl"},
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unitok_jax.data.build_corpus", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (must be empty or absent, see --overwrite)")
    p.add_argument("--sentences", type=int, default=None, metavar="N",
                   help="use only N sentences (a seeded random subset; default: all)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed for the split and speaker assignment")
    p.add_argument("--per-sentence", type=int, default=3, metavar="K",
                   help="seen speakers reading each training sentence (default 3)")
    p.add_argument("--text", default=None, metavar="FILE", help="sentences file, one per line (default: packaged)")
    p.add_argument("--composed", type=int, default=0, metavar="M",
                   help="add M template-composed sentences to the training split (default 0)")
    p.add_argument("--composed-readers", type=int, default=1, metavar="K",
                   help="seen speakers reading each composed sentence (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.sentences is not None and args.sentences < 1:
        p.error("--sentences must be positive")
    if args.composed < 0:
        p.error("--composed must be >= 0")
    try:
        s = build_corpus(args.out, sentences=args.sentences, seed=args.seed, per_sentence=args.per_sentence,
                         overwrite=args.overwrite, text_file=args.text, progress=not args.quiet,
                         composed=args.composed, composed_readers=args.composed_readers)
    except (CorpusError, espeak.EspeakError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = s["total"]
    print(f"{args.out}: {t['utterances']} utterances, {t['hours']:.3f} h, {len(t['speakers'])} speakers "
          f"(train {s['splits']['train']['utterances']}, heldout {s['splits']['heldout']['utterances']}); "
          f"eSpeak NG {s['espeak_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
