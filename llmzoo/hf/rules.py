"""State dicts across the boundary: each family's adapter lists :class:`Rule` s, one per llmzoo tensor, that
say which Hugging Face tensors it is made of and how (copied, transposed from Conv1D, concatenated, stacked
over experts). The same rules run in both directions, so import and export cannot drift apart."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from llmzoo.hf.adapter import adapter_for_model
from llmzoo.models import CausalLM
from llmzoo.models.build import listing


@dataclass(frozen=True)
class Rule:
    """llmzoo tensor ``ours`` = HF tensors ``theirs`` combined by ``how``:

    - ``copy``: the same tensor;  ``transpose``: a Conv1D weight ``[in, out]`` of an ``nn.Linear``;
    - ``concat``: rows concatenated (fused q|k|v, gate|up), split again by ``sizes`` on export;
    - ``experts``: per-expert matrices stacked on a new first dim; ``theirs`` lists them expert by
      expert, ``group`` at a time concatenated by rows (w1|w3 of one expert for ``gate_up``).
    """

    ours: str
    theirs: tuple[str, ...]
    how: str = "copy"
    sizes: tuple[int, ...] = ()
    group: int = 1

    def to_ours(self, tensors: list[Tensor]) -> Tensor:
        if self.how == "copy":
            return tensors[0]
        if self.how == "transpose":
            return tensors[0].t()
        if self.how == "concat":
            return torch.cat(tensors, dim=0)
        groups = [torch.cat(tensors[i:i + self.group], dim=0) for i in range(0, len(tensors), self.group)]
        return torch.stack(groups)

    def to_theirs(self, tensor: Tensor) -> list[Tensor]:
        if self.how == "copy":
            return [tensor]
        if self.how == "transpose":
            return [tensor.t()]
        if self.how == "concat":
            return list(tensor.split(list(self.sizes), dim=0))
        return [part for expert in tensor for part in expert.chunk(self.group, dim=0)]


# HF tensors that carry no weights of their own (buffers, the tied head)
IGNORED = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$|^lm_head\.weight$)")


def state_dict_rules(model: CausalLM, hf_state_dict: dict[str, Tensor] | None = None) -> list[Rule]:
    """The rules mapping ``model``'s tensors to a Hugging Face state dict (whose layout they follow
    where two are in use: GPT-2 without the ``transformer.`` prefix, fused Mixtral experts)."""
    return adapter_for_model(model).rules(model, hf_state_dict.keys() if hf_state_dict is not None else ())


def convert_hf_state_dict(model: CausalLM, hf_state_dict: dict[str, Tensor], pop: bool = False) -> dict[str, Tensor]:
    """``hf_state_dict`` under ``model``'s names and layouts; every tensor must be used and every
    shape right. ``pop`` empties ``hf_state_dict`` as it goes (halves peak memory for big models)."""
    rules = state_dict_rules(model, hf_state_dict)
    needed = {name for rule in rules for name in rule.theirs}
    missing = sorted(needed - hf_state_dict.keys())
    unexpected = sorted(k for k in hf_state_dict.keys() - needed if not IGNORED.search(k))
    if missing or unexpected:
        raise ValueError(f"Hugging Face weights do not match {type(model).__name__}: "
                         f"missing {listing(missing)}, unexpected {listing(unexpected)}")
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    converted = {}
    for rule in rules:
        parts = [hf_state_dict.pop(name) if pop else hf_state_dict[name] for name in rule.theirs]
        tensor = rule.to_ours(parts)
        if tensor.shape != shapes[rule.ours]:
            raise ValueError(f"shape mismatch for {rule.ours} (from {', '.join(rule.theirs[:2])}): "
                             f"Hugging Face gives {tuple(tensor.shape)}, the model has {tuple(shapes[rule.ours])}")
        converted[rule.ours] = tensor
    return converted


def load_hf_state_dict(model: CausalLM, hf_state_dict: dict[str, Tensor]) -> None:
    """Copy a Hugging Face state dict into ``model``; every tensor must be used and every weight found."""
    converted = convert_hf_state_dict(model, hf_state_dict)
    model.load_state_dict(converted, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    untouched = sorted(set(model.state_dict()) - set(converted) - {"lm_head.weight"} - buffers)
    if untouched:
        raise ValueError(f"no Hugging Face tensor maps to {untouched}")


def hf_state_dict(model: CausalLM) -> dict[str, Tensor]:
    """``model``'s weights under Hugging Face names and layouts (Mixtral experts one by one)."""
    ours = model.state_dict()
    return {name: tensor.contiguous() for rule in state_dict_rules(model)
            for name, tensor in zip(rule.theirs, rule.to_theirs(ours[rule.ours]))}


def linear_params(module) -> list[str]:
    """The parameter names of an ``nn.Linear`` (``weight``, and ``bias`` when it has one)."""
    return ["weight", "bias"] if module.bias is not None else ["weight"]
