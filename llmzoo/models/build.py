"""Models built from weights they are given (a checkpoint, a Hugging Face directory): parameters created on
the meta device, then handed the tensors, so nothing is initialised at random or held twice."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from torch import Tensor, nn

from llmzoo.checkpoints import QUANTIZATION_KEY, checkpoint_class_path, model_hyperparameters, read_checkpoint
from llmzoo.models.base import CausalLM


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no random init) while buffers computed at
    construction (RoPE frequencies, metric states) stay real: the model is then filled with ``assign``."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(cls: type[CausalLM], kwargs: dict) -> CausalLM:
    """``cls(**kwargs)`` with its parameters on the meta device: no memory, no random init."""
    with parameters_on_meta():
        return cls(**kwargs)


def listing(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def fill_model(model: CausalLM, state_dict: dict[str, Tensor]) -> CausalLM:
    """Give an :func:`empty_model` the tensors of ``state_dict`` (llmzoo names; they are assigned, so the
    model takes their dtype) and tie the head again. Every parameter must be given, nothing else."""
    keys = model.load_state_dict(state_dict, strict=False, assign=True)
    if model.hparams.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):  # a quantized head is a copy
        model.lm_head.weight = model.embed.weight
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing or keys.unexpected_keys:
        raise ValueError(f"weights do not match {type(model).__name__}: missing {listing(missing)}, "
                         f"unexpected {listing(sorted(keys.unexpected_keys))}")
    return model


def build_model(cls: type[CausalLM], kwargs: dict, state_dict: dict[str, Tensor]) -> CausalLM:
    """``cls(**kwargs)`` holding the tensors of ``state_dict`` (see :func:`fill_model`)."""
    return fill_model(empty_model(cls, kwargs), state_dict)


def resolve_class(name: str | type[CausalLM]) -> type[CausalLM]:
    """A model class from itself, an architecture name (``"Llama"``) or the class path of an imported class."""
    from llmzoo.models import ARCHITECTURES

    if isinstance(name, type) and issubclass(name, CausalLM):
        return name
    cls = ARCHITECTURES.get(name) or CausalLM.registry.get(name)  # never imports: a checkpoint cannot make us run code
    if cls is None:
        raise ValueError(f"unknown model class {name!r}: use one of {', '.join(ARCHITECTURES)} or import the module "
                         f"that defines it first (on the command line: llmzoo --import MODULE ...)")
    return cls


def load_checkpoint_model(checkpoint: str | os.PathLike | dict, model_class: str | type[CausalLM] | None = None,
                          **overrides) -> CausalLM:
    """The model of a Lightning checkpoint (a path, or the dict :func:`~llmzoo.checkpoints.read_checkpoint`
    returned), its weights in the checkpoint's dtype; nothing is initialised at random. The class is the one
    the checkpoint records, else ``model_class``; ``overrides`` replace recorded hyperparameters."""
    source = "the checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"{source} is not a Lightning checkpoint of an llmzoo model (no state_dict / hyper_parameters)")
    class_path = checkpoint_class_path(checkpoint)
    if class_path is None and model_class is None:
        from llmzoo.models import ARCHITECTURES

        raise ValueError(f"{source} does not name its architecture: pass model_class (--model), one of "
                         f"{', '.join(ARCHITECTURES)}")
    cls = resolve_class(class_path or model_class)
    if model_class is not None and not issubclass(cls, resolve_class(model_class)):
        raise ValueError(f"{source} holds a {class_path}, not a {resolve_class(model_class).__name__}: "
                         f"drop model_class or fix it")
    model = empty_model(cls, {**model_hyperparameters(checkpoint), **overrides})
    if checkpoint.get(QUANTIZATION_KEY):  # llmzoo convert --quantize: the quantized layers, empty, then filled
        from llmzoo.quantize import quantized_structure

        quantized_structure(model, checkpoint[QUANTIZATION_KEY])
    return fill_model(model, checkpoint["state_dict"])
