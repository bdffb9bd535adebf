"""Starting from pretrained weights (``llmzoo fit --model.pretrained``): the architecture, hyperparameters and weights
of a Lightning checkpoint file or a Hugging Face directory, for a model built on the meta device and then given
them (:mod:`llmzoo.models.build`), with fresh training settings and, optionally, LoRA adapters."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from llmzoo.checkpoints import (checkpoint_class_path, is_sharded_checkpoint, model_hyperparameters, qualified_name,
                               read_checkpoint, sharded_checkpoint_error)
from llmzoo.hf import config_from_hf, convert_hf_state_dict, load_hf_weights, read_hf_config
from llmzoo.layers.lora import lora_modules, merge_lora
from llmzoo.models import CausalLM
from llmzoo.models.build import empty_model, fill_model, load_checkpoint_model, resolve_class

# hyperparameters a fine-tuning run sets itself; every other one is the pretrained model's
TRAINING_SETTINGS = {"learning_rate", "weight_decay", "betas", "warmup_steps", "lr_decay_steps", "min_learning_rate",
                     "activation_checkpointing", "compile", "pretrained", "lora", "dropout", "aux_loss_coef",
                     "quantize", "preference"}


def _hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def pretrained_architecture(source: str | os.PathLike, checkpoint: dict | None = None) -> tuple[type[CausalLM], dict]:
    """The class of a pretrained model and its architecture hyperparameters (``TRAINING_SETTINGS`` left out).
    ``source``: a checkpoint file (``checkpoint``: its contents if already read) or a Hugging Face directory."""
    path = Path(source)
    if _hf_directory(path):
        cls, kwargs = config_from_hf(read_hf_config(path))
    elif is_sharded_checkpoint(path):
        raise sharded_checkpoint_error(path)
    elif path.is_file():
        checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path, weights=False)
        class_path = checkpoint_class_path(checkpoint)
        if class_path is None or "state_dict" not in checkpoint:
            raise ValueError(f"--model.pretrained {source} is not a checkpoint of an llmzoo model (it names no "
                             f"architecture): give an llmzoo checkpoint or a Hugging Face directory")
        cls, kwargs = resolve_class(class_path), model_hyperparameters(checkpoint)
    else:
        raise FileNotFoundError(f"--model.pretrained {source} does not exist: give a checkpoint file (runs/NAME/"
                                f"checkpoints/last.ckpt) or a Hugging Face model directory")
    return cls, {key: value for key, value in kwargs.items() if key not in TRAINING_SETTINGS}


def pretrained_state_dict(source: str | os.PathLike) -> dict[str, Tensor]:
    """The weights of a pretrained model under llmzoo's names, in their stored dtype (a LoRA run's adapters merged)."""
    path = Path(source)
    if _hf_directory(path):
        cls, kwargs = config_from_hf(read_hf_config(path))
        return convert_hf_state_dict(empty_model(cls, kwargs), load_hf_weights(path), pop=True)
    checkpoint = read_checkpoint(path)
    if (checkpoint.get("hyper_parameters") or {}).get("lora"):  # a fine-tuned LoRA run: its adapters merged
        return merge_lora(load_checkpoint_model(checkpoint)).state_dict()
    return checkpoint["state_dict"]


def check_architecture(model: CausalLM, source: str | os.PathLike) -> None:
    """Raises a one-line ``ValueError`` unless ``model`` has the class and architecture of the pretrained ``source``."""
    cls, architecture = pretrained_architecture(source)
    if not isinstance(model, cls):
        raise ValueError(f"--model.pretrained {source} holds a {cls.__name__} model, not a {type(model).__name__}: "
                         f"leave out --model (the pretrained model names its class) or pass --model {cls.__name__}")
    changed = [f"{key}={model.hparams[key]!r} (pretrained: {value!r})" for key, value in architecture.items()
               if key in model.hparams and _plain(model.hparams[key]) != _plain(value)]
    if changed:
        raise ValueError(f"--model.{changed[0]} differs from the pretrained model {source}"
                         f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}: the architecture comes "
                         f"from --model.pretrained, leave those settings out")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def fill_pretrained(model: CausalLM, source: str | os.PathLike) -> CausalLM:
    """Give a model built on the meta device (:func:`~llmzoo.models.build.empty_model`) the weights of the
    pretrained ``source``; its LoRA adapters, if any, start fresh (``B = 0``: the model computes what the
    pretrained one does). Returns ``model``."""
    check_architecture(model, source)
    state = pretrained_state_dict(source)
    dtype = state["embed.weight"].dtype
    for adapter in lora_modules(model):
        adapter.to_empty(device="cpu").to(dtype)
        adapter.reset_parameters()
    return fill_model(model, state)


def load_pretrained(source: str | os.PathLike, model_class: str | type[CausalLM] | None = None,
                    **settings) -> CausalLM:
    """The model of a pretrained checkpoint file or Hugging Face directory with fresh training ``settings``
    (``learning_rate=...``, ``lora=LoRASettings(...)``; see :class:`~llmzoo.models.CausalLM`), built on the meta
    device and given the weights: nothing is initialised at random. ``model_class``: a subclass of the stored one."""
    cls, architecture = pretrained_architecture(source)
    if model_class is not None:
        given = resolve_class(model_class)
        if not issubclass(given, cls):
            raise ValueError(f"{source} holds a {cls.__name__} model, not a {given.__name__}")
        cls = given
    return fill_pretrained(empty_model(cls, {**architecture, **settings, "pretrained": str(source)}), source)


def pretrained_model_option(source: str | os.PathLike) -> dict:
    """The ``--model`` value of a pretrained source: its class path and architecture (the CLI inserts it)."""
    cls, architecture = pretrained_architecture(source)
    return {"class_path": qualified_name(cls), "init_args": {**architecture, "pretrained": str(source)}}


__all__ = ["TRAINING_SETTINGS", "check_architecture", "fill_pretrained", "load_pretrained", "pretrained_architecture",
           "pretrained_model_option", "pretrained_state_dict"]
