"""Supervised fine-tuning data: instruction / chat records rendered with a chat template, tokenized, with the loss
on the assistant turns only (see docs/finetuning.md)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from functools import cached_property
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from llmzoo.data.chat import CHECKPOINT_KEY, ChatTemplate, read_records, template_source
from llmzoo.data.datamodules import LanguageDataModule
from llmzoo.data.datasets import Progress, worker_slot
from llmzoo.data.sources import resolve_files
from llmzoo.data.tokenizer import Tokenizer, load_tokenizer_for_checkpoint
IGNORE_INDEX = -100  # the label of a token without loss, as in the models
OVERLONG = ("truncate", "drop")


def encode_chats(tokenizer: Tokenizer, texts: list[str]) -> list:
    """``tokenizers.Encoding`` s (ids and character offsets) of rendered chats. Unlike :meth:`Tokenizer.encode`, the
    special tokens a text spells (the template's ``<|im_start|>``, ``<|eos|>``) become those tokens, as Hugging Face
    tokenizes a rendered chat (``apply_chat_template``) — in the messages' text too."""
    inner = tokenizer.tokenizer
    inner.encode_special_tokens = False
    try:
        return inner.encode_batch(texts, add_special_tokens=False)
    finally:
        inner.encode_special_tokens = True


def assistant_labels(ids: np.ndarray, offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """``ids`` where the token overlaps an assistant span (``offsets [T, 2]``, character ranges), else -100: the rule
    of Hugging Face's ``return_assistant_tokens_mask``."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    inside = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        inside |= (ends > start) & (starts < end)
    return np.where(inside, ids, IGNORE_INDEX)


class ExampleBatches(IterableDataset):
    """Batches of tokenized examples padded to their longest row: ``{"input_ids", "labels", "attention_mask"}``,
    each ``[B, L]`` (labels -100 on the prompt and the padding, attention_mask 0 on the padding).

    ``shuffle=True`` (training): each epoch is a new permutation of the examples, seeded by ``(seed, epoch)``, cut
    into full batches that the ranks take in turns; batch ``k`` is a pure function of ``k``, so a resumed run starts
    at batch ``progress.batches``. ``shuffle=False`` (evaluation): the examples in order, every one once, the ranks
    taking batches in turns."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int, pad_token_id: int,
                 shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, progress: Progress | None = None):
        self.examples, self.batch_size, self.pad_token_id, self.shuffle = examples, batch_size, pad_token_id, shuffle
        self.seed, self.rank, self.world_size, self.progress = seed, rank, world_size, progress or Progress()
        if shuffle:
            self.num_batches = len(examples) // (batch_size * world_size)
            if self.num_batches == 0:
                raise ValueError(f"{len(examples)} training examples do not fill one batch of {batch_size} on each of "
                                 f"{world_size} rank(s): give more examples or a smaller --data.batch_size")
        else:
            self.num_batches = len(range(rank, -(-len(examples) // batch_size), world_size))

    def __len__(self) -> int:
        return self.num_batches

    def indices(self, batch: int) -> np.ndarray:
        """The examples of this rank's batch number ``batch``."""
        index = batch * self.world_size + self.rank
        if not self.shuffle:
            return np.arange(index * self.batch_size, min((index + 1) * self.batch_size, len(self.examples)))
        epoch, position = divmod(index, self.num_batches * self.world_size)
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.examples))
        return order[position * self.batch_size:(position + 1) * self.batch_size]

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return pad_rows([self.examples[i] for i in indices], self.pad_token_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, num_workers = worker_slot()
        start = self.progress.batches if self.shuffle else 0
        end = (start // self.num_batches + 1) * self.num_batches if self.shuffle else self.num_batches
        for batch in range(start + worker, end, num_workers):
            yield self.collate(self.indices(batch))


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``(ids [T], labels [T])`` rows padded to the longest: ``{"input_ids", "labels", "attention_mask"}`` ``[B, L]``
    (labels -100 and attention_mask 0 on the padding)."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), length), pad_token_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, :len(ids)], labels[row, :len(ids)], mask[row, :len(ids)] = ids, row_labels, 1
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask)}


class SFTDataModule(LanguageDataModule):
    """Instruction and chat records for supervised fine-tuning: ``.jsonl`` (a record a line) or ``.json`` (a list)
    files, each in one of the formats ``{"messages": [{"role", "content"}, ...]}`` (multi-turn, roles system / user
    / assistant), ``{"prompt", "response"}``, ``{"prompt", "completion"}`` or Alpaca's ``{"instruction", "input",
    "output"}`` (the last three may add a ``"system"``), detected from a file's first record.

    Each example is rendered with the chat ``template`` and tokenized with the pretrained model's tokenizer
    (``tokenizer``: its checkpoint or Hugging Face directory; ``llmzoo fit`` passes ``--model.pretrained``). With
    ``mask_prompt`` (the default) the labels are -100 everywhere but on the tokens of the assistant turns (every one
    of a conversation, with the end-of-turn marker that closes it), so only answers are learnt.

    An example longer than ``seq_len + 1`` tokens (the model reads ``seq_len`` of them) is cut to that length when
    ``overlong="truncate"`` (dropped if no assistant token is left) or dropped with ``"drop"``; a warning counts
    them. ``val_path`` is the validation data; without it, a seeded ``val_fraction`` of the examples. Training
    batches are seeded permutations of the examples (:class:`ExampleBatches`), padded to the longest row, and
    resume exactly.

    Args:
        path: the instruction data: files, folders or globs of .jsonl / .json files.
        val_path: validation data in the same formats (default: val_fraction of path's examples).
        val_fraction: the share of the examples held out for validation when there is no val_path.
        seq_len: the longest input of the model; an example has at most seq_len + 1 tokens.
        batch_size: examples per batch.
        num_workers: DataLoader workers.
        tokenizer: the pretrained model's checkpoint, Hugging Face directory or tokenizer.json (default: the CLI
            passes --model.pretrained); never trained anew.
        template: the chat template: chatml, llama3, alpaca or a .jinja file; default: the tokenizer source's own
            (a Hugging Face directory's chat_template, a fine-tuning run's), else chatml.
        mask_prompt: loss on the assistant turns only (false: on every token).
        overlong: what happens to an example longer than seq_len + 1 tokens: truncate or drop.
        seed: seed of the split and of the order of the training examples.
    """

    def __init__(self, path: str | list[str] | None = None, val_path: str | list[str] | None = None,
                 val_fraction: float = 0.05, seq_len: int = 512, batch_size: int = 8, num_workers: int = 0,
                 tokenizer: str | None = None, template: str | None = None, mask_prompt: bool = True,
                 overlong: str = "truncate", seed: int = 0):
        if overlong not in OVERLONG:
            raise ValueError(f"--data.overlong={overlong!r}: use one of {', '.join(OVERLONG)}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"--data.val_fraction={val_fraction} must be in [0, 1)")
        super().__init__(path, seq_len, batch_size, num_workers, tokenizer, seed=seed)
        self.train_examples = self.val_examples = None

    # ----------------------------------------------------------------- tokenizer and template
    @cached_property
    def tokenizer(self) -> Tokenizer:
        if self.hparams.tokenizer is None:
            raise ValueError("SFTDataModule needs the pretrained model's tokenizer: give --model.pretrained (llmzoo fit "
                             "takes the tokenizer from it) or --data.tokenizer <its checkpoint or directory>")
        return load_tokenizer_for_checkpoint(self.hparams.tokenizer)

    @cached_property
    def chat_template(self) -> ChatTemplate:
        name, source = template_source(self.hparams.template, self.hparams.tokenizer)
        return ChatTemplate(source, name, **self.tokenizer.special_tokens)

    # ----------------------------------------------------------------- examples
    def encode(self, conversations: list[list[dict]]) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
        """``(examples, truncated, dropped)``: each conversation as ``(ids [T], labels [T])`` int64 arrays."""
        rendered = [self.chat_template.assistant_spans(messages) for messages in conversations]
        encodings = encode_chats(self.tokenizer, [text for text, _ in rendered])
        limit, truncated, dropped, examples = self.hparams.seq_len + 1, 0, 0, []
        for encoding, (_, spans) in zip(encodings, rendered):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            labels = assistant_labels(ids, np.asarray(encoding.offsets).reshape(-1, 2), spans) if self.hparams.mask_prompt else ids
            if len(ids) > limit:
                if self.hparams.overlong == "drop" or (labels[:limit] == IGNORE_INDEX).all():
                    dropped += 1
                    continue
                ids, labels, truncated = ids[:limit], labels[:limit], truncated + 1
            examples.append((ids, labels))
        return examples, truncated, dropped

    def read_file(self, file) -> list:
        """The records of one file, checked (conversations; PreferenceDataModule's: pairs)."""
        return read_records(file)

    def overlong_note(self, truncated: int, dropped: int) -> str:
        """What the warning about long examples says was done with them."""
        return (f"{truncated} truncated, {dropped} dropped (overlong={self.hparams.overlong!r}; a longer --data.seq_len "
                f"keeps them whole)")

    def read(self, path: str | list[str]) -> list:
        """The examples of the files of ``path``, with a warning counting those cut or dropped for their length."""
        records = [record for file in resolve_files(path) for record in self.read_file(file)]
        examples, truncated, dropped = self.encode(records)
        if truncated or dropped:
            warnings.warn(f"{path}: {truncated + dropped} of {len(records)} {self.unit}s are longer than seq_len + 1 = "
                          f"{self.hparams.seq_len + 1} tokens: {self.overlong_note(truncated, dropped)}", stacklevel=2)
        if not examples:
            raise ValueError(f"{path}: no {self.unit} is left to train on (all longer than seq_len + 1 = "
                             f"{self.hparams.seq_len + 1} tokens): use a longer --data.seq_len")
        return examples

    def check_model(self, model) -> None:
        """The base class's checks, then the data is read (the CLI calls this before training: a malformed record or a
        failing template stops the run before anything is written)."""
        super().check_model(model)
        self.load_examples()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.load_examples()

    def load_examples(self) -> None:
        """Read, render and tokenize the training and validation examples (once)."""
        if self.train_examples is not None:
            return
        hp = self.hparams
        if hp.path is None:
            raise ValueError(f"{type(self).__name__} needs data: --data.path <a .jsonl of {self.unit}s> (see "
                             f"docs/finetuning.md)")
        examples = self.read(hp.path)
        if hp.val_path is not None:
            self.train_examples, self.val_examples = examples, self.read(hp.val_path)
        else:
            order = np.random.default_rng(hp.seed).permutation(len(examples))
            held_out = int(len(examples) * hp.val_fraction)
            self.val_examples = [examples[i] for i in sorted(order[:held_out])]
            self.train_examples = [examples[i] for i in sorted(order[held_out:])]
        rank_zero_info(f"{type(self).__name__}: {len(self.train_examples)} training and {len(self.val_examples)} "
                       f"validation examples, chat template {self.chat_template.name}")

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    batch_class = ExampleBatches  # what batches examples (PreferenceDataModule's: pairs)
    unit = "example"  # what a record is called in messages

    def batches(self, examples: list, train: bool) -> ExampleBatches:
        rank, world_size = self.rank_and_world_size
        return self.batch_class(examples, self.hparams.batch_size, self.pad_token_id, shuffle=train, seed=self.hparams.seed,
                              rank=rank, world_size=world_size, progress=self.progress if train else None)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.batches(self.train_examples, train=True), train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self.loader(self.batches(self.val_examples, train=False), train=False) if self.val_examples else []

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The tokenizer and the chat template (``llmzoo generate --chat`` and ``llmzoo chat`` read them)."""
        return {**super().state_dict(), CHECKPOINT_KEY: self.chat_template.source,
                "chat_template_name": self.chat_template.name}
