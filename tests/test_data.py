"""Data: sources, the token cache, windows, streaming coverage over ranks x workers, and exact resume."""

import gzip
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import lightning as L
import numpy as np
import pytest
import torch
from record_batches import RecordBatches
from tiny import tiny_model
from torch.utils.data import DataLoader

from llmzoo.callbacks import Checkpoint
from llmzoo.data import (PackedStream, Progress, StreamingTextDataModule, TextDataModule, Tokenizer, TokenWindows,
                         datamodules, default_corpus, resolve_files)
from llmzoo.data.sources import read_pieces

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def write_docs(directory, files: int, docs: int, seed: int = 0):
    """``files`` .jsonl files of ``docs`` distinct documents each; returns all document texts."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    texts = []
    for f in range(files):
        lines = []
        for d in range(docs):
            text = f"doc {f}.{d}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 30))))
            texts.append(text)
            lines.append(json.dumps({"text": text}))
        (directory / f"part-{f:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return texts


@pytest.fixture
def corpus(tmp_path):
    """Two text files of a few kB each."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.txt", "b.txt"):
        lines = [" ".join(rng.choice(WORDS, size=8)) for _ in range(150)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def text_module(path, tmp_path, **kwargs):
    kwargs = {"tokenizer": "char", "seq_len": 16, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return TextDataModule(str(path), **kwargs)


# ----------------------------------------------------------------- sources
def test_resolve_files_accepts_files_folders_globs_and_lists(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for name in ("d/a.txt", "d/sub/b.txt", "d/.hidden/c.txt", "d/.x.txt", "e.jsonl"):
        (tmp_path / name).write_text("x")
    folder = resolve_files(str(tmp_path / "d"))
    assert [p.name for p in folder] == ["a.txt", "b.txt"]
    assert resolve_files(str(tmp_path / "d" / "**" / "*.txt")) == folder
    assert len(resolve_files([str(tmp_path / "d"), str(tmp_path / "e.jsonl"), str(tmp_path / "d/a.txt")])) == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_files(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        resolve_files(str(tmp_path / "*.csv"))


def test_default_corpus_is_the_standard_library():
    files = default_corpus()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert any(f.name == "functools.py" for f in files)
    assert not any("test" in f.parts or "site-packages" in f.parts for f in files)


def test_read_pieces_jsonl_gzip_and_text(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write('{"body": "first"}\n\n{"body": "second\\nline"}\n')
    assert list(read_pieces(tmp_path / "a.jsonl.gz", "body")) == [("first", True), ("second\nline", True)]
    with pytest.raises(ValueError, match=r"a.jsonl.gz:1: not a JSON object with a 'text'"):
        list(read_pieces(tmp_path / "a.jsonl.gz"))
    text = "word word\r\n" * 3000
    (tmp_path / "b.txt").write_bytes(text.encode())
    pieces = list(read_pieces(tmp_path / "b.txt", chunk_chars=1000))
    assert "".join(p for p, _ in pieces) == text  # line endings kept as they are
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True] and len(pieces) > 10


# ----------------------------------------------------------------- TextDataModule
def test_token_cache_is_written_once_and_reused(corpus, tmp_path, monkeypatch):
    dm = text_module(corpus, tmp_path)
    dm.prepare_data()
    path = dm.token_file()
    tokens = np.fromfile(path, dtype=np.uint16)
    eos = dm.tokenizer.eos_token_id
    expected = [t for f in sorted(corpus.iterdir()) for t in [*dm.tokenizer.encode(f.read_text()), eos]]
    assert tokens.tolist() == expected and path.suffix == ".uint16"

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(datamodules, "tokenize_pieces", no_tokenizing)
    again = text_module(corpus, tmp_path)
    again.setup("fit")  # a second run reads the cache
    assert again.token_file() == path and len(again.train_tokens) + len(again.val_tokens) == len(tokens)
    (corpus / "a.txt").write_text("changed\n" * 100)  # a changed file is a new corpus
    with pytest.raises(AssertionError, match="tokenized again"):
        text_module(corpus, tmp_path).prepare_data()


def test_interrupted_tokenization_leaves_no_cache(corpus, tmp_path, monkeypatch):
    def interrupted(tokenizer, pieces, dtype):
        yield np.zeros(10, dtype=dtype)
        raise KeyboardInterrupt

    dm = text_module(corpus, tmp_path)
    assert dm.tokenizer.vocab_size > 4  # trained and cached before the interruption
    monkeypatch.setattr(datamodules, "tokenize_pieces", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    left = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]  # locks stay
    assert [name.startswith("tokenizer-") for name in left] == [True]


def test_ranks_started_together_train_the_tokenizer_and_tokenize_once(corpus, tmp_path, monkeypatch):
    """torchrun and srun start every rank at once, and each builds the datamodule: one process trains the
    tokenizer (and writes the token cache) while the others wait, then they load it."""
    calls = Counter()

    def slowly(name, function):  # counts the calls and lets the other threads arrive meanwhile
        def call(*args):
            calls[name] += 1
            time.sleep(0.3)
            return function(*args)
        return call

    monkeypatch.setattr(Tokenizer, "train_chars", slowly("train", Tokenizer.train_chars))
    monkeypatch.setattr(datamodules, "tokenize_pieces", slowly("tokenize", datamodules.tokenize_pieces))
    modules = [text_module(corpus, tmp_path) for _ in range(3)]  # one per rank, sharing the cache
    with ThreadPoolExecutor(3) as pool:
        tokenizers = list(pool.map(lambda module: module.tokenizer, modules))
        token_files = list(pool.map(lambda module: module.token_file(), modules))
    assert calls == {"train": 1, "tokenize": 1}
    assert tokenizers[0] == tokenizers[1] == tokenizers[2] and len(set(token_files)) == 1


def test_large_vocabularies_use_uint32_tokens(corpus, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(70_000)}}
    vocab.update({word: len(vocab) + i for i, word in enumerate(WORDS)})
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    dm = text_module(corpus, tmp_path, tokenizer=str(tmp_path / "tokenizer.json"))
    dm.setup("fit")
    assert dm.vocab_size > 2**16 and dm.train_tokens.dtype == np.uint32
    assert int(dm.train_tokens.max()) >= 70_004


def test_training_windows_are_seeded_slices_independent_of_workers(corpus, tmp_path):
    dm = text_module(corpus, tmp_path, seed=3)
    dm.setup("fit")
    single = list(dm.train_dataloader())
    assert len(single) == len(dm.train_dataloader()) == (len(dm.train_tokens) - 1) // 16 // 4
    batch = single[0]
    assert batch.shape == (4, 17) and batch.dtype == torch.int64
    dataset = dm.train_dataloader().dataset
    for row, start in zip(batch, dataset.window_starts(0)):
        assert row.tolist() == dm.train_tokens[start:start + 17].tolist()
    workers = list(DataLoader(dataset, batch_size=None, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(single, workers, strict=True))
    other_seed = text_module(corpus, tmp_path, seed=4)
    other_seed.setup("fit")
    assert not torch.equal(next(iter(other_seed.train_dataloader())), batch)


def test_training_windows_resume_and_continue_over_epochs():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = TokenWindows(tokens, seq_len=10, batch_size=3, shuffle=True, seed=0)
    assert len(windows) == 33
    epoch = list(windows)
    windows.progress.batches = 21  # resumed mid-epoch: the rest of that epoch
    rest = list(DataLoader(windows, batch_size=None, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(rest, epoch[21:], strict=True))
    windows.progress.batches = 33  # the next epoch has new windows
    assert not torch.equal(next(iter(windows)), epoch[0])
    for row in epoch[5]:
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 11))


def test_validation_windows_cover_the_split_once_over_2_ranks_x_2_workers():
    tokens = np.arange(1003, dtype=np.uint32)  # 100 windows of 10 (+1) tokens, 2 tokens left over
    seen = []
    for rank in range(2):
        dataset = TokenWindows(tokens, seq_len=10, batch_size=3, shuffle=False, rank=rank, world_size=2)
        batches = list(DataLoader(dataset, batch_size=None, num_workers=2))
        assert len(batches) == len(dataset)
        seen += [int(row[0]) for batch in batches for row in batch]
    assert sorted(seen) == list(range(0, 1000, 10))


# ----------------------------------------------------------------- streaming
@pytest.mark.parametrize("files", [3, 9])  # fewer files than slots (split by document), and more (by file)
def test_streaming_covers_every_window_once_over_2_ranks_x_2_workers(tmp_path, files):
    texts = write_docs(tmp_path / "docs", files=files, docs=12)
    paths = resolve_files(str(tmp_path / "docs"))
    tokenizer = Tokenizer.train_chars(texts)
    stream = dict(tokenizer=tokenizer, seq_len=16, batch_size=3, cycle=False)

    # each document goes to exactly one of the 4 (rank, worker) slots
    single = PackedStream(paths, **stream)
    slot_pieces = [list(single.pieces(slot, 4)) for slot in range(4)]
    assert sorted(text for pieces in slot_pieces for text, _ in pieces) == sorted(texts)
    assert all(slot_pieces)

    # the DataLoaders of 2 ranks with 2 workers each yield exactly the windows of the 4 slots
    expected = Counter(tuple(w) for slot in range(4) for w in single.windows(slot, 4))
    seen = Counter()
    for rank in range(2):
        loader = DataLoader(PackedStream(paths, **stream, rank=rank, world_size=2), batch_size=None, num_workers=2)
        seen.update(tuple(row.tolist()) for batch in loader for row in batch)
    assert seen == expected  # as multisets: nothing dropped, nothing twice

    # and a slot's windows are its documents, packed with eos, less fewer than seq_len tokens at the end
    eos = tokenizer.eos_token_id
    for slot in range(4):
        windows = list(single.windows(slot, 4))
        packed = [t for w in windows[:1] for t in w] + [t for w in windows[1:] for t in w[1:]]
        stream_tokens = [t for text, _ in slot_pieces[slot] for t in [*tokenizer.encode(text), eos]]
        assert packed == stream_tokens[:len(packed)] and len(stream_tokens) - len(packed) < 16


def test_streaming_resumes_at_the_same_window_with_shuffling_and_workers(tmp_path):
    texts = write_docs(tmp_path / "docs", files=2, docs=30)
    paths = resolve_files(str(tmp_path / "docs"))
    stream = dict(tokenizer=Tokenizer.train_chars(texts), seq_len=16, batch_size=2, cycle=True, shuffle_buffer=8,
                  seed=1, rank=1, world_size=2)
    loader = DataLoader(PackedStream(paths, **stream), batch_size=None, num_workers=2)
    first = [batch for batch, _ in zip(loader, range(60))]  # several passes over this rank's documents
    resumed = DataLoader(PackedStream(paths, **stream, progress=Progress(batches=37)), batch_size=None, num_workers=2)
    again = [batch for batch, _ in zip(resumed, range(23))]
    assert all(torch.equal(a, b) for a, b in zip(again, first[37:], strict=True))
    assert not torch.equal(first[0], first[1])


def fit(dm, tmp_path, max_steps, ckpt_path=None, every=None):
    recorder = RecordBatches()
    callbacks = [recorder] + ([Checkpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every)] if every else [])
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(every), limit_val_batches=0, callbacks=callbacks, accelerator="cpu")
    trainer.fit(tiny_model("GPT2", vocab_size=dm.vocab_size), dm, ckpt_path=ckpt_path)
    return recorder.batches["train"]


@pytest.mark.parametrize("streaming", [False, True])
def test_resumed_training_sees_the_batches_an_uninterrupted_run_sees(tmp_path, corpus, streaming):
    """Through a Lightning Trainer: a run stopped at step 3 and resumed from its checkpoint continues with
    batch 4 (for the unsized stream too, where Lightning prefetches a batch)."""
    if streaming:
        write_docs(corpus, files=2, docs=40)
        def make():
            return StreamingTextDataModule(str(corpus), tokenizer="char", seq_len=16, batch_size=2, num_workers=2,
                                           shuffle_buffer=16, cache_dir=str(tmp_path / "cache"))
    else:
        def make():
            return text_module(corpus, tmp_path)
    uninterrupted = fit(make(), tmp_path / "a", max_steps=7)
    fit(make(), tmp_path / "b", max_steps=3, every=3)
    checkpoint = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed_batches"] == 3
    assert (tmp_path / "b" / "ckpt" / "tokenizer.json").exists()
    resumed = fit(make(), tmp_path / "c", max_steps=7, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt")
    assert len(resumed) == 4
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[3:], strict=True))


def test_resume_refuses_a_different_tokenizer(tmp_path, corpus):
    dm = text_module(corpus, tmp_path)
    state = dm.state_dict()
    other = text_module(corpus, tmp_path, tokenizer="bpe", bpe_vocab_size=300)
    with pytest.raises(ValueError, match="tokenizer differs from the checkpoint's"):
        other.load_state_dict(state)
    dm.load_state_dict(state)


def test_streaming_needs_max_steps(corpus, tmp_path):
    dm = StreamingTextDataModule(str(corpus), tokenizer="char", cache_dir=str(tmp_path))
    dm.trainer = L.Trainer(max_epochs=1, logger=False)
    with pytest.raises(ValueError, match="streams forever: set --trainer.max_steps"):
        dm.setup("fit")
