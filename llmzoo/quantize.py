"""Weight-only int8 / int4 quantization of a model of the zoo, in place (see docs/inference.md).

    from llmzoo.quantize import quantize
    quantize(model, "int8")                     # every Linear and the MoE experts; embeddings stay
    quantize(model, "int4", group_size=32)      # 4 bits, a scale and a zero per 32 input columns

Every ``nn.Linear`` becomes a :class:`~llmzoo.layers.quantized.QuantizedLinear` (the output head too unless
``head=False``; a head tied to the embedding gets its own quantized copy, the embedding stays), and the stacked
expert weights of a :class:`~llmzoo.layers.MoE` become :class:`~llmzoo.layers.quantized.Int8Weight` /
``Int4Weight`` modules. MoE routers stay in floating point (a rounding error there changes which experts run).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from llmzoo.checkpoints import QUANTIZATION_KEY  # noqa: F401  in a checkpoint: {"mode", "group_size", "head"}
from llmzoo.layers import MoE
from llmzoo.layers.lora import attach, detach
from llmzoo.layers.quantized import (GROUP_SIZES, Int4Weight, Int8Weight, QuantizedLinear, empty_weight,
                                     quantize_weight)

MODES = ("int8", "int4")


def quantize(model: nn.Module, mode: str = "int8", group_size: int = 32, head: bool = True) -> nn.Module:
    """Quantize ``model``'s weights in place (``"int8"``: per output channel; ``"int4"``: per ``group_size`` input
    columns) and return it; ``head``: the output head too. The model records how in ``model.quantization``."""
    targets = list(_targets(model, mode, group_size, head))
    with torch.no_grad():
        for parent, attribute, _, module in targets:
            if isinstance(module, nn.Linear):
                _replace(parent, attribute, QuantizedLinear.quantize(module, mode, group_size))
            else:  # a stacked expert weight [E, N, K]
                delattr(parent, attribute)
                setattr(parent, attribute, quantize_weight(module.detach(), mode, group_size))
    model.quantization = {"mode": mode, "group_size": group_size, "head": head}
    return model


@torch.no_grad()
def dequantize(model: nn.Module) -> nn.Module:
    """Float layers again (``nn.Linear``, expert ``nn.Parameter``, frozen) holding the dequantized weights, LoRA
    adapters kept; in place. To fold adapters trained on a quantized base (QLoRA):
    ``quantize(merge_lora(dequantize(model)), "int8")`` dequantizes, adds the deltas and quantizes again."""
    for name, module in list(model.named_modules()):
        parent, _, attribute = name.rpartition(".")
        if isinstance(module, QuantizedLinear):
            weight = module.weight.dequantize()
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device=weight.device)
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            linear.requires_grad_(False)  # frozen, as the quantized weight was
            _replace(model.get_submodule(parent), attribute, linear)
        elif isinstance(module, (Int8Weight, Int4Weight)) and isinstance(model.get_submodule(parent), MoE):
            moe = model.get_submodule(parent)
            delattr(moe, attribute)
            setattr(moe, attribute, nn.Parameter(module.dequantize(), requires_grad=False))
    model.__dict__.pop("quantization", None)
    return model


def _replace(parent: nn.Module, attribute: str, new: nn.Module) -> None:
    """``parent.attribute = new``, moving a LoRA adapter of the old module onto the new one."""
    old = getattr(parent, attribute)
    if getattr(old, "adapter", None) is not None:
        attach(new, detach(old))
    setattr(parent, attribute, new)


def quantized_structure(model: nn.Module, spec: dict) -> nn.Module:
    """Give ``model`` (as built for a checkpoint, parameters on the meta device) the empty quantized layers of
    ``spec`` (a checkpoint's :data:`QUANTIZATION_KEY`), on the meta device, to be filled from its state dict."""
    mode, group_size, head = spec["mode"], spec["group_size"], spec["head"]
    for parent, attribute, _, module in list(_targets(model, mode, group_size, head)):
        if isinstance(module, nn.Linear):
            bias = None if module.bias is None else torch.empty(module.out_features, device="meta")
            weight = empty_weight((module.out_features, module.in_features), mode, group_size, "meta")
            _replace(parent, attribute, QuantizedLinear(weight, bias))
        else:
            delattr(parent, attribute)
            setattr(parent, attribute, empty_weight(tuple(module.shape), mode, group_size, "meta"))
    model.quantization = dict(spec)
    return model


def quantize_checkpoint(checkpoint: dict, mode: str = "int8", group_size: int = 32, head: bool = True) -> dict:
    """A Lightning checkpoint (read by :func:`~llmzoo.checkpoints.read_checkpoint`) with its model quantized: its
    hyperparameters and tokenizer kept, the training state (optimizer, schedulers, loops) left out, and how it is
    quantized under :data:`QUANTIZATION_KEY`, which :func:`~llmzoo.models.build.load_checkpoint_model` and ``llmzoo
    generate`` read back."""
    from llmzoo.models.build import load_checkpoint_model

    check_options(mode, group_size)
    model = quantize(load_checkpoint_model(checkpoint), mode, group_size, head)
    kept = {key: value for key, value in checkpoint.items() if key not in TRAINING_STATE}
    return {**kept, "state_dict": model.state_dict(), "optimizer_states": [], "lr_schedulers": [],
            QUANTIZATION_KEY: model.quantization}


TRAINING_STATE = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks")


def check_options(mode: str, group_size: int) -> None:
    """One-line ``ValueError`` for an unknown mode or an int4 group size the kernels do not take."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}: use 'int8' or 'int4'")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))} for int4, got {group_size!r}")


def _targets(model: nn.Module, mode: str, group_size: int, head: bool) -> Iterator[tuple[nn.Module, str, str, object]]:
    """``(parent, attribute, qualified name, Linear or expert weight)`` of every weight to quantize, after checking
    ``mode`` and that ``group_size`` divides every input width (one line naming the first layer it does not)."""
    check_options(mode, group_size)
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is quantized already ({model.quantization['mode']}): quantize the float model")
    found = []
    for name, module in model.named_modules():  # in the model's order: the first layer a group size misfits is named
        parent, _, attribute = name.rpartition(".")
        if isinstance(module, nn.Linear) and attribute != "router" and (head or name != "lm_head"):
            found.append((model.get_submodule(parent), attribute, name, module))
        if isinstance(module, MoE):
            found += [(module, attribute, f"{name}.{attribute}", getattr(module, attribute))
                      for attribute in ("gate_up", "down") if isinstance(getattr(module, attribute), nn.Parameter)]
    if mode == "int4":
        for _, _, qualified, weight in found:
            width = _width(weight)
            if width % group_size:
                fits = [g for g in GROUP_SIZES if all(_width(w) % g == 0 for *_, w in found)]
                fix = f"group_size={fits[-1]}" if fits else "int8"
                raise ValueError(f"group_size={group_size} does not divide the {width} input columns of {qualified}: "
                                 f"use {fix}")
    yield from found


def _width(weight) -> int:
    return weight.in_features if isinstance(weight, nn.Linear) else weight.shape[-1]
