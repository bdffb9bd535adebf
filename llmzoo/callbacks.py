"""Callbacks the CLI adds by default (tokens/s, a light progress bar, a checkpoint that ``--ckpt_path last``
finds) and a sampler."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only


class TokensPerSecond(L.Callback):
    """Logs ``train/tokens_per_sec`` (input tokens of this rank per second of wall time) every
    ``log_every_n_steps`` optimizer steps, and shows it in the progress bar. Host-side timing, no device sync."""

    def __init__(self):
        self.tokens, self.start, self.logged_step = 0, None, -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
        self.tokens += input_ids.shape[0] * (input_ids.shape[1] - 1)
        step = trainer.global_step
        if step % trainer.log_every_n_steps == 0 and step != self.logged_step:
            now = time.perf_counter()
            pl_module.log("train/tokens_per_sec", self.tokens / (now - self.start), prog_bar=True)
            self.tokens, self.start, self.logged_step = 0, now, step


class ThrottledProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, redrawn at most every ``interval`` seconds during training: Lightning redraws it
    after every batch, which costs about 1 ms a step (3% of a small model's step on a CPU)."""

    def __init__(self, interval: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.interval, self.drawn = interval, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.monotonic()
        last = batch_idx + 1 == self.train_progress_bar.total or trainer.global_step == trainer.max_steps
        if now - self.drawn >= self.interval or last:
            self.drawn = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps ``last.ckpt`` up to date (the final step included) and writes the
    datamodule's tokenizer beside the checkpoints as ``tokenizer.json``.

    The CLI gives it a fixed ``dirpath`` (``<trainer.default_root_dir>/checkpoints``) so that
    ``--ckpt_path last`` finds the checkpoint of the previous run in the same directory."""

    def __init__(self, *args, save_last: bool | str | None = True, **kwargs):
        super().__init__(*args, save_last=save_last, **kwargs)

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if stage == "fit" and tokenizer is not None and trainer.is_global_zero:
            tokenizer.save(Path(self.dirpath) / "tokenizer.json")

    def on_train_end(self, trainer, pl_module):
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class SampleText(L.Callback):
    """Prints a sample from the model when ``fit`` ends (the quickstart's proof that it learned something).

    Uses the datamodule's tokenizer; an empty ``prompt`` starts a new document (after ``eos``)."""

    def __init__(self, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 50, seed: int = 0):
        self.prompt, self.max_new_tokens, self.seed = prompt, max_new_tokens, seed
        self.options = dict(do_sample=True, temperature=temperature, top_k=top_k)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        text = complete(pl_module, trainer.datamodule.tokenizer, self.prompt, self.max_new_tokens,
                        generator=generator, **self.options)
        print(f"\n----- sample (prompt {self.prompt!r}) -----\n{self.prompt}{text}\n-----", file=sys.stdout, flush=True)


def complete(model, tokenizer, prompt: str, max_new_tokens: int, **options) -> str:
    """The text ``model`` writes after ``prompt`` (at most ``max_new_tokens`` tokens, within its context).

    ``options`` go to :func:`llmzoo.generation.generate` (``do_sample``, ``temperature``, ``top_k``, ...);
    the text ends at the tokenizer's end-of-sequence token."""
    options.setdefault("eos_token_id", tokenizer.eos_token_id)
    ids = tokenizer.encode(prompt) or [tokenizer.eos_token_id]
    context = model.hparams.max_position_embeddings
    if len(ids) >= context:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {context}")
    input_ids = torch.tensor([ids], device=model.device)
    output = model.generate(input_ids, min(max_new_tokens, context - len(ids)), **options)
    return tokenizer.decode(output[0, len(ids):].tolist())


def checkpoint_dir(default_root_dir: str | None) -> str:
    return os.path.join(default_root_dir or os.getcwd(), "checkpoints")
