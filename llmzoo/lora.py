"""LoRA on any model of the zoo: :func:`add_lora` (in place: adapters on the projections named by ``targets``, every
other weight frozen), :func:`merge_lora` (fold them into the weights), and the small adapter checkpoint
(:func:`save_adapter` / :func:`load_adapter`: the adapters and their settings, nothing of the base). The layers are
:mod:`llmzoo.layers.lora`; Hugging Face PEFT directories are :func:`llmzoo.hf.to_peft` / :func:`llmzoo.hf.from_peft`.

    from llmzoo.lora import add_lora, merge_lora
    add_lora(model, r=8, alpha=16, dropout=0.0, targets=("q", "k", "v", "out"))   # then train: only adapters learn
    merge_lora(model)                                                              # plain layers, same function
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from torch import Tensor, nn

from llmzoo.checkpoints import read_checkpoint, save_checkpoint
from llmzoo.layers.lora import (ATTENTION_TARGETS, TARGETS, ExpertLoRA, LoRA, LoRASettings, adapters_disabled,
                                add_lora, available_targets, has_lora, lora_modules, merge_lora)

ADAPTER_KEY = "lora_adapter"  # marks an adapter checkpoint: {"lora_adapter": settings, "state_dict": adapters}

__all__ = ["ATTENTION_TARGETS", "ExpertLoRA", "LoRA", "LoRASettings", "TARGETS", "adapters_disabled", "add_lora",
           "available_targets",
           "has_lora", "load_adapter", "lora_state_dict", "lora_modules", "merge_lora", "save_adapter",
           "trainable_parameters"]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors under their names in ``model`` (``blocks.0.attention.qkv.adapter.A.q``, ...)."""
    adapters = {id(p) for module in lora_modules(model) for p in module.parameters()}
    return {name: p.detach() for name, p in model.named_parameters() if id(p) in adapters}


def trainable_parameters(model: nn.Module) -> int:
    """Parameters that require gradients (after :func:`add_lora`: the adapters')."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def settings_of(model: nn.Module) -> LoRASettings:
    """The settings ``model``'s adapters were added with (an llmzoo model's ``lora`` hyperparameter, or what
    :func:`add_lora` recorded)."""
    hparams = getattr(model, "hparams", {})
    if hparams.get("lora"):
        return LoRASettings(**hparams["lora"])
    if isinstance(getattr(model, "lora_settings", None), LoRASettings):
        return model.lora_settings
    raise ValueError("the model's adapters were not added by add_lora (imported from PEFT?): save them with "
                     "llmzoo.hf.to_peft")


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s adapters and their settings (nothing of the frozen base) as a checkpoint file, whole or
    not at all; :func:`load_adapter` puts them on the same base again."""
    if not has_lora(model):
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to save: add_lora(model, ...) first")
    save_checkpoint({ADAPTER_KEY: asdict(settings_of(model)), "state_dict": dict(lora_state_dict(model))}, path)
    return Path(path)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapters of a :func:`save_adapter` file on ``model`` (adding them with the file's settings if it has
    none), in place; returns ``model``."""
    checkpoint = read_checkpoint(path)
    if ADAPTER_KEY not in checkpoint:
        raise ValueError(f"{path} is not an adapter checkpoint (llmzoo.lora.save_adapter writes them)")
    if not has_lora(model):
        add_lora(model, **checkpoint[ADAPTER_KEY])
    expected = lora_state_dict(model)
    given = checkpoint["state_dict"]
    if given.keys() != expected.keys() or any(given[k].shape != expected[k].shape for k in given):
        raise ValueError(f"the adapters of {path} do not fit this model (other targets, rank or shape): load them onto "
                         f"the model they were trained on")
    model.load_state_dict(given, strict=False)
    return model
