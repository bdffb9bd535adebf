"""Distribution, kept out of the models: FSDP2 over every process (the strategy of the preset
``configs/trainer/fsdp.yaml``), how a model is sharded under it, and its sharded checkpoints made into one file.
See docs/distributed.md."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy

from llmzoo.checkpoints import is_sharded_checkpoint, qualified_name, read_checkpoint, save_checkpoint
from llmzoo.models import CausalLM


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


def shard_model(model: CausalLM, mesh) -> None:
    """Shard ``model`` with FSDP2 over the data-parallel dimension of ``mesh`` (a ``ModelParallelStrategy``'s device
    mesh; a tensor-parallel size above 1 is refused, llmzoo's models implement none): every decoder block, then
    the rest. ``token_nll``, the way training and validation reach the weights, becomes an FSDP forward method.
    ``fully_shard`` turns the model's class into a new subclass ``FSDP<Name>``: it is taken out of the class
    registry, so checkpoints keep recording the architecture (``Llama``)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    names = mesh.mesh_dim_names or ()
    tensor_parallel = mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
    if tensor_parallel > 1:
        raise ValueError(f"llmzoo's models shard with FSDP2 over data-parallel ranks only, but this "
                         f"ModelParallelStrategy has a tensor-parallel size of {tensor_parallel}: use "
                         f"--trainer.strategy llmzoo.strategies.FSDP2Strategy (configs/trainer/fsdp.yaml)")
    data_parallel = mesh["data_parallel"] if "data_parallel" in names else mesh
    for block in model.blocks:
        fully_shard(block, mesh=data_parallel)
    fully_shard(model, mesh=data_parallel)
    CausalLM.registry.pop(qualified_name(type(model)), None)  # FSDPLlama is not an architecture
    register_fsdp_forward_method(model, "token_nll")


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
