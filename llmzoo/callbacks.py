"""Callbacks the CLI adds by default (tokens/s, a light progress bar, a crash-safe checkpoint that
``--ckpt_path last`` finds, per-step seeding for exact resumes, a stop on a non-finite loss) and a sampler."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

from llmzoo.checkpoints import save_checkpoint
from llmzoo.generation import room_after_prompts


COMPUTE_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                  "16-true": torch.float16, "64-true": torch.float64}  # any other precision computes in float32


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak dense matmul FLOP/s of one ``device`` in ``dtype`` (Lightning's table of GPUs), None where unknown
    (CPUs, unlisted GPUs)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        if "h200" in name and not ("sxm1" in name or "nvl1" in name):  # reports "NVIDIA H200"; Lightning lists "SXM1"
            if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
                dtype = "tfloat32"
            return H200_PEAK_FLOPS.get(dtype)
    return get_available_flops(device, dtype)


H200_PEAK_FLOPS = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12,
                   torch.float64: 33.5e12}  # NVIDIA's dense figures for the H200 SXM (as the H100 SXM)


class Throughput(L.Callback):
    """Logs training throughput of this rank every ``log_every_n_steps`` optimizer steps: ``train/tokens_per_sec``
    (input tokens per second of wall time), ``train/tflops_per_sec`` (``model.flops_per_token`` x tokens/s) and
    ``train/mfu`` (model FLOPs utilisation: that over the device's peak for the run's precision); tokens/s and
    MFU show in the progress bar. Host-side timing, no device sync.

    Args:
        peak_flops: peak FLOP/s of one device, for hardware Lightning's table does not list (CPUs among them);
            without it and without a listed GPU no MFU is logged.
    """

    def __init__(self, peak_flops: float | None = None):
        self.peak_flops = peak_flops
        self.tokens, self.flops, self.start, self.logged_step = 0, 0, None, -1
        self.flops_per_token: dict[int, int] = {}  # by sequence length

    def on_train_start(self, trainer, pl_module):
        if self.peak_flops is None:
            dtype = COMPUTE_DTYPES.get(str(trainer.precision), torch.float32)
            self.peak_flops = peak_flops(pl_module.device, dtype)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        batch_size, length = pl_module.split_batch(batch)[0].shape  # the model's inputs
        self.tokens += batch_size * length
        if hasattr(pl_module, "flops_per_token"):
            if length not in self.flops_per_token:
                self.flops_per_token[length] = pl_module.flops_per_token(length)
            self.flops += batch_size * length * self.flops_per_token[length]
        step = trainer.global_step
        if step % trainer.log_every_n_steps == 0 and step != self.logged_step:
            now = time.perf_counter()
            seconds = now - self.start
            pl_module.log("train/tokens_per_sec", self.tokens / seconds, prog_bar=True)
            if self.flops:
                pl_module.log("train/tflops_per_sec", self.flops / seconds / 1e12)
                if self.peak_flops:
                    pl_module.log("train/mfu", self.flops / seconds / self.peak_flops, prog_bar=True)
            self.tokens, self.flops, self.start, self.logged_step = 0, 0, now, step


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
    """``ModelCheckpoint`` that keeps ``last.ckpt`` up to date (the final step included), writes the
    datamodule's tokenizer beside the checkpoints as ``tokenizer.json``, and never leaves a torn or
    non-finite checkpoint:

    - files are written whole or not at all (:class:`AtomicCheckpointIO`, installed in ``setup`` when the
      strategy uses Lightning's plain ``TorchCheckpointIO``); temporaries a killed save left are removed;
    - a checkpoint of weights holding NaN or inf is refused with a ``FloatingPointError`` (the previous
      checkpoint stays).

    The CLI gives it a fixed ``dirpath`` (``<trainer.default_root_dir>/checkpoints``) so that
    ``--ckpt_path last`` finds the checkpoint of the previous run in the same directory."""

    def __init__(self, *args, save_last: bool | str | None = True, **kwargs):
        super().__init__(*args, save_last=save_last, **kwargs)

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if stage == "fit" and trainer.is_global_zero and self.dirpath is not None:
            for temporary in Path(self.dirpath).glob(".*.ckpt.*.tmp"):  # left by a save that was killed
                temporary.unlink(missing_ok=True)
            if tokenizer is not None:
                tokenizer.save(Path(self.dirpath) / "tokenizer.json")

    def on_train_end(self, trainer, pl_module):
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath) -> None:
        finite = torch.stack([local(p).isfinite().all() for p in trainer.lightning_module.parameters()]).all()
        if trainer.world_size > 1:
            finite = not trainer.strategy.reduce_boolean_decision(not bool(finite), all=False)
        if not finite:
            raise FloatingPointError(f"the weights hold NaN or inf after step {trainer.global_step}, so no checkpoint "
                                     f"was written ({Path(filepath).name}); the previous checkpoints are intact: lower "
                                     f"--model.learning_rate or set --trainer.gradient_clip_val and resume from one "
                                     f"with --ckpt_path")
        super()._save_checkpoint(trainer, filepath)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing local files atomically: into a temporary file beside the
    checkpoint, flushed to disk, then renamed onto it (:func:`~llmzoo.files.write_atomic`). A kill
    during a save leaves the previous file as it was. (Lightning's own writer renames a temporary from the
    system's temp directory, which is a non-atomic copy when that is another file system.) Remote paths
    (``s3://...``) keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_checkpoint(checkpoint, path)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) parameter, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class StepSeed(L.Callback):
    """Seeds PyTorch's random number generators before every training batch from ``(seed, step, batch)``, so
    what a step draws (dropout masks) depends on nothing else: a run resumed from a checkpoint draws exactly
    what the uninterrupted run drew, whatever ran in between (validation, DataLoader workers starting,
    another process). ``seed``: Lightning's global seed (``seed_everything``, the CLI's ``seed_everything``)
    when not given; checkpoints keep it. Every rank draws the same numbers, as after ``seed_everything``."""

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed = np.random.SeedSequence([self.seed, trainer.global_step, batch_idx]).generate_state(1, np.uint64)[0]
        torch.manual_seed(int(seed))

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seed = state_dict["seed"]


class StopOnNonFiniteLoss(L.Callback):
    """Stops training with a ``FloatingPointError`` naming the step when its loss is NaN or infinite, before
    the optimizer applies the step: the weights in memory and the checkpoints stay those of the last good
    step. Costs one device-to-host copy of the loss per step (and, with several ranks, one all-reduce of a
    flag, so that every rank stops together)."""

    def __init__(self):
        self.loss = None

    def on_before_backward(self, trainer, pl_module, loss):
        loss = loss.detach()  # the sum over the micro-batches of this step: NaN or inf if any one is
        self.loss = loss if self.loss is None else self.loss + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        loss, self.loss = self.loss, None
        if loss is None:
            return
        value = loss.item()
        bad = not math.isfinite(value)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            problem = f"is {value}" if not math.isfinite(value) else "is NaN or inf on another rank"
            raise FloatingPointError(f"the training loss {problem} at step {trainer.global_step + 1}; the step was not "
                                     f"applied and the checkpoints of step {trainer.global_step} and before are "
                                     f"intact: lower --model.learning_rate or set --trainer.gradient_clip_val, then "
                                     f"resume with --ckpt_path last")


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
    room = room_after_prompts([len(ids)], model.hparams.max_position_embeddings)
    input_ids = torch.tensor([ids], device=model.device)
    output = model.generate(input_ids, min(max_new_tokens, room), **options)
    return tokenizer.decode(output[0, len(ids):].tolist())


def checkpoint_dir(default_root_dir: str | None) -> str:
    return os.path.join(default_root_dir or os.getcwd(), "checkpoints")
