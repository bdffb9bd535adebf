"""Tokenizers: Unicode round trips, special tokens, files, and finding a run's tokenizer from its checkpoint."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmzoo.data import Tokenizer, load_tokenizer_for_checkpoint
from llmzoo.data.sources import split_text

CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n" * 20,
          "Привет, мир! Как дела?\n", "日本語のテキスト。中文文本。\n", "emoji 🎉🚀 and tabs\tand\r\nCRLF\n"]
HARD = ["Съешь же ещё этих мягких французских булок", "我能吞下玻璃而不伤身体。", "👩‍👩‍👧‍👦🏳️‍🌈 e\u0301 ﬁ",
        "\x00\x01\x07\x1b[31m\x7f\r\n\t\u2028\u200b\ufeff", "", " leading and trailing  ", "\U0010ffff\U0001f600" * 3,
        "mixed 한국어 עברית العربية ελληνικά"]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(CORPUS * 5, vocab_size=400)


def test_bpe_has_special_tokens_first(bpe):
    assert (bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id) == (0, 1, 2)
    assert (bpe.bos_token, bpe.eos_token, bpe.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert 260 < bpe.vocab_size <= 400  # 256 bytes + 3 specials + merges


@pytest.mark.parametrize("text", HARD)
def test_bpe_round_trips_unicode_it_never_saw(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    assert bpe.encode_batch([text, text[::-1]]) == [ids, bpe.encode(text[::-1])]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_merges_frequent_text(bpe):
    assert len(bpe.encode("The quick brown fox")) < len(b"The quick brown fox") / 2


def test_special_tokens_decode_or_skip(bpe):
    ids = [bpe.bos_token_id, *bpe.encode("hi"), bpe.eos_token_id]
    assert bpe.decode(ids) == "hi"
    assert bpe.decode(ids, skip_special_tokens=False) == "<|bos|>hi<|eos|>"


def test_text_spelling_a_special_token_stays_text(bpe, tmp_path):
    ids = bpe.encode("a<|eos|>b")
    assert bpe.eos_token_id not in ids and bpe.decode(ids) == "a<|eos|>b"
    assert Tokenizer.from_file(bpe.save(tmp_path)).encode("a<|eos|>b") == ids  # also once loaded again


def test_char_tokenizer_round_trip_and_unknown_characters():
    chars = Tokenizer.train_chars(["hello world\n", "abc\tdef"])
    assert chars.vocab_size == 4 + len(set("hello world\nabc\tdef"))
    assert chars.tokenizer.token_to_id("<|unk|>") == 3
    text = "hello\tworld\nabc def"
    assert len(chars.encode(text)) == len(text)
    assert chars.decode(chars.encode(text)) == text
    assert chars.encode("hz") == [chars.encode("h")[0], 3]  # unseen character -> <|unk|>
    assert chars.decode(chars.encode("hz")) == "h"
    assert chars.decode(chars.encode("hz"), skip_special_tokens=False) == "h<|unk|>"


def test_save_and_load_give_the_same_tokenizer(bpe, tmp_path):
    path = bpe.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    assert json.loads(path.read_text())["model"]["type"] == "BPE"  # a standard Hugging Face file
    loaded = Tokenizer.from_file(path)
    assert loaded == bpe and loaded.encode(HARD[0]) == bpe.encode(HARD[0])
    assert not list(tmp_path.glob("*.tmp"))


def test_foreign_tokenizer_uses_the_special_tokens_named_beside_it(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))  # a Llama-like tokenizer: <s>, </s>, no pad
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    (tmp_path / "tokenizer.json").write_text(hf.to_str())
    with pytest.raises(ValueError, match="lacks the special tokens"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": None}))
    tokenizer = load_tokenizer_for_checkpoint(tmp_path)
    assert tokenizer.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None}
    assert tokenizer.eos_token_id == hf.token_to_id("</s>") and tokenizer.pad_token_id is None
    copy = tmp_path / "copy"
    copy.mkdir()
    assert Tokenizer.from_file(tokenizer.save(copy)) == tokenizer  # the names travel in tokenizer_config.json


def test_tokenizer_found_from_a_checkpoint_file_or_beside_it(bpe, tmp_path):
    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {}, "TextDataModule": {"tokenizer.json": bpe.to_str()}}, ckpt)
    assert load_tokenizer_for_checkpoint(ckpt) == bpe
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer_for_checkpoint(other)
    bpe.save(tmp_path)
    assert load_tokenizer_for_checkpoint(other) == bpe  # the tokenizer.json beside it


def test_chunked_text_encodes_like_the_whole_text(bpe):
    text = "".join(CORPUS) * 40 + "x\n  indented\n\nnext\n" * 50
    pieces = split_text(text, chunk_chars=100)
    assert len(pieces) > 20 and "".join(pieces) == text
    assert [i for ids in bpe.encode_batch(pieces) for i in ids] == bpe.encode(text)
    assert split_text("a" * 5000, chunk_chars=100)[0] == "a" * 100  # no safe cut for 16 chunks: cut anyway
