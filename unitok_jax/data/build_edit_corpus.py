"""Build an offline speech-editing corpus with eSpeak NG (spec §1.4, §5.6, §7.3; no network, no noise files).

    python -m unitok_jax.data.build_edit_corpus --out data/espeak_edit [--pairs 400] [--seed 0] [--corpus-seed 0]
                                                [--corpus-sentences N] [--text FILE] [--overwrite] [--quiet]

Each example is a pair (source speech, instruction, target transcript, target speech) of one of ten edit types:

* semantic (the model writes ``<cot_text>{target_markup}</cot_text><gen_audio>``, then the target speech):
  ``delete`` (one word removed), ``insert`` (one word added before a word), ``substitute`` (one word replaced).
  Source and target sentences are synthesised with the same voice, rate and pitch. Word lists keep most edits
  grammatical (an adjective inserted after a determiner, a substitute from the same word group such as numbers,
  colours or prepositions, a modifier deleted where there is one; "a"/"an" always fit).
* acoustic (the model writes ``<gen_audio>`` directly; same transcript): ``faster`` / ``slower`` (eSpeak speaking
  rate x / ÷ 1.3 or 1.5), ``louder`` / ``quieter`` (6, 9 or 12 dB of gain: the louder side is the speaker's
  normal level, so nothing clips), ``voice`` (the same sentence by another speaker, described in the instruction
  by gender and accent), ``add_noise`` / ``denoise`` (white or pink noise from a seeded numpy RNG mixed in at
  5, 10 or 15 dB SNR, relative to the clean signal's RMS over the whole file; ``denoise`` swaps the two sides).

Instructions come in 4–5 phrasings per edit type (one of the semantic ones in the release's style, "Please
recognize the language of this speech and transcribe it. And ..."); words are quoted, and semantic edits only
touch a lower-case word that occurs once in the sentence, so every instruction is unambiguous.

Markup (spec §1.4, §7.3): ``target_markup`` is the target transcript with the edited span replaced by one
``<edit>…</edit>`` token, space-separated like a word: ``<edit><framePatch></edit>`` where new content goes
(insert, substitute; the new word itself is masked, it is in the instruction) and ``<edit></edit>`` where a word
was deleted. Source "The cat sat down." -> delete "cat": ``The <edit></edit> sat down.``; insert "really" before
"sat": ``The cat <edit><framePatch></edit> sat down.``. Acoustic edits have ``target_markup`` null, which is how
:func:`unitok_jax.training.lm_data.edit_example` tells the two kinds apart.

Writes into ``--out``::

    wavs/<split>/<id>_src.wav, wavs/<split>/<id>_tgt.wav   16 kHz mono PCM-16
    train.jsonl, heldout.jsonl                            one pair per line (fields below)
    corpus.json                                           summary: counts per split and edit type, parameters

Manifest fields. The first six are the speech-manifest fields of :mod:`unitok_jax.data.manifest` and describe
the *source*, so :func:`~unitok_jax.data.manifest.read_manifest` reads these files as they are (it makes only
``audio`` absolute; resolve ``target_audio`` against the manifest's folder yourself):

* ``id`` (``"<split>_<nnnn>_<edit_type>"``), ``audio`` (source wav, relative), ``text`` (source transcript),
  ``speaker`` (source speaker id of :data:`~unitok_jax.data.build_corpus.SPEAKERS`), ``duration`` (source
  seconds), ``split`` (``"train"`` / ``"heldout"``);
* ``target_audio``, ``target_text``, ``target_speaker``, ``target_duration``: the same for the target;
* ``instruction``: the edit instruction (the ``{instruction}`` of :func:`unitok_jax.text.edit_prompt`);
* ``edit_type``: one of :data:`EDIT_TYPES`; ``edit_kind``: ``"semantic"`` or ``"acoustic"``;
* ``target_markup``: the ``<edit>`` form above (semantic), or null (acoustic);
* ``edit_params``: what was done — semantic: ``index`` (0-based word index in the source), ``old`` (source word,
  ``""`` for insert), ``new`` (target word, ``""`` for delete); faster/slower: ``source_rate``, ``target_rate``
  (words per minute); louder/quieter: ``source_gain_db``, ``target_gain_db``; voice: ``source_speaker``,
  ``target_speaker``; add_noise/denoise: ``noise`` (``"white"``/``"pink"``), ``snr_db``;
* ``sentence``: index of the source sentence in the de-duplicated sentence pool (as ``build_corpus.plan``).

Split: the held-out sentences are exactly those that ``python -m unitok_jax.data.build_corpus --seed
<corpus-seed> [--sentences <corpus-sentences>]`` holds out (its :func:`~unitok_jax.data.build_corpus.plan`),
train pairs use only its training sentences and only seen speakers (source and target), held-out pairs use
held-out sentences, with a held-out voice as the source half of the time. About 10% of the pairs (at least one per
edit type) are held out. Everything is drawn from numpy RNGs seeded by ``--seed`` (the noise per pair), so the same
command gives a byte-identical corpus; it is built in a temporary sibling folder and renamed into place.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from typing import Optional, Sequence

import numpy as np

from unitok_jax.data import espeak
from unitok_jax.data.build_corpus import (HELDOUT_FRACTION, SAMPLE_RATE, SPEAKERS, CorpusError, check_output,
                                          load_sentences, plan)
from unitok_jax.io import atomic_dir, write_json
from unitok_jax.text import SPECIAL_TOKENS

FORMAT_VERSION = 1
DEFAULT_PAIRS = 400

SEMANTIC_TYPES = ("delete", "insert", "substitute")
ACOUSTIC_TYPES = ("faster", "slower", "louder", "quieter", "voice", "add_noise", "denoise")
EDIT_TYPES = SEMANTIC_TYPES + ACOUSTIC_TYPES

EDIT_MARK = SPECIAL_TOKENS["edit"] + SPECIAL_TOKENS["frame_patch"] + SPECIAL_TOKENS["edit_end"]  # new content
DELETE_MARK = SPECIAL_TOKENS["edit"] + SPECIAL_TOKENS["edit_end"]  # a deleted span holds nothing

SPEED_FACTORS = (1.3, 1.5)
GAINS_DB = (6.0, 9.0, 12.0)
SNRS_DB = (5.0, 10.0, 15.0)
NOISE_KINDS = ("white", "pink")
# Word lists that keep most edits grammatical. Insert: an adjective after a determiner ("the cat" -> "the big
# cat"), else an adverb. Substitute: a word of the same group. Delete: preferably a modifier. Other edits fall back
# to any plain word (and, for substitution, a word of the split's vocabulary with the same ending).
INSERT_ADJECTIVES = ("big", "small", "lovely", "strange", "quiet", "bright", "famous", "friendly", "busy", "little")
INSERT_ADVERBS = ("really", "just", "also", "still", "quite", "perhaps", "certainly", "actually", "truly", "simply")
DETERMINERS = frozenset({"the", "a", "this", "that", "his", "my", "your", "our", "their", "every"})
SUBSTITUTION_GROUPS: tuple[tuple[str, ...], ...] = (
    ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty", "thirty",
     "forty", "fifty", "hundred"),
    ("red", "blue", "green", "yellow", "black", "white", "grey", "brown", "orange", "purple"),
    ("small", "tiny", "little", "enormous", "huge", "large", "big", "tall"),
    ("cold", "warm", "hot", "cool"),
    ("old", "new", "young"),
    ("under", "above", "behind", "beside", "near", "inside", "outside", "beneath", "across", "along", "through",
     "over", "around"),
    ("before", "after"),
    ("morning", "evening", "afternoon", "night"),
    ("his", "my", "your", "our", "their"),
    ("this", "that"),
    ("every", "each"),
    ("slowly", "quickly", "quietly", "softly", "loudly", "carefully", "gently"),
    ("always", "never", "often", "sometimes", "usually", "rarely"),
    ("first", "second", "third", "last", "next"),
    ("could", "would", "should", "might"),
    ("once", "twice"),
    ("cat", "dog", "horse", "fox", "rabbit", "goat", "cow"),
    ("tea", "coffee", "soup", "milk", "juice", "cake", "bread"),
    ("kitchen", "garden", "library", "museum", "village", "market", "station", "bakery", "hotel", "shop", "beach"),
    ("teacher", "baker", "painter", "doctor", "captain", "farmer", "driver"),
    ("rain", "snow", "wind", "fog"),
)
DELETABLE = frozenset(w for g in SUBSTITUTION_GROUPS[1:5] + SUBSTITUTION_GROUPS[11:13] for w in g) | frozenset(
    INSERT_ADVERBS + ("very", "nearly", "almost", "finally", "suddenly", "completely", "already", "twice"))
RELEASE_PREFIX = "Please recognize the language of this speech and transcribe it. And "

# speaker id -> (gender, accent) for voice-change instructions; every speaker of build_corpus.SPEAKERS needs one
VOICE_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "us_m1": ("male", "American"),
    "us_f2": ("female", "American"),
    "gb_m3": ("male", "British"),
    "gb_f4": ("female", "British"),
    "scot_m2": ("male", "Scottish"),
    "rp_f1": ("female", "Received Pronunciation"),
    "nyc_m6": ("male", "New York"),
    "car_f3": ("female", "Caribbean"),
    "wmd_m4": ("male", "West Midlands"),
    "lan_f5": ("female", "Lancashire"),
}

# Phrasings per edit type. Fields: {w} word to delete, {n} new word, {o} old word, {b} word before which to
# insert, {p} its 1-based position, {gender}, {accent}, {a_accent} ("an American" / "a British").
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "delete": ("Delete the word '{w}'.", "Remove '{w}' from the speech.", RELEASE_PREFIX + "delete '{w}'.",
               "Cut out word number {p}, '{w}'.", "Take out the word '{w}' and keep everything else the same."),
    "insert": ("Insert '{n}' before '{b}'.", "Add the word '{n}' right before '{b}'.",
               RELEASE_PREFIX + "insert '{n}' before word number {p}.", "Say '{n}' just before '{b}'."),
    "substitute": ("Replace '{o}' with '{n}'.", "Substitute '{n}' for '{o}'.", "Change the word '{o}' to '{n}'.",
                   RELEASE_PREFIX + "substitute '{o}' with '{n}'."),
    "faster": ("Speak faster.", "Make the speech faster.", "Speed this up.", "Increase the speaking rate.",
               "Say it more quickly."),
    "slower": ("Speak more slowly.", "Slow the speech down.", "Make it slower.", "Decrease the speaking rate.",
               "Say it at a slower pace."),
    "louder": ("Make it louder.", "Turn the volume up.", "Increase the volume.", "Speak louder.",
               "Boost the loudness of this recording."),
    "quieter": ("Make it quieter.", "Turn the volume down.", "Lower the volume.", "Speak more softly.",
                "Reduce the loudness of this recording."),
    "voice": ("Change the voice to a {gender} speaker with {a_accent} accent.",
              "Make it sound like a {gender} speaker with {a_accent} accent said this.",
              "Say this again in a {gender} voice with {a_accent} accent.",
              "Convert the speaker to a {gender} voice, {accent} accent."),
    "add_noise": ("Add background noise.", "Add some noise in the background.",
                  "Make it sound like a noisy recording.", "Mix a hiss of background noise into the speech."),
    "denoise": ("Remove the background noise.", "Denoise this recording.", "Clean up the noise.",
                "Get rid of the hiss in the background.", "Make the recording clean and noise-free."),
}

_WORD = re.compile(r"[a-z]+")
_BY_ID = {s["id"]: s for s in SPEAKERS}


def edit_kind(edit_type: str) -> str:
    """``"semantic"`` for delete / insert / substitute, ``"acoustic"`` for the others."""
    if edit_type not in EDIT_TYPES:
        raise ValueError(f"unknown edit type {edit_type!r}; known: {', '.join(EDIT_TYPES)}")
    return "semantic" if edit_type in SEMANTIC_TYPES else "acoustic"


# --------------------------------------------------------------------------------------------- text edits


def _bare(token: str) -> str:
    """A token without surrounding punctuation, lower-cased (``"salt,"`` -> ``"salt"``)."""
    return token.strip(".,;:!?\"'()").lower()


def _editable(words: Sequence[str]) -> list[int]:
    """Indices (>= 1, so capitals stay put) of plain lower-case words that occur once in the sentence."""
    bare = [_bare(w) for w in words]
    return [k for k, w in enumerate(words) if k >= 1 and _WORD.fullmatch(w) and bare.count(w) == 1]


def semantic_edit(text: str, edit_type: str, index: int, new: str = "") -> dict:
    """Apply a one-word edit to ``text`` (words split on whitespace) and return ``{target_text, target_markup,
    old, new}``. ``delete`` removes word ``index``; ``insert`` puts ``new`` before word ``index``;
    ``substitute`` replaces word ``index`` by ``new``. The markup is the target transcript with the edited span
    replaced by :data:`DELETE_MARK` (delete) or :data:`EDIT_MARK` (insert, substitute)."""
    words = text.split()
    if not 0 <= index < len(words) + (edit_type == "insert"):
        raise ValueError(f"word index {index} out of range for {text!r}")
    if edit_type == "delete":
        old, new = words[index], ""
        target, markup = words[:index] + words[index + 1:], words[:index] + [DELETE_MARK] + words[index + 1:]
    elif edit_type == "insert":
        old = ""
        target, markup = words[:index] + [new] + words[index:], words[:index] + [EDIT_MARK] + words[index:]
    elif edit_type == "substitute":
        old = words[index]
        target, markup = words[:index] + [new] + words[index + 1:], words[:index] + [EDIT_MARK] + words[index + 1:]
    else:
        raise ValueError(f"not a semantic edit type: {edit_type!r}")
    if edit_type != "delete" and not new.strip():
        raise ValueError(f"{edit_type} needs a new word")
    return {"target_text": " ".join(target), "target_markup": " ".join(markup), "old": old, "new": new}


def _vocabulary(sentences: Sequence[str]) -> list[str]:
    """Sorted plain lower-case words (3+ letters) of ``sentences``: substitution candidates."""
    return sorted({w for s in sentences for w in s.split() if _WORD.fullmatch(w) and len(w) >= 3})


def _article_ok(words: Sequence[str], k: int) -> bool:
    """False when ``words[k - 1]`` is "a"/"an" and does not fit ``words[k]`` (first-letter rule)."""
    if not 1 <= k < len(words) or words[k - 1].lower() not in ("a", "an"):
        return True
    return _a(_bare(words[k])).split()[0] == words[k - 1].lower()


def choose_semantic_edit(edit_type: str, words: Sequence[str], vocab: Sequence[str],
                         rng: np.random.Generator) -> Optional[tuple[int, str]]:
    """A seeded ``(index, new word)`` for a one-word ``edit_type`` edit of ``words`` (see :func:`semantic_edit`),
    or None when the sentence allows none. Only plain lower-case words that occur once (and not the first word)
    are edited or used as insertion anchors; "a"/"an" before the edit point must still fit."""
    cands = _editable(words)
    bare = {_bare(w) for w in words}

    def fits(k: int, new: str) -> bool:
        target = list(words)
        if edit_type == "delete":
            del target[k]
        else:
            target[k:k + (edit_type == "substitute")] = [new]
        return _article_ok(target, k)

    preferred: list = []
    fallback: list = []
    if edit_type == "delete":
        if len(words) >= 3:
            fallback = [(k, "") for k in cands if fits(k, "")]
            preferred = [o for o in fallback if words[o[0]] in DELETABLE]
    elif edit_type == "insert":
        preferred = [(k, a) for k in cands if words[k - 1].lower() in DETERMINERS for a in INSERT_ADJECTIVES
                     if a not in bare and fits(k, a)]
        fallback = [(k, a) for k in cands for a in INSERT_ADVERBS if a not in bare and fits(k, a)]
    elif edit_type == "substitute":
        for k in cands:
            for g in SUBSTITUTION_GROUPS:
                if words[k] in g:
                    preferred += [(k, w) for w in g if w not in bare and fits(k, w)]
            pool = [w for w in vocab if w not in bare]
            same = [w for w in pool if w[-2:] == words[k][-2:]]
            fallback += [(k, w) for w in (same or pool) if fits(k, w)]
    else:
        raise ValueError(f"not a semantic edit type: {edit_type!r}")
    options = preferred or fallback
    return options[int(rng.integers(len(options)))] if options else None


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


# --------------------------------------------------------------------------------------------- planning


def split_sentences(sentences: Sequence[str], corpus_seed: int = 0,
                    corpus_sentences: Optional[int] = None) -> dict[str, list[int]]:
    """``{"train": [...], "heldout": [...]}`` sentence indices (into the de-duplicated pool) exactly as
    ``build_corpus --seed corpus_seed [--sentences corpus_sentences]`` splits them."""
    out: dict[str, set] = {"train": set(), "heldout": set()}
    for u in plan(sentences, seed=corpus_seed, limit=corpus_sentences):
        out[u["split"]].add(u["sentence"])
    return {k: sorted(v) for k, v in out.items()}


def plan_pairs(sentences: Sequence[str], *, pairs: int = DEFAULT_PAIRS, seed: int = 0, corpus_seed: int = 0,
               corpus_sentences: Optional[int] = None) -> list[dict]:
    """Deterministic list of pair specs (everything but the audio): the manifest fields except durations, plus
    the synthesis settings ``source_rate`` / ``target_rate`` / ``source_gain_db`` / ``target_gain_db`` and the
    noise settings. Edit types go round-robin, so each split is balanced over :data:`EDIT_TYPES`."""
    if pairs < 2:
        raise CorpusError(f"--pairs must be at least 2, got {pairs}")
    missing = [s["id"] for s in SPEAKERS if s["id"] not in VOICE_DESCRIPTIONS]
    if missing:
        raise CorpusError(f"no voice description for speakers {missing}; add them to VOICE_DESCRIPTIONS")
    unique = list(dict.fromkeys(sentences))
    split = split_sentences(unique, corpus_seed, corpus_sentences)
    seen = [s["id"] for s in SPEAKERS if not s["heldout"]]
    unseen = [s["id"] for s in SPEAKERS if s["heldout"]]
    n_held = min(pairs - 1, max(len(EDIT_TYPES), round(HELDOUT_FRACTION * pairs)))
    rng = np.random.default_rng(seed)
    specs = []
    for name, count in (("train", pairs - n_held), ("heldout", n_held)):
        idx = split[name]
        vocab = _vocabulary([unique[i] for i in idx])
        order: list[int] = []
        for j in range(count):
            etype = EDIT_TYPES[j % len(EDIT_TYPES)]
            for _ in range(1000):  # redraw sentences a semantic edit cannot use
                if not order:
                    order = [idx[int(k)] for k in rng.permutation(len(idx))]
                sent = order.pop()
                choice = None
                if edit_kind(etype) == "acoustic":
                    break
                choice = choose_semantic_edit(etype, unique[sent].split(), vocab, rng)
                if choice is not None:
                    break
            else:
                raise CorpusError(f"no sentence of the {name} split allows a {etype} edit")
            if name == "train":
                speaker = seen[int(rng.integers(len(seen)))]
            else:
                pool = unseen if rng.random() < 0.5 else seen
                speaker = pool[int(rng.integers(len(pool)))]
            spec = _plan_one(etype, unique[sent], speaker, rng, choice,
                             voices=seen if name == "train" else seen + unseen)
            rid = f"{name}_{j:04d}_{etype}"
            spec.update(id=rid, audio=f"wavs/{name}/{rid}_src.wav", target_audio=f"wavs/{name}/{rid}_tgt.wav",
                        split=name, sentence=int(sent), noise_seed=[int(seed), len(specs)])
            specs.append(spec)
    return specs


def _plan_one(etype: str, text: str, speaker: str, rng: np.random.Generator, choice: Optional[tuple[int, str]],
              voices: Sequence[str]) -> dict:
    spk = _BY_ID[speaker]
    words = text.split()
    fields: dict = {}
    s = dict(text=text, speaker=speaker, target_text=text, target_speaker=speaker, edit_type=etype,
             edit_kind=edit_kind(etype), target_markup=None, source_rate=spk["rate"], target_rate=spk["rate"],
             source_gain_db=0.0, target_gain_db=0.0, noise=None, snr_db=None)
    if etype in SEMANTIC_TYPES:
        k, new = choice
        e = semantic_edit(text, etype, k, new)
        s.update(target_text=e["target_text"], target_markup=e["target_markup"])
        params = dict(index=k, old=e["old"], new=e["new"])
        fields = dict(w=e["old"], o=e["old"], n=e["new"], b=_bare(words[k]), p=k + 1)
    elif etype in ("faster", "slower"):
        f = SPEED_FACTORS[int(rng.integers(len(SPEED_FACTORS)))]
        rate = spk["rate"] * f if etype == "faster" else spk["rate"] / f
        s["target_rate"] = int(np.clip(round(rate), *espeak.RATE_RANGE))
        params = dict(source_rate=s["source_rate"], target_rate=s["target_rate"])
    elif etype in ("louder", "quieter"):
        g = GAINS_DB[int(rng.integers(len(GAINS_DB)))]
        s["source_gain_db" if etype == "louder" else "target_gain_db"] = -g
        params = dict(source_gain_db=s["source_gain_db"], target_gain_db=s["target_gain_db"])
    elif etype == "voice":
        others = [v for v in voices if v != speaker]
        s["target_speaker"] = others[int(rng.integers(len(others)))]
        gender, accent = VOICE_DESCRIPTIONS[s["target_speaker"]]
        fields = dict(gender=gender, accent=accent, a_accent=_a(accent))
        params = dict(source_speaker=speaker, target_speaker=s["target_speaker"])
    else:  # add_noise / denoise
        s["noise"] = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
        s["snr_db"] = SNRS_DB[int(rng.integers(len(SNRS_DB)))]
        params = dict(noise=s["noise"], snr_db=s["snr_db"])
    phrasings = INSTRUCTIONS[etype]
    s["instruction"] = phrasings[int(rng.integers(len(phrasings)))].format(**fields)
    s["edit_params"] = params
    return s


# --------------------------------------------------------------------------------------------- audio


def make_noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of unit-RMS ``"white"`` or ``"pink"`` (1/f power, shaped in the frequency domain) noise."""
    white = rng.standard_normal(n)
    if kind == "pink":
        spec = np.fft.rfft(white)
        f = np.arange(len(spec), dtype=np.float64)
        f[0] = 1.0
        white = np.fft.irfft(spec / np.sqrt(f), n)
    elif kind != "white":
        raise ValueError(f"unknown noise kind {kind!r}; known: {NOISE_KINDS}")
    white = white - white.mean()
    return white / max(float(np.sqrt(np.mean(white ** 2))), 1e-12)


def add_noise(clean: np.ndarray, snr_db: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``clean`` plus ``kind`` noise at ``snr_db`` (ratio of the mean powers over the whole file), clipped to
    [-1, 1], float32."""
    power = float(np.mean(np.asarray(clean, np.float64) ** 2))
    noise = make_noise(len(clean), kind, rng) * np.sqrt(power / 10.0 ** (snr_db / 10.0))
    return np.clip(clean + noise, -1.0, 1.0).astype(np.float32)


def _speak(text: str, speaker: str, rate: int, gain_db: float) -> np.ndarray:
    spk = _BY_ID[speaker]
    return espeak.synthesize(text, spk["voice"], rate, spk["pitch"], volume=spk["volume"], gain_db=gain_db,
                             sample_rate=SAMPLE_RATE)


def render_pair(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) float32 waveforms at :data:`SAMPLE_RATE` for a spec of :func:`plan_pairs`."""
    src = _speak(spec["text"], spec["speaker"], spec["source_rate"], spec["source_gain_db"])
    if spec["noise"] is not None:
        noisy = add_noise(src, spec["snr_db"], spec["noise"], np.random.default_rng(spec["noise_seed"]))
        return (src, noisy) if spec["edit_type"] == "add_noise" else (noisy, src)
    return src, _speak(spec["target_text"], spec["target_speaker"], spec["target_rate"], spec["target_gain_db"])


_RECORD_KEYS = ("id", "audio", "text", "speaker", "duration", "split", "target_audio", "target_text",
                "target_speaker", "target_duration", "instruction", "edit_type", "edit_kind", "target_markup",
                "edit_params", "sentence")


def build_edit_corpus(out: str, *, pairs: int = DEFAULT_PAIRS, seed: int = 0, corpus_seed: int = 0,
                      corpus_sentences: Optional[int] = None, overwrite: bool = False,
                      text_file: Optional[str] = None, progress: bool = True) -> dict:
    """Synthesise the edit corpus into ``out`` (see the module docstring) and return the ``corpus.json`` summary.

    Raises :class:`~unitok_jax.data.build_corpus.CorpusError` for bad options or an output folder in the way
    (``overwrite`` replaces only a folder holding a previous ``corpus.json``), and
    :class:`~unitok_jax.data.espeak.EspeakError` if eSpeak NG is unusable."""
    from tqdm import tqdm

    from unitok_jax.audio import save_audio
    from unitok_jax.data.manifest import write_manifest

    out = check_output(out, overwrite)
    all_sentences = load_sentences(text_file)
    specs = plan_pairs(all_sentences, pairs=pairs, seed=seed, corpus_seed=corpus_seed,
                       corpus_sentences=corpus_sentences)
    for s in SPEAKERS:  # fail before any work on an unknown voice
        espeak.check_voice(s["voice"])
    with atomic_dir(out) as tmp:
        records: dict[str, list] = {"train": [], "heldout": []}
        for spec in tqdm(specs, desc="synthesising pairs", unit="pair", disable=not progress, file=sys.stderr):
            src, tgt = render_pair(spec)
            save_audio(os.path.join(tmp, spec["audio"]), src, SAMPLE_RATE)
            save_audio(os.path.join(tmp, spec["target_audio"]), tgt, SAMPLE_RATE)
            rec = dict(spec, duration=round(len(src) / SAMPLE_RATE, 4),
                       target_duration=round(len(tgt) / SAMPLE_RATE, 4))
            records[spec["split"]].append({k: rec[k] for k in _RECORD_KEYS})
        for split, recs in records.items():
            write_manifest(os.path.join(tmp, f"{split}.jsonl"), recs)
        summary = _summary(records, all_sentences, pairs=pairs, seed=seed, corpus_seed=corpus_seed,
                           corpus_sentences=corpus_sentences)
        write_json(os.path.join(tmp, "corpus.json"), summary, indent=2)
    return summary


def _summary(records: dict, all_sentences: list, *, pairs: int, seed: int, corpus_seed: int,
             corpus_sentences: Optional[int]) -> dict:
    def stats(recs: list) -> dict:
        return {"pairs": len(recs),
                "edit_types": {t: sum(r["edit_type"] == t for r in recs) for t in EDIT_TYPES},
                "sentences": len({r["sentence"] for r in recs}),
                "speakers": sorted({r["speaker"] for r in recs} | {r["target_speaker"] for r in recs}),
                "hours": round(sum(r["duration"] + r["target_duration"] for r in recs) / 3600, 4)}

    return {
        "format_version": FORMAT_VERSION,
        "builder": "unitok_jax.data.build_edit_corpus",
        "synthesiser": f"eSpeak NG {espeak.version()}",
        "espeak_version": espeak.version(),
        "sample_rate": SAMPLE_RATE,
        "audio_format": "WAV PCM_16 mono",
        "parameters": {"pairs": pairs, "seed": seed, "corpus_seed": corpus_seed,
                       "corpus_sentences": corpus_sentences, "heldout_fraction": HELDOUT_FRACTION,
                       "speed_factors": list(SPEED_FACTORS), "gains_db": list(GAINS_DB), "snrs_db": list(SNRS_DB),
                       "noise_kinds": list(NOISE_KINDS)},
        "sentence_pool": {"count": len(all_sentences),
                          "sha256": hashlib.sha256("\n".join(all_sentences).encode()).hexdigest()},
        "edit_kinds": {t: edit_kind(t) for t in EDIT_TYPES},
        "total": stats(records["train"] + records["heldout"]),
        "splits": {k: stats(v) for k, v in records.items()},
        "manifests": {"train": "train.jsonl", "heldout": "heldout.jsonl"},
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unitok_jax.data.build_edit_corpus",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (must be empty or absent, see --overwrite)")
    p.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, metavar="N",
                   help=f"pairs in all, about 10%% held out (default {DEFAULT_PAIRS})")
    p.add_argument("--seed", type=int, default=0, help="RNG seed for the pairs (sentences, edits, noise)")
    p.add_argument("--corpus-seed", type=int, default=0,
                   help="hold out the sentences that build_corpus --seed S holds out (default 0)")
    p.add_argument("--corpus-sentences", type=int, default=None, metavar="N",
                   help="... built with build_corpus --sentences N (default: all sentences)")
    p.add_argument("--text", default=None, metavar="FILE", help="sentences file, one per line (default: packaged)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.pairs < 2:
        p.error("--pairs must be at least 2")
    if args.corpus_sentences is not None and args.corpus_sentences < 1:
        p.error("--corpus-sentences must be positive")
    try:
        s = build_edit_corpus(args.out, pairs=args.pairs, seed=args.seed, corpus_seed=args.corpus_seed,
                              corpus_sentences=args.corpus_sentences, overwrite=args.overwrite,
                              text_file=args.text, progress=not args.quiet)
    except (CorpusError, espeak.EspeakError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = s["total"]
    print(f"{args.out}: {t['pairs']} edit pairs, {t['hours']:.3f} h, {len(EDIT_TYPES)} edit types "
          f"(train {s['splits']['train']['pairs']}, heldout {s['splits']['heldout']['pairs']}); "
          f"eSpeak NG {s['espeak_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
