"""Bits per byte: the formula (total nats / ln 2 / UTF-8 bytes), the same value whichever tokenizer splits the text
for a model that gives the text the same probability, ``val/bpb`` in validation, and the sliding window."""

import math

import lightning as L
import pytest
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llmzoo import GPT2, Llama
from llmzoo.data import TextDataModule, Tokenizer
from llmzoo.data.token_bytes import token_byte_lengths
from llmzoo.evaluation import evaluate_files, sliding_windows, text_nll

MIXED = "Größe: 日本語 text, naïve café — ok?\n"  # 1-, 2-, 3-byte characters


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_token_bytes_add_up_to_the_text_bytes(kind):
    texts = [MIXED * 20, "plain ascii words " * 30]
    tokenizer = Tokenizer.train_bpe(texts, 300) if kind == "bpe" else Tokenizer.train_chars(texts)
    lengths = token_byte_lengths(tokenizer)
    assert lengths.shape == (tokenizer.vocab_size,) and lengths[tokenizer.eos_token_id] == 0
    for text in (MIXED, "café 日本", "x"):
        assert int(lengths[tokenizer.encode(text)].sum()) == len(text.encode("utf-8"))


def split_tokenizer(pieces: list[str], chars_per_token: int) -> Tokenizer:
    """A word-level tokenizer of ``pieces`` that cuts text into ``chars_per_token`` characters."""
    special = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]
    hf = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(special + pieces)}, unk_token="<|unk|>"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(f"[\\s\\S]{{{chars_per_token}}}"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(special)
    return Tokenizer(hf)


def uniform_over(ids: list[int], vocab_size: int) -> GPT2:
    """A real GPT-2 whose next-token distribution is uniform over ``ids`` whatever the input: its final LayerNorm
    outputs its bias (weight 0), which the head maps to logits 0 on ``ids`` and -1e4 elsewhere."""
    model = GPT2(vocab_size=vocab_size, embed_dim=8, num_heads=2, num_layers=1, max_position_embeddings=16,
                 tie_word_embeddings=False).eval()
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.zero_()[0] = 1.0
        model.lm_head.weight.zero_()[:, 0] = -1e4
        model.lm_head.weight[ids, 0] = 0.0
    return model


def test_bits_per_byte_is_nats_over_ln2_over_bytes_whatever_the_tokenizer(tmp_path):
    text = "aéaaéé" * 10  # 60 characters, 90 bytes
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    chars = split_tokenizer(["a", "é"], 1)  # p = 1/2 per character
    pairs = split_tokenizer(["aa", "aé", "éa", "éé"], 2)  # p = 1/4 per pair of characters: the same p(text)
    results = {}
    for name, tokenizer in (("chars", chars), ("pairs", pairs)):
        model = uniform_over(list(range(4, tokenizer.vocab_size)), tokenizer.vocab_size)
        for stride in (16, 5, 1):
            scores = evaluate_files(model, tokenizer, [path], stride=stride)["total"]
            assert scores["tokens"] == len(tokenizer.encode(text)) and scores["bytes"] == 90
            results[name, stride] = scores
    for scores in results.values():
        assert scores["bpb"] == pytest.approx(60 * math.log(2) / math.log(2) / 90, rel=1e-6)  # = 2/3
    assert results["chars", 16]["ppl"] == pytest.approx(2.0, rel=1e-6)  # per-token figures depend on the tokenizer
    assert results["pairs", 16]["ppl"] == pytest.approx(4.0, rel=1e-6)


def test_validation_logs_bits_per_byte_of_the_targets(tmp_path):
    (tmp_path / "corpus.txt").write_text(MIXED * 40, encoding="utf-8")
    data = TextDataModule(path=str(tmp_path / "corpus.txt"), tokenizer="char", seq_len=16, batch_size=4,
                          val_fraction=0.25, cache_dir=str(tmp_path))
    torch.manual_seed(0)
    model = Llama(vocab_size=data.vocab_size, embed_dim=16, num_heads=2, num_layers=1, max_position_embeddings=16)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    metrics = trainer.validate(model, data, verbose=False)[0]
    targets = torch.cat([batch[:, 1:].flatten() for batch in data.val_dataloader()])
    num_bytes = len(data.tokenizer.decode(targets.tolist()).encode("utf-8"))  # consecutive windows: one text
    assert num_bytes > len(targets)  # multi-byte characters: bytes are not tokens
    nats = metrics["val/loss"] * len(targets)
    assert metrics["val/bpb"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-5)


@pytest.mark.parametrize("num_tokens, window, stride", [(2, 8, 4), (9, 8, 8), (30, 8, 3), (100, 16, 16), (17, 16, 1)])
def test_sliding_windows_score_every_token_once(num_tokens, window, stride):
    scored = []
    for start, done in sliding_windows(num_tokens, window, stride):
        end = min(start + window, num_tokens - 1)  # the last id the window predicts
        assert start <= done < end
        scored += range(done + 1, end + 1)
        assert done - start >= window - stride or start == 0  # every later window keeps window - stride of context
    assert scored == list(range(1, num_tokens))


@torch.no_grad()
def test_sliding_window_nll_is_the_whole_sequence_nll_when_it_fits():
    torch.manual_seed(0)
    model = Llama(vocab_size=50, embed_dim=16, num_heads=2, num_layers=1, max_position_embeddings=32).eval()
    ids = torch.randint(0, 50, (20,)).tolist()
    whole, count = model.token_nll(torch.tensor([ids]), reduction="sum")[:2]
    for stride in (8, 16):
        assert text_nll(model, ids, stride=stride) == pytest.approx((float(whole), int(count)), rel=1e-6)
    longer = torch.randint(0, 50, (80,)).tolist()  # several windows: every token counted once
    assert text_nll(model, longer, window=16, stride=4)[1] == text_nll(model, longer, window=32, stride=32)[1] == 79


def test_evaluate_without_tasks_or_files_is_one_line():
    from llmzoo.cli import main

    with pytest.raises(SystemExit, match="evaluate needs --tasks .* or --files"):
        main(["evaluate", "--ckpt_path", "model.ckpt"])


def test_evaluate_files_of_a_checkpoint_and_of_its_hugging_face_directory(tmp_path, capsys):
    import json

    from llmzoo.cli import main
    from llmzoo.hf import convert_hf_to_checkpoint, to_hf

    tokenizer = Tokenizer.train_chars([MIXED])
    torch.manual_seed(0)
    model = Llama(vocab_size=tokenizer.vocab_size, embed_dim=16, num_heads=2, num_layers=1, max_position_embeddings=16)
    to_hf(model, tmp_path / "hf", tokenizer)
    convert_hf_to_checkpoint(tmp_path / "hf", tmp_path / "model.ckpt")
    (tmp_path / "a.txt").write_text(MIXED * 3, encoding="utf-8")
    expected = evaluate_files(model, tokenizer, [tmp_path / "a.txt"], stride=4)["total"]
    for source in ("hf", "model.ckpt"):
        with pytest.raises(SystemExit) as done:
            main(["evaluate", "--ckpt_path", str(tmp_path / source), "--files", str(tmp_path / "a.txt"),
                  "--stride", "4", "--output", str(tmp_path / f"{source}.json")])
        assert done.value.code == 0 and "| total |" in capsys.readouterr().out
        total = json.loads((tmp_path / f"{source}.json").read_text())["files"]["total"]
        assert total["bytes"] == len((MIXED * 3).encode()) and total["bpb"] == pytest.approx(expected["bpb"], rel=1e-6)
