"""The batching engine of ``llmzoo serve``: one worker thread owns the model and its KV cache and decodes the
waiting sequences together; each sequence hands its text to an asyncio queue of the request it belongs to.

Batching is continuous, by re-prefilling: the sequences waiting when the worker is free (and those that arrive
within ``batch_window`` seconds after the first, up to ``max_batch_size`` rows that fit in the context together)
are left-padded into one batch and decoded with one forward per step for the whole batch, through the same
prefill and step functions as :func:`llmzoo.generation.generate` (so greedy text is the same, token for token). A
sequence that ends (end of sequence, a stop string, its ``max_tokens``, or its client gone) leaves at once: its
stream closes, the others go on. When a sequence waits and fits beside the rows still going, the batch is rebuilt
at the next step: the rows still going (their prompt and the tokens they have so far) and the newcomers are
left-padded and prefilled again into a new KV cache, and decoding goes on. The static KV cache holds one position
for the whole batch, so a row cannot be added to it in place; prefilling the batch again costs one forward over
its tokens (positions follow the attention mask, so a row's tokens keep their positions), and rows that ended
are dropped from the batch at the same time.

Needs only torch: the HTTP layer is :mod:`llmzoo.serve.app`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from llmzoo.generation import (GenerationConfig, HeldBack, TextStream, _decode_step, _kv_cache, _logits,
                               left_pad, sample, top_p_filter)


@dataclass
class Sequence:
    """One row to decode: its prompt, how to sample it, and where its events go.

    Events put on ``queue`` (from the worker thread, through ``loop``): ``(index, "text", str)`` as text is
    decided, then ``(index, "done", finish_reason)`` (``"stop"`` or ``"length"``), or ``(index, "error", message)``.
    """

    prompt: list[int]
    max_tokens: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    index: int = 0
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    end_ids: set[int] = field(default_factory=set)  # tokens that end the row (eos, end of turn)
    completion_tokens: int = 0
    finish_reason: str | None = None
    cancelled: bool = False  # set by the HTTP layer when its client goes away
    generated: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.text = self.held = None  # made by start(), when the row first enters a batch
        self.generator = torch.Generator()
        if self.seed is None:
            self.generator.seed()  # a fresh random seed
        else:
            self.generator.manual_seed(self.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, kind, payload))

    @property
    def ids(self) -> list[int]:
        """The prompt and the tokens so far: what a batch that takes this row in prefills."""
        return self.prompt + self.generated

    @property
    def left(self) -> int:
        """The tokens the row may still take."""
        return self.max_tokens - self.completion_tokens

    def start(self, decode) -> None:
        if self.text is None:
            self.text, self.held = TextStream(decode, self.end_ids), HeldBack(self.stop)

    def push(self, token: int) -> None:
        """Take the row's next token: emit the new text, end the row where it ends."""
        self.completion_tokens += 1
        self.generated.append(token)
        ended = token in self.end_ids
        piece = self.held.push(self.text.push([token]))
        if ended or self.held.done or self.completion_tokens >= self.max_tokens:
            if not self.held.done:
                piece += self.held.push(self.text.flush()) + self.held.flush()
            reason = "length" if not (ended or self.held.done) else "stop"
        else:
            reason = None
        if piece:
            self.emit("text", piece)
        if reason:
            self.finish_reason = reason
            self.emit("done", reason)


class Engine:
    """Decodes :class:`Sequence` s in batches in one worker thread (see the module's text).

    Args:
        model: a :class:`~llmzoo.models.base.CausalLM`, on its device, in eval mode.
        decode: token ids -> text (the tokenizer's).
        pad_token_id: the token that fills the left padding.
        max_batch_size: rows decoded together at most.
        compile: decode each step compiled (``GenerationConfig.compile``).
        batch_window: seconds the worker waits, after the first sequence, for others to join its batch.
    """

    def __init__(self, model, decode, pad_token_id: int, max_batch_size: int = 8, compile: bool | str = False,
                 batch_window: float = 0.01):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.decode, self.pad = model, decode, pad_token_id
        self.max_batch_size, self.compile, self.batch_window = max_batch_size, compile, batch_window
        self.context = model.hparams.max_position_embeddings
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.batches = 0  # batches prefilled so far (a sequence joining a running batch makes a new one)
        self.steps = self.row_steps = 0  # decode steps, and rows decoded over all of them
        self.condition = threading.Condition()
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="llmzoo-serve-engine", daemon=True)

    def start(self) -> Engine:
        self.worker.start()
        return self

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()
        if self.worker.is_alive():
            self.worker.join()

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue the sequences (of one request: they are kept together); thread-safe."""
        for s in sequences:
            if len(s.prompt) + s.max_tokens > self.context:
                raise ValueError(f"{len(s.prompt)} prompt tokens + max_tokens={s.max_tokens} exceed the model's "
                                 f"context of {self.context} tokens")
        with self.condition:
            if self.closed:
                raise RuntimeError("the engine is closed")
            self.waiting.extend(sequences)
            self.condition.notify_all()

    def stats(self) -> dict:
        return {"running": sum(not s.done for s in self.running), "waiting": len(self.waiting),
                "batches": self.batches, "steps": self.steps, "row_steps": self.row_steps}

    # ------------------------------------------------------------------------------ the worker
    def _work(self) -> None:
        going: list[Sequence] = []
        while True:
            batch = self._take(going)
            if batch is None:
                return
            self.running = batch
            try:
                going = self._decode(batch)
            except Exception as error:  # the request fails, the server goes on
                going = []
                for s in batch:
                    if not s.done:
                        s.finish_reason = "error"
                        s.emit("error", f"{type(error).__name__}: {error}")
            finally:
                self.running = []
                self.batches += 1

    def _take(self, going: list[Sequence]) -> list[Sequence] | None:
        """The next batch: the rows still going and the waiting sequences that fit beside them; from idle, the
        first waiting sequence and those that join within ``batch_window`` and fit."""
        with self.condition:
            batch = [s for s in going if not s.done]
            if batch and not self.closed:
                while len(batch) < self.max_batch_size and self._drop_cancelled() and self._fits(batch,
                                                                                                 self.waiting[0]):
                    batch.append(self.waiting.popleft())
                return batch
            while not self.closed and not self._drop_cancelled():
                self.condition.wait()
            if self.closed:
                return None
            batch = [self.waiting.popleft()]
            deadline = time.monotonic() + self.batch_window
            while len(batch) < self.max_batch_size:
                self._drop_cancelled()
                if self.waiting and self._fits(batch, self.waiting[0]):
                    batch.append(self.waiting.popleft())
                    continue
                left = deadline - time.monotonic()
                if self.waiting or left <= 0:  # the next one does not fit, or no time left: it waits its turn
                    break
                self.condition.wait(left)
            return batch

    def _drop_cancelled(self) -> bool:
        while self.waiting and self.waiting[0].cancelled:
            self.waiting.popleft()
        return bool(self.waiting)

    def _fits(self, batch: list[Sequence], s: Sequence) -> bool:
        batch = [b for b in batch if not b.done]
        return max(len(b.ids) for b in [s, *batch]) + max(b.left for b in [s, *batch]) <= self.context

    def _joinable(self, going: list[Sequence]) -> bool:
        """Whether a waiting sequence fits beside the rows ``going`` (the batch is then rebuilt to take it in)."""
        if not self.waiting or len(going) >= self.max_batch_size:
            return False
        with self.condition:
            return self._drop_cancelled() and self._fits(going, self.waiting[0])

    @torch.inference_mode()
    def _decode(self, batch: list[Sequence]) -> list[Sequence]:
        """Decode ``batch`` until its rows have ended (then ``[]``), or until a waiting sequence can join the rows
        still going (then those rows, for the next batch)."""
        model = self.model
        input_ids, attention_mask = left_pad([s.ids for s in batch], self.pad, model.device)
        size, length = input_ids.shape
        total = length + max(s.left for s in batch)
        tokens = input_ids.new_full((size, total), self.pad)
        tokens[:, :length] = input_ids
        mask = None  # as llmzoo.generation decodes: no mask without padding (SDPA's causal path)
        if not attention_mask.all():
            mask = attention_mask.new_ones(size, total)
            mask[:, :length] = attention_mask
        for s in batch:
            s.start(self.decode)
        config = GenerationConfig(max_new_tokens=total - length, compile=self.compile)
        with _kv_cache(model, size, total):
            logits = _logits(model, tokens, mask, 0, length, True, last=1)[:, -1]
            step = _decode_step(model, mask, config)
            for cur in range(length, total):
                tokens[:, cur] = self._choose(logits, batch)
                for s, token in zip(batch, tokens[:, cur].tolist()):
                    if not s.done:
                        s.push(token)
                going = [s for s in batch if not s.done]
                if not going or cur + 1 == total:
                    return []
                if self._joinable(going):
                    return going
                self.steps, self.row_steps = self.steps + 1, self.row_steps + len(batch)
                logits = step(tokens, cur)
        return []

    @staticmethod
    def _choose(logits: torch.Tensor, batch: list[Sequence]) -> torch.Tensor:
        """The next token of each row: greedy (argmax of the whole batch at once), or sampled from the row's
        distribution (its temperature and top_p) with the row's own generator, so that a seed reproduces it."""
        choice = logits.argmax(dim=-1)
        for row, s in enumerate(batch):
            if s.temperature > 0 and not s.done:
                scaled = logits[row:row + 1].cpu() / s.temperature
                if s.top_p < 1:
                    scaled = top_p_filter(scaled, s.top_p)
                choice[row] = sample(scaled.softmax(dim=-1), s.generator)[0].to(choice.device)
        return choice
