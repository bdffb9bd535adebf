"""LightningDataModules: ``TextDataModule`` (tokenize once into a cached memory map) and
``StreamingTextDataModule`` (tokenize on the fly, for corpora larger than memory)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from llmzoo.data.datasets import PackedStream, Progress, ResumableLoader, TokenWindows, tokenize_pieces
from llmzoo.data.sources import (cache_dir, cache_key, check_text_files, one_at_a_time, read_pieces,
                                 resolve_files)
from llmzoo.data.token_bytes import token_byte_lengths
from llmzoo.files import write_atomic
from llmzoo.data.tokenizer import Tokenizer, load_tokenizer_for_checkpoint

TOKENIZER_KINDS = {"bpe": "byte-level BPE", "char": "character-level"}
TOKEN_FILE_VERSION = 1  # part of the token cache key: bump when the way text becomes tokens changes
# TokenWindows and PackedStream split the work over DataLoader workers themselves
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class LanguageDataModule(L.LightningDataModule):
    """What both datamodules share: the tokenizer, the loaders and the position of training in the data.

    ``tokenizer`` is ``"bpe"`` (train a byte-level BPE of ``bpe_vocab_size`` tokens on the corpus),
    ``"char"`` (one token per character), or the path of a ``tokenizer.json``, of a directory holding one,
    or of a checkpoint (its run's tokenizer). Trained tokenizers are cached in ``cache_dir``.

    Resuming: the module counts the training batches the trainer consumes; the training loader
    (:class:`~llmzoo.data.datasets.ResumableLoader`) keeps the count in every checkpoint and a resumed run
    starts at the next batch. The count is the same on every rank, so rank 0's checkpoint serves all
    ranks. The module's own ``state_dict`` keeps the tokenizer (see :func:`load_tokenizer_for_checkpoint`).
    """

    def __init__(self, path: str | list[str] | None = None, seq_len: int = 256, batch_size: int = 16,
                 num_workers: int = 0, tokenizer: str = "bpe", bpe_vocab_size: int = 8192, text_field: str = "text",
                 seed: int = 0, cache_dir: str | None = None, allow_binary: bool = False):
        super().__init__()
        if seq_len < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(f"--data.seq_len={seq_len}, --data.batch_size={batch_size}, --data.num_workers="
                             f"{num_workers}: seq_len and batch_size must be positive, num_workers 0 or more")
        self.save_hyperparameters()
        self.progress = Progress()

    # ----------------------------------------------------------------- corpus and tokenizer
    @cached_property
    def files(self) -> list[Path]:
        """The corpus files (``path`` resolved; the Python standard library when ``path`` is None)."""
        files = resolve_files(self.hparams.path)
        if self.hparams.path is None:
            rank_zero_info(f"No --data.path: using the default corpus, {len(files)} .py files of the Python "
                           f"standard library under {os.path.commonpath(files)}")
        if not any(file.stat().st_size for file in files):
            raise ValueError(f"the corpus is empty: the {len(files)} file(s) of --data.path {self.hparams.path!r} "
                             f"hold no text; give files with text")
        if not self.hparams.get("allow_binary", False):  # (the JSON-reading modules take no such flag)
            check_text_files(files)
        return files

    def training_text(self) -> Iterator[str]:
        """The text a new tokenizer is trained on."""
        for file in self.files:
            for text, _ in read_pieces(file, self.hparams.text_field):
                yield text

    def tokenizer_cache_key(self) -> str:
        hp = self.hparams
        return cache_key(self.files, hp.tokenizer, hp.bpe_vocab_size if hp.tokenizer == "bpe" else None, hp.text_field)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        spec = self.hparams.tokenizer
        if spec not in TOKENIZER_KINDS:
            return load_tokenizer_for_checkpoint(spec)
        path = cache_dir(self.hparams.cache_dir) / f"tokenizer-{spec}-{self.tokenizer_cache_key()}.json"
        with one_at_a_time(path):  # every rank builds the datamodule; one trains, the others load
            if path.exists():
                return Tokenizer.from_file(path)
            rank_zero_info(f"Training a {TOKENIZER_KINDS[spec]} tokenizer on {len(self.files)} files")
            if spec == "bpe":
                tokenizer = Tokenizer.train_bpe(self.training_text(), self.hparams.bpe_vocab_size)
            else:
                tokenizer = Tokenizer.train_chars(self.training_text())
            tokenizer.save(path)
        rank_zero_info(f"Tokenizer with {tokenizer.vocab_size} tokens cached at {path}")
        return tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (the CLI links it into the model's ``vocab_size``)."""
        return self.tokenizer.vocab_size

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.check_model(self.trainer.lightning_module)
            self.check_run(self.trainer, stage)

    def check_run(self, trainer: L.Trainer, stage: str) -> None:
        """Raises a ``ValueError`` unless this data can feed ``trainer``'s ``stage`` (``"fit"``, ...): what it can
        check before the trainer starts (the CLI calls it then; ``setup`` calls it too). Here: nothing."""

    def check_model(self, model: L.LightningModule) -> None:
        """Raises a ``ValueError`` unless ``model`` can read this data: every token id below its ``vocab_size``,
        ``seq_len`` within its ``max_position_embeddings`` (``setup`` checks the trainer's model; the CLI
        checks before it starts the trainer, which writes logs even when it fails)."""
        hparams = getattr(model, "hparams", {})
        vocab_size, context = hparams.get("vocab_size"), hparams.get("max_position_embeddings")
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {self.vocab_size} tokens, more than the model's vocab_size="
                             f"{vocab_size}: use the tokenizer the model was trained with (--data.tokenizer "
                             f"<its checkpoint or tokenizer.json>) or a model with a larger vocab_size")
        if context is not None and self.hparams.seq_len > context:
            raise ValueError(f"--data.seq_len={self.hparams.seq_len} is longer than the model's "
                             f"max_position_embeddings={context}: use --data.seq_len {context} or less, or a "
                             f"longer-context model")

    # ----------------------------------------------------------------- loaders
    @property
    def rank_and_world_size(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def loader(self, dataset: IterableDataset, train: bool) -> DataLoader:
        return (ResumableLoader if train else DataLoader)(dataset, batch_size=None, pin_memory=torch.cuda.is_available(),
                                                          num_workers=self.hparams.num_workers)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self.val_dataloader()

    # ----------------------------------------------------------------- resuming
    @cached_property
    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes of each token id ``[vocab_size]`` (:func:`~llmzoo.data.token_bytes.token_byte_lengths`)."""
        return token_byte_lengths(self.tokenizer)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.progress.batches += 1  # counted where the trainer consumes a batch, after any prefetching
        elif self.trainer is not None and isinstance(batch, torch.Tensor) and (
                self.trainer.validating or self.trainer.testing or self.trainer.sanity_checking):
            # the bytes its targets spell: the model logs bits per byte next to loss and perplexity
            batch = {"input_ids": batch, "num_bytes": self.token_bytes[batch[:, 1:]].sum()}
        return batch

    def state_dict(self) -> dict:
        return self.tokenizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        saved = Tokenizer.from_state_dict(state)
        if saved != self.tokenizer:
            raise ValueError("this run's tokenizer differs from the checkpoint's (did the corpus change?): "
                             "pass --data.tokenizer <the checkpoint> to use the checkpoint's tokenizer")


class TextDataModule(LanguageDataModule):
    """Text files, folders, globs or ``.jsonl`` (field ``text_field``), tokenized once into a memory-mapped
    token file that is cached under a key of (files, sizes, modification times, tokenizer), so later runs
    skip tokenization. Documents are joined with ``eos``; the last ``val_fraction`` of the tokens is the
    validation split (also used by ``test`` and ``predict``).

    Training batches hold ``batch_size`` windows of ``seq_len + 1`` tokens at seeded random offsets;
    validation reads consecutive windows. See :class:`~llmzoo.data.LanguageDataModule` for the tokenizer.
    """

    def __init__(self, path: str | list[str] | None = None, val_fraction: float = 0.1, seq_len: int = 256,
                 batch_size: int = 16, num_workers: int = 0, tokenizer: str = "bpe", bpe_vocab_size: int = 8192,
                 text_field: str = "text", seed: int = 0, cache_dir: str | None = None, allow_binary: bool = False):
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
        super().__init__(path, seq_len, batch_size, num_workers, tokenizer, bpe_vocab_size, text_field, seed,
                         cache_dir, allow_binary)
        self.train_tokens = self.val_tokens = None

    def token_file(self) -> Path:
        """The cached token file of the corpus, written (atomically, with a progress bar) if missing."""
        tokenizer = self.tokenizer
        key = cache_key(self.files, self.hparams.text_field, tokenizer.to_str(), TOKEN_FILE_VERSION)
        path = cache_dir(self.hparams.cache_dir) / f"tokens-{key}.{np.dtype(self.token_dtype).name}"
        def write(out) -> None:
            total = sum(file.stat().st_size for file in self.files)
            with tqdm(total=total, unit="B", unit_scale=True, desc="Tokenizing") as bar:
                for tokens in tokenize_pieces(tokenizer, self._pieces(bar), self.token_dtype):
                    tokens.tofile(out)

        with one_at_a_time(path):  # prepare_data runs on every node: with a shared cache, one node tokenizes
            if not path.exists():
                write_atomic(path, write)
        return path

    def _pieces(self, bar: tqdm) -> Iterator[tuple[str, bool]]:
        done = 0
        for file in self.files:
            for piece in read_pieces(file, self.hparams.text_field):
                bar.update(len(piece[0]))  # characters, about bytes
                yield piece
            done += file.stat().st_size
            bar.update(done - bar.n)

    @property
    def token_dtype(self) -> type:
        return np.uint16 if self.tokenizer.vocab_size <= 2**16 else np.uint32

    def prepare_data(self) -> None:
        self.token_file()

    def setup(self, stage: str) -> None:
        tokens = np.memmap(self.token_file(), dtype=self.token_dtype, mode="r")
        split = len(tokens) - int(len(tokens) * self.hparams.val_fraction)
        self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]
        super().setup(stage)

    def check_run(self, trainer: L.Trainer, stage: str) -> None:
        """Training needs one window of ``seq_len + 1`` tokens in the training split (tokenizing the corpus
        into its cache first, as ``prepare_data`` does)."""
        if stage == "fit":
            tokens = self.token_file().stat().st_size // np.dtype(self.token_dtype).itemsize
            train = tokens - int(tokens * self.hparams.val_fraction)
            if train < self.hparams.seq_len + 1:
                raise ValueError(f"the corpus holds {tokens} tokens, {train} of them for training: fewer than one "
                                 f"window of --data.seq_len + 1 = {self.hparams.seq_len + 1}; give more text or a "
                                 f"shorter --data.seq_len")

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self.rank_and_world_size
        hp = self.hparams
        return self.loader(TokenWindows(self.train_tokens, hp.seq_len, hp.batch_size, shuffle=True, seed=hp.seed,
                                        rank=rank, world_size=world_size, progress=self.progress), train=True)

    def val_dataloader(self) -> DataLoader | list:
        if not len(self.val_tokens):
            return []
        rank, world_size = self.rank_and_world_size
        hp = self.hparams
        return self.loader(TokenWindows(self.val_tokens, hp.seq_len, hp.batch_size, shuffle=False,
                                        rank=rank, world_size=world_size), train=False)


class StreamingTextDataModule(LanguageDataModule):
    """Corpora larger than memory: shards (text or ``.jsonl``, gzipped or not) read lazily, tokenized on the
    fly and packed into windows of ``seq_len + 1`` tokens with ``eos`` between documents, through a seeded
    shuffle buffer of ``shuffle_buffer`` windows, split over ranks and DataLoader workers so that no
    window is read twice or skipped (see :class:`~llmzoo.data.datasets.PackedStream`).

    Training streams forever (pass after pass), so the trainer needs ``max_steps`` and an integer
    ``val_check_interval``; ``val_path`` (optional) is the validation corpus, read once per validation.
    A new tokenizer is trained on the first ``tokenizer_train_chars`` characters of the corpus.
    """

    def __init__(self, path: str | list[str] | None = None, val_path: str | list[str] | None = None,
                 seq_len: int = 256, batch_size: int = 16, num_workers: int = 0, shuffle_buffer: int = 10_000,
                 tokenizer: str = "bpe", bpe_vocab_size: int = 8192, tokenizer_train_chars: int = 100_000_000,
                 text_field: str = "text", seed: int = 0, cache_dir: str | None = None, allow_binary: bool = False):
        super().__init__(path, seq_len, batch_size, num_workers, tokenizer, bpe_vocab_size, text_field, seed,
                         cache_dir, allow_binary)

    def training_text(self) -> Iterator[str]:
        remaining = self.hparams.tokenizer_train_chars
        for text in super().training_text():
            if remaining <= 0:
                return
            remaining -= len(text)
            yield text

    def tokenizer_cache_key(self) -> str:
        return cache_key([], super().tokenizer_cache_key(), self.hparams.tokenizer_train_chars)

    def check_run(self, trainer: L.Trainer, stage: str) -> None:
        if stage == "fit" and trainer.max_steps < 0:
            raise ValueError("StreamingTextDataModule streams forever: set --trainer.max_steps "
                             "(and an integer --trainer.val_check_interval)")

    def stream(self, files: list[Path], cycle: bool) -> PackedStream:
        rank, world_size = self.rank_and_world_size
        hp = self.hparams
        return PackedStream(files, self.tokenizer, hp.seq_len, hp.batch_size, cycle=cycle,
                            shuffle_buffer=hp.shuffle_buffer, seed=hp.seed, text_field=hp.text_field, rank=rank,
                            world_size=world_size, progress=self.progress)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.stream(self.files, cycle=True), train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.hparams.val_path is None:
            return []
        return self.loader(self.stream(resolve_files(self.hparams.val_path), cycle=False), train=False)
