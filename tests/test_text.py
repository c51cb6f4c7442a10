"""Text tokenizer, special tokens, prompt templates, parse helpers and TTS patch budget (spec §1.2–1.4, §5.3–5.8)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from unitok_jax import text as T
from unitok_jax.text import SPECIAL_TOKENS, TextError, TextTokenizer

CORPUS = [
    "Please translate the text to speech.\nThe quick brown fox jumps over the lazy dog.",
    "Please recognize the language of this speech and transcribe it. Format: oral.",
    "English\thello world, this is a test of the speech model.",
    "Chinese\t现在是不是也该长点心了吧",
    "今天天气很好，我们一起去公园散步吧。",
    "delete the word fox from the sentence",
    "HUMAN ASSISTANT HUMAN ASSISTANT",
] * 20


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return T.train_tokenizer(CORPUS, 600)


def _specials(ids):
    return [i for i in ids if i < len(SPECIAL_TOKENS)]


# ------------------------------------------------------------------------------------------------ tokenizer


def test_special_tokens_single_ids_and_round_trip(tok):
    assert set(tok.ids) == set(SPECIAL_TOKENS) == set(T.RELEASE_IDS)
    assert len(set(tok.ids.values())) == len(SPECIAL_TOKENS)
    for name, s in SPECIAL_TOKENS.items():
        i = tok.id(name)
        assert tok.encode(s) == [i], name
        assert tok.decode([i], skip_special_tokens=False) == s
        assert tok.decode([i]) == ""
    # embedded in text they still map to one id each
    ids = tok.encode("a<audio>b<audioPatch><audioPatch></audio>")
    assert ids.count(tok.id("audio_patch")) == 2
    assert tok.id("audio") in ids and tok.id("audio_end") in ids
    with pytest.raises(TextError, match="nope"):
        tok.id("nope")


@pytest.mark.parametrize("s", [
    "hello world", "  leading and trailing  ", "tab\tand\nnewline", "emoji 😀🎉 and CJK 你好世界 ok",
    "unseen: Ωμέγα ß 𝄞 \u200b", "现在是不是也该长点心了吧",
])
def test_encode_decode_round_trip(tok, s):
    ids = tok.encode(s)
    assert all(isinstance(i, int) for i in ids)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s
    assert tok.decode(np.asarray(ids)) == s  # numpy rows are accepted


def test_no_bos_eos_and_byte_fallback(tok):
    ids = tok.encode("😀")
    assert tok.id("bos") not in ids and tok.id("eos") not in ids
    assert len(ids) >= 1 and tok.decode(ids) == "😀"  # 4 UTF-8 bytes, unseen in training
    assert tok.encode("") == []
    big = "the quick brown fox " * 20000  # no hidden length limit
    assert tok.decode(tok.encode(big)) == big


def test_decode_skip_special(tok):
    ids = tok.encode("English\thi") + [tok.id("eos")]
    assert tok.decode(ids) == "English\thi"
    assert tok.decode(ids, skip_special_tokens=False) == "English\thi<|endoftext|>"


def test_training_is_deterministic():
    a = T.train_tokenizer(CORPUS, 500)
    b = T.train_tokenizer(CORPUS, 500)
    assert a == b and a.to_str() == b.to_str()
    assert a.vocab_size <= 500
    with pytest.raises(TextError):
        T.train_tokenizer(CORPUS, 100)


def test_save_from_dir_equal(tok, tmp_path):
    tok.save(tmp_path / "t")
    assert (tmp_path / "t" / "tokenizer.json").is_file()
    back = TextTokenizer.from_dir(tmp_path / "t")
    assert back == tok and back.ids == tok.ids and back.vocab_size == tok.vocab_size
    s = "Please translate 你好 😀 <role>HUMAN</role>"
    assert back.encode(s) == tok.encode(s)
    again = TextTokenizer.from_file(tmp_path / "t" / "tokenizer.json")
    assert again == tok


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(TextError, match="tokenizer.json"):
        TextTokenizer.from_dir(tmp_path)
    with pytest.raises(TextError, match="tokenizer.json"):
        TextTokenizer.from_file(tmp_path / "nothere" / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TextError, match="tokenizer.json"):
        TextTokenizer.from_dir(tmp_path)


def _plain_bpe(special):
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, show_progress=False, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return t


def test_tokenizer_lacking_audio_patch(tmp_path):
    special = [s for s in SPECIAL_TOKENS.values() if s != "<audioPatch>"]
    _plain_bpe(special).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TextError, match="<audioPatch>") as e:
        TextTokenizer.from_dir(tmp_path)
    assert "tokenizer.json" in str(e.value)


def test_tokenizer_config_added_tokens(tmp_path):
    """Added tokens declared only in tokenizer_config.json (HF style) are added with their declared ids."""
    special = [s for s in SPECIAL_TOKENS.values() if s not in ("<cot_text>", "</cot_text>")]
    t = _plain_bpe(special)
    t.save(str(tmp_path / "tokenizer.json"))
    n = t.get_vocab_size(with_added_tokens=True)
    decoder = {str(i): {"content": t.id_to_token(i), "special": True} for i in range(len(special))}
    decoder[str(n)] = {"content": "<cot_text>", "special": True}
    decoder[str(n + 1)] = {"content": "</cot_text>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder}))
    tk = TextTokenizer.from_dir(tmp_path)
    assert tk.id("cot_text") == n and tk.id("cot_text_end") == n + 1
    assert tk.encode("x<cot_text>y") == tk.encode("x") + [n] + tk.encode("y")
    # a declared id that disagrees with the tokenizer is an error naming the config file
    decoder[str(n + 5)] = decoder.pop(str(n + 1))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    with pytest.raises(TextError, match="tokenizer_config.json"):
        TextTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[broken")
    with pytest.raises(TextError, match="tokenizer_config.json"):
        TextTokenizer.from_dir(tmp_path)


def test_release_id_check(tok):
    mism = T.release_id_mismatches(tok)
    assert set(mism) == set(T.RELEASE_IDS)  # a tiny trained tokenizer has other ids
    assert mism["audio_patch"] == (tok.id("audio_patch"), 126357)
    assert T.RELEASE_IDS["eos"] == 126081 and T.RELEASE_IDS["audio"] == 126358


# ------------------------------------------------------------------------------------------------ templates


def test_tts_prompt_structure(tok):
    text, ptext = "The quick brown fox.", "hello world, this is"
    ids = T.tts_prompt(tok, text, ptext, 7)
    expect = (tok.encode("<role>HUMAN</role>") + tok.encode(T.TTS_INSTRUCTION + ptext) + tok.encode(text)
              + tok.encode("<role>ASSISTANT</role>") + [tok.id("audio")] + [tok.id("audio_patch")] * 7)
    assert ids == expect
    assert ids[0] == tok.id("role_start") and tok.decode(ids[1:ids.index(tok.id("role_end"))]) == "HUMAN"
    assert ids.count(tok.id("audio_patch")) == 7 and ids[-8] == tok.id("audio")
    assert _specials(ids[:-8]) == [tok.id(n) for n in ("role_start", "role_end", "role_start", "role_end")]
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<role>HUMAN</role>" + T.TTS_INSTRUCTION + ptext + text + "<role>ASSISTANT</role><audio>"
        + "<audioPatch>" * 7)
    assert T.tts_prompt(tok, text)[-1] == tok.id("audio")  # no voice prompt: ends at <audio>
    assert T.TTS_INSTRUCTION == "Please translate the text to speech.\n"


def test_tts_separate_vs_joint(tok):
    ptext, text = "hello wor", "ld quick"  # the boundary splits a word the BPE has merged
    sep = T.tts_prompt(tok, text, ptext, 3)
    joint = T.tts_prompt(tok, text, ptext, 3, joint=True)
    assert sep != joint
    assert tok.decode(sep, False) == tok.decode(joint, False)  # same text, different segmentation
    head = tok.encode("<role>HUMAN</role>")
    tail = tok.encode("<role>ASSISTANT</role>") + [tok.id("audio")] + [tok.id("audio_patch")] * 3
    for ids in (sep, joint):  # only the middle differs
        assert ids[:len(head)] == head and ids[-len(tail):] == tail
    assert joint[len(head):-len(tail)] == tok.encode(T.TTS_INSTRUCTION + ptext + text)
    assert sep[len(head):-len(tail)] == tok.encode(T.TTS_INSTRUCTION + ptext) + tok.encode(text)
    # at a word boundary with a leading space both coincide
    assert T.tts_prompt(tok, " fox", "the", 0) == T.tts_prompt(tok, " fox", "the", 0, joint=True)


def test_tts_training_sequence(tok):
    text = "The quick brown fox jumps."
    ids = T.tts_training_sequence(tok, text, 5)
    assert ids == (tok.encode("<role>HUMAN</role>") + tok.encode(T.TTS_INSTRUCTION + text)
                   + tok.encode("<role>ASSISTANT</role>") + [tok.id("audio")] + [tok.id("audio_patch")] * 5)
    assert tok.id("audio_end") not in ids
    with pytest.raises(TextError):
        T.tts_training_sequence(tok, "   ", 5)


def test_asr_prompt_structure(tok):
    ids, at = T.asr_prompt(tok, 4)
    assert ids[at - 1] == tok.id("audio") and ids[at:at + 4] == [tok.id("audio_patch")] * 4
    assert ids.index(tok.id("audio_patch")) == at and ids.count(tok.id("audio_patch")) == 4
    assert ids == (tok.encode("<role>HUMAN</role>") + tok.encode(T.DEFAULT_ASR_INSTRUCTION) + [tok.id("audio")]
                   + [tok.id("audio_patch")] * 4 + [tok.id("audio_end")] + tok.encode("<role>ASSISTANT</role>"))
    assert ids[-1] == tok.id("role_end") and ids[at + 4] == tok.id("audio_end")
    assert T.DEFAULT_ASR_INSTRUCTION == ("Please recognize the language of this speech and transcribe it. "
                                         "Format: oral.")
    # context words extend the instruction only
    cids, cat = T.asr_prompt(tok, 4, context_words=["fox", "公园"])
    instr = T.DEFAULT_ASR_INSTRUCTION + " This audio may contains the following words or phrases:fox,公园"
    assert cids == tok.encode("<role>HUMAN</role>" + instr) + ids[at - 1:]
    assert cids[cat - 1] == tok.id("audio") and cids[cat] == tok.id("audio_patch")
    assert T.asr_prompt(tok, 4, context_words=[]) == (ids, at)
    # custom instruction, zero patches: the index is still just after <audio>
    zids, zat = T.asr_prompt(tok, 0, instruction="Transcribe.")
    assert zids[zat - 1] == tok.id("audio") and zids[zat] == tok.id("audio_end")
    with pytest.raises(TextError):
        T.asr_prompt(tok, -1)


def test_asr_target_and_parse(tok):
    ids = T.asr_target(tok, "现在是不是也该长点心了吧", "Chinese")
    assert ids == tok.encode("Chinese\t现在是不是也该长点心了吧") + [tok.id("eos")]
    assert T.asr_target(tok, "hello world")[-1] == tok.id("eos")
    assert tok.decode(T.asr_target(tok, "hello world")) == "English\thello world"
    assert T.parse_asr_output("Chinese\t现在是不是也该长点心了吧") == ("Chinese", "现在是不是也该长点心了吧")
    assert T.parse_asr_output("English\t hello world <|endoftext|>") == ("English", "hello world")
    assert T.parse_asr_output("no language here") == (None, "no language here")
    assert T.parse_asr_output("\tonly text") == (None, "only text")
    assert T.parse_asr_output("") == (None, "")
    assert T.parse_asr_output("Canton\ta\tb") == ("Canton", "a\tb")


def test_edit_prompt_structure(tok):
    instr = "delete the word fox"
    for semantic in (False, True):
        ids, at = T.edit_prompt(tok, 6, instr, semantic=semantic)
        assert ids[:at] == tok.encode("<role>HUMAN</role>") + [tok.id("audio")]
        assert ids.index(tok.id("audio_patch")) == at and ids.count(tok.id("audio_patch")) == 6
        rest = ids[at + 6:]
        expect = ([tok.id("audio_end"), tok.id("prompt")] + tok.encode(instr + "\n") + [tok.id("prompt_end")]
                  + tok.encode("<role>ASSISTANT</role>") + ([tok.id("answer")] if semantic else []))
        assert rest == expect
        assert (ids[-1] == tok.id("answer")) == semantic
    with pytest.raises(TextError):
        T.edit_prompt(tok, 6, "  ", semantic=False)


def test_parse_edit_output():
    out = T.parse_edit_output("<cot_text>有望<edit><framePatch></edit>盘活</cot_text><gen_audio>")
    assert out["transcript"] == "有望盘活" and out["gen_audio"] is True
    assert out["markup"] == "有望<edit><framePatch></edit>盘活" and out["edits"] == ["<framePatch>"]
    assert out["text"] == "有望盘活"
    acoustic = T.parse_edit_output("<gen_audio>")
    assert acoustic["transcript"] is None and acoustic["gen_audio"] is True and acoustic["text"] == ""
    cut = T.parse_edit_output("<cot_text>half a sen<|endoftext|>")
    assert cut["transcript"] == "half a sen" and cut["gen_audio"] is False
    none = T.parse_edit_output("just text")
    assert none == {"transcript": None, "markup": None, "edits": [], "gen_audio": False, "text": "just text"}


def test_template_errors(tok):
    with pytest.raises(TextError):
        T.tts_prompt(tok, "")
    with pytest.raises(TextError):
        T.tts_prompt(tok, "hi", "", -2)
    with pytest.raises(TextError):
        tok.encode(None)
    assert issubclass(TextError, ValueError)


# ------------------------------------------------------------------------------------------------ budget


def test_detect_lang():
    assert T.detect_lang("现在是不是也该长点心了吧") == "zh"
    assert T.detect_lang("hello world") == "en"
    assert T.detect_lang("我们用 GPU 训练模型") == "zh"
    assert T.detect_lang("this is a long English sentence with 一 char") == "en"
    assert T.detect_lang("12345 !!!") == "en"


def test_tts_patch_budget():
    zh = "现在是不是也该长点心了吧"  # 12 chars -> 4 * 25
    assert T.tts_patch_budget(zh) == 100 and T.tts_patch_budget(zh, "zh") == 100
    assert T.tts_patch_budget("一二三四五六七八", "zh") == 50  # floor(8/3) = 2
    en = "one two three four five six seven"  # 7 words -> 2 * 25
    assert T.tts_patch_budget(en) == 50 and T.tts_patch_budget(en, "en") == 50
    assert T.tts_patch_budget("one  two\tthree\nfour five six") == 50  # any whitespace, not single spaces
    # minimum floor (the reference gives 0 here)
    assert T.tts_patch_budget("hi") == 25 and T.tts_patch_budget("你好", "zh") == 25
    assert T.tts_patch_budget("hi", minimum=0) == 0
    assert T.tts_patch_budget("hi", minimum=40) == 40
    # explicit maximum caps (and wins over the minimum)
    assert T.tts_patch_budget(en * 10, maximum=60) == 60
    assert T.tts_patch_budget("hi", maximum=10) == 10
    assert T.tts_patch_budget(en, maximum=1000) == 50
    with pytest.raises(TextError):
        T.tts_patch_budget("   ")
