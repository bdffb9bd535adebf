"""FSDP2 over every process (the strategy of the preset ``configs/trainer/fsdp.yaml``) and its sharded
checkpoints made into one file. See docs/distributed.md."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy

from llmzoo.checkpoints import is_sharded_checkpoint, read_checkpoint, save_checkpoint


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with all processes of all nodes in one data-parallel group and no
    tensor parallelism: the model's ``configure_model`` shards every decoder block, then the rest, with FSDP2
    (``fully_shard``) over all of them. ``ModelParallelStrategy``'s own default makes the GPUs of a node a
    tensor-parallel group, which llmzoo's models do not implement.

    Args:
        save_distributed_checkpoint: each rank writes its own shard into a checkpoint directory (resumable on
            any number of processes; ``llmzoo convert --ckpt_path DIR --to FILE`` makes one file of it); False:
            rank 0 gathers the whole state and writes one file.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
        timeout: how long a collective waits for the other ranks.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def consolidate_checkpoint(directory: str | os.PathLike, to: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the sharded checkpoint ``directory`` (:class:`FSDP2Strategy`'s, or any ``ModelParallelStrategy``'s)
    as one checkpoint file ``to``: the whole weights, in their dtype, the hyperparameters and the tokenizer.
    ``validate``, ``generate``, ``convert --to_hf`` and ``load_from_checkpoint`` read it; like a checkpoint
    converted from Hugging Face it holds no optimizer state, so ``fit`` from it starts at step 0 (resume a run
    from the directory itself, on any number of processes). Returns ``to``."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory, to = Path(directory), Path(to)
    if not is_sharded_checkpoint(directory):
        raise ValueError(f"{directory} is not a sharded checkpoint (a directory of shards with a meta.pt)")
    if to.exists() and not overwrite:
        raise FileExistsError(f"{to} exists: pass --overwrite true or choose another --to")
    checkpoint = read_checkpoint(directory, weights=False)
    stored = FileSystemReader(directory).read_metadata().state_dict_metadata
    weights = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()
               if key.startswith("state_dict.") and isinstance(meta, TensorStorageMetadata)}
    if not weights:
        raise ValueError(f"{directory} holds no model weights under state_dict (a checkpoint of FSDPStrategy? "
                         f"python -m lightning.pytorch.utilities.consolidate_checkpoint reads those)")
    load(weights, checkpoint_id=directory, no_dist=True)
    checkpoint.pop("loops", None)
    checkpoint.update(state_dict={key.removeprefix("state_dict."): tensor for key, tensor in weights.items()},
                      epoch=0, global_step=0, optimizer_states=[], lr_schedulers=[])
    save_checkpoint(checkpoint, to)
    return to
