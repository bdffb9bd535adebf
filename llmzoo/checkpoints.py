"""Lightning checkpoint files: the one reader (``weights_only``, with the refusals), the one test of a sharded
checkpoint, the one writer. Knows no model code: building a model from a checkpoint lives in
:mod:`llmzoo.models.build`."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from llmzoo.files import write_atomic

ARCHITECTURE_KEY = "llmzoo_architecture"  # the model class a checkpoint holds, as "module.QualName"
QUANTIZATION_KEY = "llmzoo_quantization"  # how its weights are quantized (llmzoo.quantize), if they are
SHARDED_METADATA = "meta.pt"  # in a sharded checkpoint directory, Lightning's file of all but the sharded state
CLASS_KEYS = ("_class_path", "_instantiator")  # what LightningCLI adds to the hyperparameters it records


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_sharded_checkpoint(path) -> bool:
    """Whether ``path`` is a sharded checkpoint: a directory of ``torch.distributed.checkpoint`` shards and
    Lightning's ``meta.pt``, as :class:`~llmzoo.strategies.FSDP2Strategy` writes."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / SHARDED_METADATA).is_file()


def is_checkpoint(path) -> bool:
    """A checkpoint file or a sharded checkpoint directory."""
    return isinstance(path, (str, os.PathLike)) and (Path(path).is_file() or is_sharded_checkpoint(path))


def sharded_checkpoint_error(path) -> ValueError:
    return ValueError(f"{path} is a sharded checkpoint (a directory of shards): resume it with fit and the run's "
                      f"--config files (configs/trainer/fsdp.yaml among them); for anything else make one file of it, "
                      f"llmzoo convert --ckpt_path {path} --to model.ckpt")


def read_checkpoint(path: str | os.PathLike, weights: bool = True) -> dict:
    """A checkpoint file's contents with its tensors memory-mapped (reading it costs only its metadata), read
    with ``weights_only=True``; of a sharded checkpoint, all but the weights and optimizer states (its
    ``meta.pt``; with ``weights`` such a directory is refused instead: its weights are not in one file).
    A missing file raises ``FileNotFoundError``; a directory ``IsADirectoryError``; a truncated, corrupted or
    unsafe file a ``ValueError`` that says so."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        if weights:
            raise sharded_checkpoint_error(path)
        path = path / SHARDED_METADATA
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path (or use --ckpt_path last)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=not _legacy_format(path))
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL (\S+)", str(error))  # what the pickle would have imported and called
        raise ValueError(f"refusing to load {path}: it holds objects that are not plain tensors and containers "
                         f"({named[1] if named else 'weights_only=True'}); only load checkpoints you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError):
        raise ValueError(f"cannot read checkpoint {path}: the file is truncated, corrupted or not a PyTorch "
                         f"checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"cannot read checkpoint {path}: it holds a {type(checkpoint).__name__}, not a checkpoint")
    return checkpoint


def _legacy_format(path: Path) -> bool:
    """Whether ``path`` is in torch's pre-1.6 format (a bare pickle stream, as in old ``pytorch_model.bin`` files),
    which cannot be memory-mapped; torch's zip format can."""
    with open(path, "rb") as file:
        return file.read(1) == b"\x80"


def checkpoint_class_path(checkpoint: dict) -> str | None:
    """The model class a checkpoint records: llmzoo's key, else LightningCLI's ``_class_path``."""
    return checkpoint.get(ARCHITECTURE_KEY) or (checkpoint.get("hyper_parameters") or {}).get("_class_path")


def model_hyperparameters(checkpoint: dict) -> dict:
    """The model's constructor arguments a checkpoint records (LightningCLI's class keys left out)."""
    return {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k not in CLASS_KEYS}


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``path`` whole or not at all (:func:`~llmzoo.files.write_atomic`)."""
    write_atomic(path, lambda file: torch.save(checkpoint, file))
