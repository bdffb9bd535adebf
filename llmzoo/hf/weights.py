"""The files of a Hugging Face directory: ``config.json``, safetensors weights (one file, or shards and their
index), pickled ``pytorch_model.bin`` files (only when allowed), and the dtypes of weights."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from llmzoo.checkpoints import read_checkpoint
from llmzoo.files import json_bytes, write_atomic
from llmzoo.models.build import listing

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"


# ====================================================================== dtypes
def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16`` from ``torch.bfloat16``, ``"bfloat16"``, ``"bf16"`` ... (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch."))
    if not isinstance(getattr(torch, name, None), torch.dtype) or not getattr(torch, name).is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype: use float32, bfloat16 or float16")
    return getattr(torch, name)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of ``model``'s parameters have."""
    return Counter(p.dtype for p in model.parameters()).most_common(1)[0][0]


def files_dtype(tensors: dict[str, Tensor], config: dict) -> torch.dtype:
    """The floating dtype of the files; if they mix dtypes, the config's ``dtype`` (else the most common)."""
    counts = Counter()
    for tensor in tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    if len(counts) == 1:
        return next(iter(counts))
    declared = config.get("dtype") or config.get("torch_dtype")
    if isinstance(declared, str) and declared != "auto":
        return as_dtype(declared)
    return counts.most_common(1)[0][0] if counts else torch.float32


# ====================================================================== reading
def read_hf_config(directory: str | os.PathLike) -> dict:
    """``config.json`` of a Hugging Face model directory."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: llmzoo reads local Hugging Face directories "
                                f"(nothing is downloaded)")
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face model directory holds config.json beside its weights")
    return json.loads(path.read_text())


def _shard_path(directory: Path, name: str) -> Path:
    """A shard named by an index, refused if the name leaves the directory."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"index in {directory} names the shard {name!r}: shards must be plain file names")
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} named by the index is missing")
    return path


def load_hf_weights(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face directory: ``model.safetensors`` or the shards of
    ``model.safetensors.index.json``. Pickled ``pytorch_model.bin`` files can run code when loaded: they
    are refused unless ``allow_pickle``, and then read with ``weights_only=True``
    (:func:`~llmzoo.checkpoints.read_checkpoint`)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / SAFETENSORS_INDEX).is_file():
        return _load_sharded(directory, SAFETENSORS_INDEX, load_file)
    if (directory / SAFETENSORS).is_file():
        return load_file(directory / SAFETENSORS)
    pickles = [name for name in (PICKLE_INDEX, PICKLE) if (directory / name).is_file()]
    if pickles and not allow_pickle:
        raise ValueError(f"{directory} holds pickled weights ({pickles[0]}), which can run code when loaded: "
                         f"convert them to safetensors, or pass allow_pickle=True (--allow_pickle) if you trust "
                         f"the file (it is then read with weights_only=True)")
    if pickles:
        return _load_sharded(directory, PICKLE_INDEX, read_checkpoint) if pickles[0] == PICKLE_INDEX \
            else read_checkpoint(directory / PICKLE)
    raise FileNotFoundError(f"no weights in {directory}: expected {SAFETENSORS} or {SAFETENSORS_INDEX}")


def _load_sharded(directory: Path, index_name: str, load) -> dict[str, Tensor]:
    weight_map = json.loads((directory / index_name).read_text())["weight_map"]
    tensors: dict[str, Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        tensors.update(load(_shard_path(directory, shard)))
    absent = sorted(set(weight_map) - tensors.keys())
    if absent:
        raise ValueError(f"{index_name} in {directory} lists tensors its shards do not hold: {listing(absent)}")
    return tensors


# ====================================================================== writing
def parse_size(size: int | str) -> int:
    """Bytes from ``5_000_000``, ``"5GB"`` (10^9) or ``"5GiB"`` (2^30), like transformers' ``max_shard_size``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size: use bytes or a string like '5GB' or '500MiB'")
    unit = (match.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(match.group(1)) * scale)


def write_json(path: Path, data: dict) -> None:
    """``data`` as llmzoo's JSON (:func:`~llmzoo.files.json_bytes`), written whole or not at all."""
    write_atomic(path, json_bytes(data))


def save_hf_weights(tensors: dict[str, Tensor], directory: str | os.PathLike,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Write ``tensors`` as ``model.safetensors``, or as ``model-0000i-of-0000n.safetensors`` shards of at
    most ``max_shard_size`` (a single bigger tensor gets a shard of its own) plus
    ``model.safetensors.index.json``. Returns the file names written."""
    from safetensors.torch import save_file

    limit, shards, size = parse_size(max_shard_size), [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    directory = Path(directory)
    names = [SAFETENSORS] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file({key: _own_storage(tensor) for key, tensor in shard.items()}, directory / name,
                  metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                              "total_parameters": sum(t.numel() for t in tensors.values())},
                 "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
        write_json(directory / SAFETENSORS_INDEX, index)
        names.append(SAFETENSORS_INDEX)
    return names


def _own_storage(tensor: Tensor) -> Tensor:
    """A contiguous tensor that owns its storage (safetensors refuses views that share memory)."""
    tensor = tensor.detach().contiguous()
    return tensor if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() else tensor.clone()
