"""Iterable datasets that yield whole batches of token windows ``[B, T + 1]`` (``DataLoader(batch_size=None)``).

Both share one rule for splitting the work: the batches of a rank are numbered ``k = 0, 1, ...`` and an
iteration starts at batch ``start = progress.batches`` (the batches the trainer has consumed, restored
from a checkpoint), so a resumed run continues with the batch it would have seen next. A DataLoader
takes batches from its ``W`` workers in turn, beginning with worker 0, so worker ``w`` yields the batches
``k = start + w, start + w + W, ...``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, count
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llmzoo.data.sources import read_pieces
from llmzoo.data.tokenizer import Tokenizer

ENCODE_CHARS, ENCODE_PIECES = 1 << 22, 1024  # text handed to the tokenizer per encode_batch call, at most


@dataclass
class Progress:
    """Training batches consumed on each rank (the same number on every rank)."""

    batches: int = 0


class ResumableLoader(DataLoader):
    """The training DataLoader (``batch_size=None``) of a :class:`TokenWindows` or :class:`PackedStream`.

    Lightning saves its ``state_dict`` in every checkpoint and restores it on resume: the training batches
    consumed so far (``dataset.progress``, counted by the datamodule where the trainer takes each batch,
    so Lightning's prefetching does not count), which is the same on every rank."""

    def state_dict(self) -> dict:
        return {"consumed_batches": self.dataset.progress.batches, "world_size": self.dataset.world_size,
                "num_workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.progress.batches = state["consumed_batches"]
        before, now = (state["world_size"], state["num_workers"]), (self.dataset.world_size, self.num_workers)
        if before != now and isinstance(self.dataset, PackedStream):
            warnings.warn(f"the checkpoint was trained with {before[0]} ranks x {before[1]} DataLoader workers, "
                          f"this run has {now[0]} x {now[1]}: the stream of documents differs from an "
                          f"uninterrupted run", stacklevel=2)


def worker_slot() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the DataLoader worker running this code (``(0, 1)`` in the main process)."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TokenWindows(IterableDataset):
    """Windows of ``seq_len + 1`` tokens from a token array (a memory map).

    ``shuffle=True`` (training): each batch holds ``batch_size`` windows at uniformly random offsets, drawn
    from a generator seeded by ``(seed, global batch index)`` — reproducible, and any batch can be made
    without making the ones before it. An epoch is as many batches as the tokens fill windows, and
    batches go on (new ones) in the next epoch.
    ``shuffle=False`` (evaluation): consecutive windows with a stride of ``seq_len`` (each token is
    predicted once), in order; ranks take turns batch by batch and together cover every window once.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, progress: Progress | None = None):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens are fewer than seq_len + 1 = {seq_len + 1}: "
                             f"give more text or a shorter --data.seq_len")
        self.tokens, self.seq_len, self.batch_size, self.shuffle, self.seed = tokens, seq_len, batch_size, shuffle, seed
        self.rank, self.world_size, self.progress = rank, world_size, progress or Progress()
        self.num_windows = (len(tokens) - 1) // seq_len
        if shuffle:
            self.num_batches = max(1, self.num_windows // (batch_size * world_size))
        else:
            global_batches = -(-self.num_windows // batch_size)
            self.num_batches = len(range(rank, global_batches, world_size))

    def __len__(self) -> int:
        """Batches of this rank in one epoch."""
        return self.num_batches

    def window_starts(self, batch: int) -> np.ndarray:
        """Start offsets of the windows in this rank's batch number ``batch``."""
        index = batch * self.world_size + self.rank
        if self.shuffle:
            rng = np.random.default_rng((self.seed, index))
            return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        windows = np.arange(index * self.batch_size, min((index + 1) * self.batch_size, self.num_windows))
        return windows * self.seq_len

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker, num_workers = worker_slot()
        start = self.progress.batches if self.shuffle else 0
        end = (start // self.num_batches + 1) * self.num_batches if self.shuffle else self.num_batches
        offsets = np.arange(self.seq_len + 1)
        for batch in range(start + worker, end, num_workers):
            windows = self.tokens[self.window_starts(batch)[:, None] + offsets]
            yield torch.from_numpy(windows.astype(np.int64))


class PackedStream(IterableDataset):
    """Documents read lazily from ``files``, tokenized on the fly, packed into windows of ``seq_len + 1``
    tokens (stride ``seq_len``) with ``eos`` after every document, and batched.

    The work is split into ``slots = world_size x DataLoader workers``. With at least as many files as
    slots each slot reads its own files; otherwise every slot reads every file and keeps every
    ``slots``-th piece (JSON line or chunk of text). Either way each piece goes to exactly one slot.

    ``cycle=True`` (training) streams forever, pass after pass over the corpus, each pass in a new seeded
    file order; windows go through a seeded shuffle buffer of ``shuffle_buffer`` windows. ``cycle=False``
    (evaluation) reads one pass in order and ends with a last, possibly smaller, batch.

    Resuming skips the batches this worker already produced by streaming through them again (the
    stream is deterministic, so the position is exact); that re-reads and re-tokenizes that text.
    """

    def __init__(self, files: list[Path], tokenizer: Tokenizer, seq_len: int, batch_size: int, cycle: bool,
                 shuffle_buffer: int = 0, seed: int = 0, text_field: str = "text", rank: int = 0,
                 world_size: int = 1, progress: Progress | None = None):
        if not files:
            raise ValueError("no files to stream")
        self.files, self.tokenizer, self.seq_len, self.batch_size = list(files), tokenizer, seq_len, batch_size
        self.cycle, self.shuffle_buffer, self.seed, self.text_field = cycle, shuffle_buffer, seed, text_field
        self.rank, self.world_size, self.progress = rank, world_size, progress or Progress()

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker, num_workers = worker_slot()
        if num_workers > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a forked worker encodes on one thread, quietly
        start = self.progress.batches if self.cycle else 0
        # the stream of batches k ≡ slot (mod W) belongs to one slot for good; the DataLoader's first worker
        # must serve the slot that holds batch ``start``
        slot = (worker + start) % num_workers
        windows = self.windows(self.rank * num_workers + slot, self.world_size * num_workers)
        if self.cycle and self.shuffle_buffer > 1:
            windows = shuffled(windows, self.shuffle_buffer, np.random.default_rng((self.seed, self.rank, slot)))
        skip = len(range(slot, start, num_workers))
        for number, batch in enumerate(batched(windows, self.batch_size)):
            if number >= skip:
                yield torch.from_numpy(np.stack(batch).astype(np.int64))

    def pieces(self, slot: int, slots: int) -> Iterator[tuple[str, bool]]:
        """``(text, ends_document)`` pieces of this slot, pass after pass when cycling."""
        for epoch in count() if self.cycle else [0]:
            files = self.files
            if self.cycle:
                files = [files[i] for i in np.random.default_rng((self.seed, epoch)).permutation(len(files))]
            produced = False
            if len(files) >= slots:
                for file in files[slot::slots]:
                    for piece in read_pieces(file, self.text_field):
                        produced = True
                        yield piece
            else:
                every = chain.from_iterable(read_pieces(file, self.text_field) for file in files)
                for number, piece in enumerate(every):
                    if number % slots == slot:
                        produced = True
                        yield piece
            if self.cycle and not produced:
                raise ValueError(f"the corpus ({len(files)} files) has no text for slot {slot} of {slots} "
                                 f"(ranks x workers): give more text or use fewer --data.num_workers")

    def windows(self, slot: int, slots: int) -> Iterator[np.ndarray]:
        """Packed windows ``[seq_len + 1]`` of this slot; the tokens left over carry into the next window."""
        carry = np.empty(0, dtype=np.int64)
        for tokens in tokenize_pieces(self.tokenizer, self.pieces(slot, slots), np.int64):
            carry = np.concatenate([carry, tokens])
            num_windows = (len(carry) - 1) // self.seq_len
            if num_windows > 0:
                yield from np.lib.stride_tricks.sliding_window_view(carry, self.seq_len + 1)[::self.seq_len][:num_windows].copy()
                carry = carry[num_windows * self.seq_len:]


def tokenize_pieces(tokenizer: Tokenizer, pieces: Iterable[tuple[str, bool]], dtype) -> Iterator[np.ndarray]:
    """The tokens of ``(text, ends_document)`` pieces with ``eos`` after each document, one array per
    parallel ``encode_batch`` call."""
    eos = [tokenizer.eos_token_id]
    for group in _groups(pieces):
        ids = tokenizer.encode_batch([text for text, _ in group])
        yield np.fromiter(chain.from_iterable(chain(i, eos[:end]) for i, (_, end) in zip(ids, group)), dtype=dtype)


def _groups(pieces: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    """Consecutive pieces in groups of about ``ENCODE_CHARS`` characters or ``ENCODE_PIECES`` pieces."""
    group, size = [], 0
    for piece in pieces:
        group.append(piece)
        size += len(piece[0])
        if size >= ENCODE_CHARS or len(group) == ENCODE_PIECES:
            yield group
            group, size = [], 0
    if group:
        yield group


def shuffled(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """``items`` through a shuffle buffer of ``size``: each output is a random one of the last ``size`` inputs."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.integers(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` consecutive items (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
