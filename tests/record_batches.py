"""A callback that records the batches of a run, for tests/test_data.py and tests/test_distributed.py. The tests
pass it to ``llmzoo fit`` subprocesses with ``--trainer.callbacks+=record_batches.RecordBatches`` (tests/ on
PYTHONPATH)."""

from pathlib import Path

import lightning as L
import torch


class RecordBatches(L.Callback):
    """Keeps this rank's training batches and the batches of its last validation (sanity checks left out) in
    ``batches["train"]`` and ``batches["val"]``; with a ``directory``, writes them to ``directory/rank<R>.pt``
    when fit ends."""

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self.batches = {"train": [], "val": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches["train"].append(batch.clone().cpu())

    def on_validation_epoch_start(self, trainer, pl_module):
        self.batches["val"] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:  # the datamodule hands the windows over with their bytes (val/bpb)
            self.batches["val"].append(batch["input_ids"].clone().cpu())

    def on_fit_end(self, trainer, pl_module):
        if self.directory is not None:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
            torch.save(self.batches, Path(self.directory) / f"rank{trainer.global_rank}.pt")
