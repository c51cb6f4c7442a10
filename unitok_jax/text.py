"""Text side of Ming-UniAudio: the tokenizer, its special tokens and the prompt templates (spec §1.2–1.4, §5.2–5.8).

* :class:`TextTokenizer` wraps a HuggingFace ``tokenizers.Tokenizer`` loaded from a checkpoint's ``tokenizer.json``
  (plus ``tokenizer_config.json`` for added tokens). It never adds BOS/EOS (``add_bos_token`` / ``add_eos_token``
  are false in the release) and resolves every special token of :data:`SPECIAL_TOKENS` to one id at load time.
* :func:`train_tokenizer` trains a small byte-level BPE with the same special tokens, for tests and the CPU demo.
  Byte-level means every byte is in the base alphabet, so any text (emoji, CJK, ...) encodes without unknowns.
* Templates return lists of Python ints, tokenised the way the reference does: special tokens are split out by the
  tokenizer's added-token matching, and where the reference tokenises segments separately (TTS, §5.5) so do we.

Text normalisation (the reference's ``sentence_manager`` TN, §5.5 step 1) is not done here: callers pass the text
they want spoken.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import unicodedata
from typing import Iterable, Optional, Sequence, Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers import AddedToken

from unitok_jax.io import write_text

__all__ = [
    "SPECIAL_TOKENS", "RELEASE_IDS", "DEFAULT_ASR_INSTRUCTION", "TTS_INSTRUCTION", "ASR_CONTEXT_PREFIX",
    "ASR_LANGUAGES", "TextError", "TextTokenizer", "train_tokenizer", "release_id_mismatches",
    "tts_prompt", "tts_training_sequence", "asr_prompt", "asr_target", "parse_asr_output", "edit_prompt",
    "parse_edit_output", "tts_patch_budget", "detect_lang", "strip_special_tokens",
]

# logical name -> token string (spec §5.3)
SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "role_start": "<role>",
    "role_end": "</role>",
    "audio": "<audio>",
    "audio_end": "</audio>",
    "audio_patch": "<audioPatch>",
    "gen_audio": "<gen_audio>",
    "gen_audio_end": "</gen_audio>",
    "gen_audio_patch": "<gen_audioPatch>",
    "frame_patch": "<framePatch>",
    "asr": "<asr>",
    "tts": "<tts>",
    "edit": "<edit>",
    "edit_end": "</edit>",
    "prompt": "<prompt>",
    "prompt_end": "</prompt>",
    "answer": "<answer>",
    "cot_text": "<cot_text>",
    "cot_text_end": "</cot_text>",
    "image_patch": "<imagePatch>",
}

# Ids of the released Ming-UniAudio tokenizer (spec §5.3). Only for validating a release tokenizer
# (:func:`release_id_mismatches`); all logic looks ids up in the loaded tokenizer.
RELEASE_IDS: dict[str, int] = {
    "bos": 126080,
    "eos": 126081,
    "role_start": 126340,
    "role_end": 126341,
    "image_patch": 126346,
    "audio_patch": 126357,
    "audio": 126358,
    "audio_end": 126359,
    "gen_audio_patch": 126360,
    "gen_audio": 126361,
    "gen_audio_end": 126362,
    "frame_patch": 126364,
    "asr": 126366,
    "tts": 126367,
    "edit": 126368,
    "edit_end": 126369,
    "prompt": 126370,
    "prompt_end": 126371,
    "answer": 126372,
    "cot_text": 126373,
    "cot_text_end": 126374,
}

DEFAULT_ASR_INSTRUCTION = "Please recognize the language of this speech and transcribe it. Format: oral."
ASR_CONTEXT_PREFIX = " This audio may contains the following words or phrases:"
ASR_CONTEXT_SEPARATOR = ","
TTS_INSTRUCTION = "Please translate the text to speech.\n"
ASR_LANGUAGES = ("Chinese", "English", "川渝", "湖南", "闽南", "上海", "Canton")

_HUMAN = "<role>HUMAN</role>"
_ASSISTANT = "<role>ASSISTANT</role>"


class TextError(ValueError):
    """Bad text input, a missing/unreadable tokenizer file, or a tokenizer lacking a special token."""


# --------------------------------------------------------------------------------------------------- tokenizer


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the resolved special-token ids.

    Attributes: ``ids`` (logical name of :data:`SPECIAL_TOKENS` -> id), ``vocab_size`` (including added tokens),
    ``tokenizer`` (the underlying ``tokenizers.Tokenizer``), ``source`` (where it was loaded from, for messages).
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>"):
        self.tokenizer = tokenizer
        self.source = str(source)
        ids: dict[str, int] = {}
        for name, tok in SPECIAL_TOKENS.items():
            i = tokenizer.token_to_id(tok)
            if i is None:
                raise TextError(f"{self.source}: tokenizer lacks the special token {tok!r} ({name})")
            enc = tokenizer.encode(tok, add_special_tokens=False).ids
            if enc != [i]:
                raise TextError(f"{self.source}: special token {tok!r} ({name}) does not encode to its single id "
                                f"{i} (got {enc}); it must be an added token")
            ids[name] = int(i)
        self.ids = ids
        self._special_strings = tuple(SPECIAL_TOKENS.values())

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_file(cls, tokenizer_json_path: Union[str, os.PathLike]) -> "TextTokenizer":
        """Load a ``tokenizer.json``. Raises :class:`TextError` naming the file when it is missing or unreadable."""
        path = pathlib.Path(tokenizer_json_path)
        return cls(_load_tokenizer_json(path), str(path))

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "TextTokenizer":
        """Load ``path/tokenizer.json``; if ``path/tokenizer_config.json`` exists, its ``added_tokens_decoder``
        entries missing from ``tokenizer.json`` are added (as HF ``PreTrainedTokenizerFast`` does), checking that
        each gets the id the config declares. Errors name the offending file."""
        d = pathlib.Path(path)
        tj = d / "tokenizer.json"
        tok = _load_tokenizer_json(tj)
        cfg_path = d / "tokenizer_config.json"
        source = str(tj)
        if cfg_path.exists():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TextError(f"{cfg_path}: unreadable tokenizer config ({e})") from e
            if not isinstance(cfg, dict):
                raise TextError(f"{cfg_path}: expected a JSON object")
            _apply_added_tokens(tok, cfg.get("added_tokens_decoder") or {}, cfg_path)
            source = f"{tj} (+ {cfg_path.name})"
        return cls(tok, source)

    def save(self, path_dir: Union[str, os.PathLike]) -> pathlib.Path:
        """Write ``path_dir/tokenizer.json`` (the directory is created); returns the file path."""
        d = pathlib.Path(path_dir)
        d.mkdir(parents=True, exist_ok=True)
        out = d / "tokenizer.json"
        write_text(out, self.tokenizer.to_str(pretty=True))  # what Tokenizer.save writes, renamed into place
        return out

    # ----------------------------------------------------------------------------------------- use

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings inside it map to their ids. No BOS/EOS is added."""
        if not isinstance(text, str):
            raise TextError(f"encode expects a str, got {type(text).__name__}")
        if not text:
            return []
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (e.g. from a "\ud800" JSON escape)
            raise TextError(f"text holds a character that is not valid Unicode ({e.reason} at position {e.start}): "
                            f"{text[max(0, e.start - 20) : e.start + 20]!r}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (any iterable of ints, e.g. a numpy row). With ``skip_special_tokens`` the special
        tokens are dropped."""
        ids = [int(i) for i in ids]
        if not ids:
            return ""
        out = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:  # also tokens a release may not flag as special
            out = strip_special_tokens(out)
        return out

    def id(self, name: str) -> int:
        """Id of a :data:`SPECIAL_TOKENS` logical name (e.g. ``"audio_patch"``)."""
        try:
            return self.ids[name]
        except KeyError:
            raise TextError(f"unknown special token name {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a token string, or None."""
        return self.tokenizer.token_to_id(token)

    def to_str(self) -> str:
        """The tokenizer as ``tokenizer.json`` text."""
        return self.tokenizer.to_str()

    def __eq__(self, other) -> bool:
        if not isinstance(other, TextTokenizer):
            return NotImplemented
        return self.ids == other.ids and json.loads(self.to_str()) == json.loads(other.to_str())

    __hash__ = None  # mutable wrapper; equality is by content

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def _load_tokenizer_json(path: pathlib.Path) -> Tokenizer:
    if not path.is_file():
        raise TextError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for parse errors
        raise TextError(f"{path}: unreadable tokenizer.json ({e})") from e


def _apply_added_tokens(tok: Tokenizer, decoder: dict, cfg_path: pathlib.Path) -> None:
    """Add ``tokenizer_config.json`` added tokens absent from ``tokenizer.json``, in id order, checking ids."""
    if not isinstance(decoder, dict):
        raise TextError(f"{cfg_path}: added_tokens_decoder must be an object")
    entries = []
    for k, v in decoder.items():
        try:
            i = int(k)
            content = v["content"] if isinstance(v, dict) else str(v)
        except (ValueError, KeyError, TypeError) as e:
            raise TextError(f"{cfg_path}: bad added_tokens_decoder entry {k!r}: {v!r}") from e
        entries.append((i, content, bool(v.get("special", True)) if isinstance(v, dict) else True,
                        v if isinstance(v, dict) else {}))
    for i, content, special, v in sorted(entries):
        have = tok.token_to_id(content)
        if have is not None:
            if have != i:
                raise TextError(f"{cfg_path}: token {content!r} has id {have} in tokenizer.json but {i} here")
            if tok.encode(content, add_special_tokens=False).ids == [have]:
                continue  # already an atomic added token
        at = AddedToken(content, single_word=bool(v.get("single_word", False)), lstrip=bool(v.get("lstrip", False)),
                        rstrip=bool(v.get("rstrip", False)), normalized=bool(v.get("normalized", not special)),
                        special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([at])
        got = tok.token_to_id(content)
        if got != i:
            raise TextError(f"{cfg_path}: added token {content!r} declared with id {i} but got id {got}")


def release_id_mismatches(tok: TextTokenizer) -> dict[str, tuple[int, int]]:
    """``{name: (ours, release)}`` for special tokens whose id differs from :data:`RELEASE_IDS` (empty for the
    released tokenizer)."""
    return {n: (tok.ids[n], r) for n, r in RELEASE_IDS.items() if tok.ids.get(n) != r}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Train a byte-level BPE (``tokenizers`` BpeTrainer) on ``texts``. Every :data:`SPECIAL_TOKENS` string is an
    added special token (ids 0..20 in the order of the dict). The 256-byte alphabet is always included, so the
    vocabulary is at least ``len(SPECIAL_TOKENS) + 256``; any text encodes (no unknown token). Deterministic for
    the same input."""
    vocab_size = int(vocab_size)
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise TextError(f"vocab_size {vocab_size} is below the minimum {floor} (special tokens + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    return TextTokenizer(tok, "<trained>")


# --------------------------------------------------------------------------------------------------- helpers

_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS.values(), key=len, reverse=True)))


def strip_special_tokens(text: str) -> str:
    """``text`` with every :data:`SPECIAL_TOKENS` string removed."""
    return _SPECIAL_RE.sub("", text)


def _require_text(text, what: str) -> str:
    if not isinstance(text, str):
        raise TextError(f"{what} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise TextError(f"{what} is empty")
    return text


def _count(n, what: str) -> int:
    try:
        n_int = int(n)
    except (TypeError, ValueError):
        raise TextError(f"{what} must be an int, got {n!r}") from None
    if n_int != n or n_int < 0:
        raise TextError(f"{what} must be a non-negative int, got {n!r}")
    return n_int


# --------------------------------------------------------------------------------------------------- templates


def tts_prompt(tok: TextTokenizer, text: str, prompt_text: str = "", num_prompt_patches: int = 0, *,
               joint: bool = False) -> list[int]:
    """TTS prompt (spec §1.3, §5.5 step 3):

    ``enc("<role>HUMAN</role>") ++ enc("Please translate the text to speech.\\n" + prompt_text) ++ enc(text) ++
    enc("<role>ASSISTANT</role>") ++ [<audio>] ++ [<audioPatch>] * num_prompt_patches``.

    Parity mode (default) tokenises those four strings separately, as the reference's inference code does, so a BPE
    merge never crosses the prompt-text / target-text boundary. ``joint=True`` tokenises instruction + prompt_text +
    text as one string, as in training (§5.8, §9 #18). The pooled prompt latents go to the ``<audioPatch>``
    positions, which start right after ``<audio>`` (§5.2). ``text`` is used as given (no TN)."""
    _require_text(text, "TTS text")
    if not isinstance(prompt_text, str):
        raise TextError(f"prompt_text must be a str, got {type(prompt_text).__name__}")
    p = _count(num_prompt_patches, "num_prompt_patches")
    if joint:
        body = tok.encode(TTS_INSTRUCTION + prompt_text + text)
    else:
        body = tok.encode(TTS_INSTRUCTION + prompt_text) + tok.encode(text)
    return tok.encode(_HUMAN) + body + tok.encode(_ASSISTANT) + [tok.id("audio")] + [tok.id("audio_patch")] * p


def tts_training_sequence(tok: TextTokenizer, text: str, num_patches: int) -> list[int]:
    """TTS training input (spec §5.8): ``<role>HUMAN</role>`` + enc("Please translate the text to speech.\\n" +
    text) + ``<role>ASSISTANT</role>`` + ``<audio>`` + ``<audioPatch>`` x num_patches. No ``</audio>``, no voice
    prompt. The flow condition for patch j is the hidden at (index of ``<audio>``) + j."""
    return tts_prompt(tok, text, "", num_patches, joint=True)


def asr_prompt(tok: TextTokenizer, num_patches: int, *, context_words: Optional[Sequence[str]] = None,
               instruction: str = DEFAULT_ASR_INSTRUCTION) -> tuple[list[int], int]:
    """ASR prompt (spec §1.2, §5.4) and the index of its first ``<audioPatch>``:

    ``<role>HUMAN</role>{instruction}<audio>`` + ``<audioPatch>`` x num_patches + ``</audio><role>ASSISTANT</role>``.

    ``context_words`` (hot words) append ``" This audio may contains the following words or phrases:"`` followed by
    the words joined with ``","`` to the instruction. The index returned is (index of ``<audio>``) + 1, also when
    ``num_patches`` is 0 (where patches would start).

    The ``\\n`` ambiguity of §5.4: the chat-rendering rule says a text item with no audio placeholder gets the
    audio expansion appended *followed by* ``\\n``, which would put a newline between ``</audio>`` and
    ``<role>ASSISTANT</role>`` (or, read the other way, between the instruction and ``<audio>``). We use the §1.2
    form, with no newline: §1.2 states the complete single-audio prompt token by token, while the ``\\n`` rule of
    §5.4 is a generic chat-rendering rule (several audios are joined by ``\\n``; a placeholder-less item gets one)
    whose placement for this case is not pinned down (after ``</audio>`` or before ``<audio>``), so we follow the
    explicit prompt and put ``<audio>`` right after the instruction. Worth confirming in a real-weight run; only
    this function would change. The ``","`` separator of the context list is likewise our reading of "comma list"
    (:data:`ASR_CONTEXT_SEPARATOR`).
    """
    p = _count(num_patches, "num_patches")
    if not isinstance(instruction, str):
        raise TextError(f"instruction must be a str, got {type(instruction).__name__}")
    if context_words:
        if isinstance(context_words, str):
            context_words = [context_words]
        words = [w.strip() for w in context_words if w and w.strip()]
        if words:
            instruction = instruction + ASR_CONTEXT_PREFIX + ASR_CONTEXT_SEPARATOR.join(words)
    head = tok.encode(_HUMAN + instruction + SPECIAL_TOKENS["audio"])
    tail = tok.encode(SPECIAL_TOKENS["audio_end"] + _ASSISTANT)
    return head + [tok.id("audio_patch")] * p + tail, len(head)


def asr_target(tok: TextTokenizer, transcript: str, lang: str = "English") -> list[int]:
    """ASR SFT target (spec §5.4): ``enc(f"{lang}\\t{transcript}") + [<|endoftext|>]``. ``lang`` is one of
    :data:`ASR_LANGUAGES` in the release data (not enforced)."""
    if not isinstance(transcript, str):
        raise TextError(f"transcript must be a str, got {type(transcript).__name__}")
    _require_text(lang, "ASR language")
    return tok.encode(f"{lang}\t{transcript}") + [tok.id("eos")]


def parse_asr_output(text: str) -> tuple[Optional[str], str]:
    """Split decoded ASR output ``"{lang}\\t{transcript}"`` into (lang, transcript). Special tokens are removed
    first; without a tab (or with an empty language) lang is None and the whole text is the transcript."""
    text = strip_special_tokens(text)
    head, sep, rest = text.partition("\t")
    lang = head.strip()
    if sep and lang and "\n" not in lang:
        return lang, rest.strip()
    return None, text.strip()


def edit_prompt(tok: TextTokenizer, num_patches: int, instruction: str, *, semantic: bool) -> tuple[list[int], int]:
    """Edit prompt (spec §1.4) and the index of its first ``<audioPatch>``:

    ``<role>HUMAN</role><audio>`` + ``<audioPatch>`` x num_patches + ``</audio><prompt>{instruction}\\n</prompt>``
    ``<role>ASSISTANT</role>``, plus ``<answer>`` when ``semantic`` (insert / delete / substitute edits, the
    reference's ``use_cot``), which makes the model write ``<cot_text>…</cot_text>`` before ``<gen_audio>``."""
    _require_text(instruction, "edit instruction")
    p = _count(num_patches, "num_patches")
    head = tok.encode(_HUMAN + SPECIAL_TOKENS["audio"])
    tail = tok.encode(SPECIAL_TOKENS["audio_end"] + SPECIAL_TOKENS["prompt"] + instruction + "\n"
                      + SPECIAL_TOKENS["prompt_end"] + _ASSISTANT)
    ids = head + [tok.id("audio_patch")] * p + tail
    if semantic:
        ids.append(tok.id("answer"))
    return ids, len(head)


def parse_edit_output(text: str) -> dict:
    """Parse the decoded text phase of an edit (decode with ``skip_special_tokens=False``).

    Returns ``{"transcript", "markup", "edits", "gen_audio", "text"}``: ``transcript`` is the ``<cot_text>`` content
    with special tokens removed (None when there is no ``<cot_text>``); ``markup`` the raw ``<cot_text>`` content
    (with ``<edit>``/``<framePatch>``); ``edits`` the raw contents of the ``<edit>…</edit>`` spans; ``gen_audio``
    whether ``<gen_audio>`` was reached; ``text`` the whole output with special tokens removed (§9 #8)."""
    cot, cot_end, gen = SPECIAL_TOKENS["cot_text"], SPECIAL_TOKENS["cot_text_end"], SPECIAL_TOKENS["gen_audio"]
    gen_at = text.find(gen)
    reached = gen_at >= 0
    markup = None
    start = text.find(cot)
    if start >= 0:
        body = text[start + len(cot):]
        ends = [i for i in (body.find(cot_end), body.find(gen)) if i >= 0]
        markup = body[: min(ends)] if ends else body
    edits = []
    if markup is not None:
        e0, e1 = re.escape(SPECIAL_TOKENS["edit"]), re.escape(SPECIAL_TOKENS["edit_end"])
        edits = re.findall(f"{e0}(.*?){e1}", markup, flags=re.S)
    return {
        "transcript": strip_special_tokens(markup).strip() if markup is not None else None,
        "markup": markup,
        "edits": edits,
        "gen_audio": reached,
        "text": strip_special_tokens(text).strip(),
    }


# --------------------------------------------------------------------------------------------------- budget


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F)


def detect_lang(text: str) -> str:
    """``"zh"`` when CJK ideographs dominate ``text`` (at least as many ideographs as non-CJK words), else
    ``"en"``. One ideograph counts like one word, the unit the budget formula uses for each."""
    cjk = sum(1 for ch in text if _is_cjk(ch))
    if cjk == 0:
        return "en"
    other = re.sub(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]", " ", text)
    words = sum(1 for w in other.split() if any(unicodedata.category(c)[0] in "LN" for c in w))
    return "zh" if cjk >= words else "en"


def tts_patch_budget(text: str, lang: Optional[str] = None, *, minimum: int = 25,
                     maximum: Optional[int] = None) -> int:
    """Patch cap for a TTS request (spec §5.5 step 2, clean behaviour §9 #6).

    Reference formula: zh -> ⌊len(text) / 3⌋·25 (characters); otherwise ⌊len(words) / 3⌋·25. Ours differs on
    purpose: words are split on any whitespace (the reference splits on single spaces), the result is at least
    ``minimum`` patches (the reference gives 0 for fewer than 3 characters/words; ``minimum=0`` restores that), and
    an explicit ``maximum`` caps it (it wins over ``minimum``). ``lang``: ``"zh"`` (or ``"chinese"``), anything else
    means word-based; None detects it (:func:`detect_lang`)."""
    _require_text(text, "TTS text")
    if lang is None:
        lang = detect_lang(text)
    zh = lang.lower() in ("zh", "chinese", "cn") or lang.lower().startswith("zh-")
    units = len(text) if zh else len(text.split())
    n = (units // 3) * 25
    n = max(n, int(minimum))
    if maximum is not None:
        n = min(n, int(maximum))
    return max(n, 0)
