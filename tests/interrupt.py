"""Callbacks that interrupt or break a training run at a chosen step, for tests/test_reliability.py. The tests
pass them to ``llmzoo fit`` subprocesses with ``--trainer.callbacks+=interrupt.<Name>`` (tests/ on PYTHONPATH)."""

import io
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch


class PauseAtStep(L.Callback):
    """Before training step ``step`` (0-based, so the checkpoints of steps ``<= step`` are written), writes this
    process's id to ``marker`` and sleeps, for the test to SIGKILL the process from outside."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(600)


class KillDuringSave(L.Callback):
    """Makes the ``save``-th ``torch.save`` call after training step ``step`` (1-based: the step's checkpoint
    file is the first, ``last.ckpt`` the second) write half of the checkpoint's bytes to its destination
    and then SIGKILL this process: a crash in the middle of writing a checkpoint."""

    def __init__(self, step: int, save: int = 2):
        self.step, self.save = step, save

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        real_save, calls = torch.save, []

        def half_then_die(obj, f, *args, **kwargs):
            calls.append(f)
            if len(calls) < self.save:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            file = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
            file.write(data[:len(data) // 2])
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_then_die


class PoisonAtStep(L.Callback):
    """Sets the first parameter (the token embedding) to ``value`` (NaN or inf) at training step ``step`` (its
    global step): ``at="start"`` before the step (its loss is not finite), ``at="end"`` after it, before its
    checkpoint is written."""

    def __init__(self, step: int, value: float = float("nan"), at: str = "start"):
        self.step, self.value, self.at = step, value, at

    def poison(self, trainer, pl_module, at: str) -> None:
        if trainer.global_step == self.step and at == self.at:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(self.value)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.poison(trainer, pl_module, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.poison(trainer, pl_module, "end")
