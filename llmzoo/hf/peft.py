"""LoRA adapters as Hugging Face PEFT directories, both ways: ``adapter_config.json`` (``peft_type: LORA``,
``task_type: CAUSAL_LM``) and ``adapter_model.safetensors`` with PEFT's names for the family
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), found with the family adapter's
:class:`~llmzoo.hf.rules.Rule` s: the adapter of a fused llmzoo projection (``attention.qkv``) is written as
one per Hugging Face module that the rule splits it into (``q_proj``, ``k_proj``, ``v_proj``), and the
per-part adapters of a projection that Hugging Face keeps fused too (GPT-2's ``c_attn``) as one adapter of
their summed ranks (``rank_pattern`` / ``alpha_pattern`` keep each module's scale). transformers and peft are
never imported: PEFT reads what this writes with ``PeftModel.from_pretrained(base, directory)``."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llmzoo.files import new_directory
from llmzoo.hf.adapter import adapter_for_model
from llmzoo.hf.rules import Rule, state_dict_rules
from llmzoo.hf.weights import write_json
from llmzoo.layers.lora import LoRA, attach, has_lora, projections
from llmzoo.models import CausalLM

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names
KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def _adapted_projections(model: CausalLM) -> dict[str, tuple[nn.Module, dict[str, int]]]:
    """Every projection LoRA can adapt, by its name in the model: ``(module, {part: size})``."""
    parts = {id(projection): (projection, found) for module in model.modules()
             for projection, _, found in projections(module)}
    parts[id(model.lm_head)] = (model.lm_head, {"head": model.lm_head.out_features})
    return {name: parts[id(module)] for name, module in model.named_modules() if id(module) in parts}


def _rows(rule: Rule, out_features: int) -> list[tuple[str, int, int]]:
    """``(Hugging Face module, first row, end row)`` of the llmzoo projection's outputs for each module of ``rule``."""
    sizes = rule.sizes if rule.how == "concat" else (out_features,)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(name.removesuffix(".weight"), start, start + size) for name, start, size in zip(rule.theirs, starts, sizes)]


def _part_rows(parts: dict[str, int]) -> dict[str, tuple[int, int]]:
    starts = [sum(list(parts.values())[:i]) for i in range(len(parts))]
    return {name: (start, start + size) for (name, size), start in zip(parts.items(), starts)}


def to_peft(model: CausalLM, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
            overwrite: bool = False) -> Path:
    """Write ``model``'s LoRA adapters as a PEFT directory that ``PeftModel.from_pretrained(base, directory)``
    loads onto the Hugging Face export of the model's base (``to_hf`` of the model without adapters), giving
    the same logits. ``base_model_name_or_path`` is recorded for PEFT. Adapters on mixture-of-experts weights
    are refused (PEFT keeps those only for ``target_parameters`` without dropout). The directory appears whole
    or not at all; a non-empty one is replaced only with ``overwrite``. Returns the directory."""
    if not has_lora(model):
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to export: add_lora(model, ...) and train them, "
                         f"or export the whole model with to_hf")
    if any(len(moe.adapters) for moe in model.modules() if hasattr(moe, "adapters")):
        raise ValueError("LoRA adapters on mixture-of-experts weights (target 'experts') cannot be exported to PEFT: "
                         "merge them (merge_lora) and export the whole model with to_hf")
    rules = {rule.ours: rule for rule in state_dict_rules(model)}
    tensors, ranks, alphas, fan_in_fan_out, dropout = {}, {}, {}, False, 0.0
    for name, (module, parts) in _adapted_projections(model).items():
        adapter = getattr(module, "adapter", None)
        if adapter is None:
            continue
        rule = rules[f"{name}.weight"]
        fan_in_fan_out |= rule.how == "transpose"
        dropout = getattr(adapter.dropout, "p", dropout)
        part_rows = _part_rows(adapter.parts)
        for hf_module, start, end in _rows(rule, module.out_features):
            kept = [part for part in adapter.adapted if part_rows[part][0] < end and part_rows[part][1] > start]
            if not kept:
                continue
            r = adapter.r
            B = adapter.B[kept[0]].new_zeros(end - start, r * len(kept))
            for k, part in enumerate(kept):  # each part's B in its rows and its own r columns
                first, last = max(part_rows[part][0], start), min(part_rows[part][1], end)
                B[first - start:last - start, k * r:(k + 1) * r] = adapter.B[part][first - part_rows[part][0]:
                                                                                   last - part_rows[part][0]]
            tensors[f"{PREFIX}{hf_module}.lora_A.weight"] = torch.cat([adapter.A[part] for part in kept]).contiguous()
            tensors[f"{PREFIX}{hf_module}.lora_B.weight"] = B.contiguous()
            ranks[hf_module], alphas[hf_module] = r * len(kept), float(adapter.scale * r * len(kept))
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(a for m, a in alphas.items() if ranks[m] == r).most_common(1)[0][0]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": sorted(ranks), "rank_pattern": {m: v for m, v in ranks.items() if v != r},
              "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha}, "bias": "none",
              "fan_in_fan_out": fan_in_fan_out, "modules_to_save": None, "init_lora_weights": True,
              "inference_mode": True, "use_rslora": False, "use_dora": False, "lora_bias": False,
              "layers_to_transform": None, "layers_pattern": None, "target_parameters": None,
              "base_model_name_or_path": base_model_name_or_path, "revision": None,
              "auto_mapping": None}
    with new_directory(directory, overwrite, replaceable=_peft_directory) as temporary:
        write_json(temporary / CONFIG, config)
        save_file(tensors, str(temporary / WEIGHTS), metadata={"format": "pt"})
    return Path(directory)


def _peft_directory(directory: Path) -> bool:
    if not (directory / CONFIG).is_file():
        raise FileExistsError(f"{directory} is not empty and holds no {CONFIG}: refusing to replace a directory that "
                              f"is not a PEFT adapter directory")
    return True


def read_peft_config(directory: str | os.PathLike) -> dict:
    """A PEFT directory's ``adapter_config.json``, refusing what llmzoo's LoRA does not implement."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a PEFT adapter directory (adapter_config.json and "
                                f"{WEIGHTS})")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a {config.get('peft_type')} adapter: llmzoo reads LoRA adapters only")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{directory} is a {config['task_type']} adapter: llmzoo reads CAUSAL_LM adapters only")
    for key, allowed in (("use_dora", (None, False)), ("lora_bias", (None, False)), ("bias", (None, "none")),
                         ("modules_to_save", (None, [])), ("target_parameters", (None, [])),
                         ("trainable_token_indices", (None,))):
        if config.get(key) not in allowed:
            raise ValueError(f"{directory}: {key}={config[key]!r} is not supported by llmzoo's LoRA (only plain LoRA "
                             f"on linear projections)")
    return config


def from_peft(model: CausalLM, directory: str | os.PathLike) -> CausalLM:
    """Put the LoRA adapters of a PEFT directory on ``model`` (an llmzoo model of the family the adapter was made
    for, without adapters), in place: the model then computes what ``PeftModel`` computes on the matching Hugging
    Face model, and only the adapters are trainable. Each module's rank and scale come from ``r`` /
    ``lora_alpha`` and the ``rank_pattern`` / ``alpha_pattern``. Returns ``model``."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters: merge_lora(model) first")
    config = read_peft_config(directory)
    tensors = load_file(str(Path(directory) / WEIGHTS))
    factors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            raise ValueError(f"{directory}: {key} is not a LoRA weight of PEFT's layout (base_model.model.<module>."
                             f"lora_A.weight)")
        factors.setdefault(match[1], {})[match[2]] = tensor
    family = adapter_for_model(model).model_type
    rules = state_dict_rules(model, dict.fromkeys(f"{module}.weight" for module in factors))
    by_hf = {hf: (rule, j) for rule in rules for j, hf in enumerate(rule.theirs)}
    adapted = _adapted_projections(model)
    updates: dict[str, dict[str, tuple[Tensor, Tensor, float]]] = {}  # llmzoo projection -> part -> (A, B, scale)
    for hf_module, pair in factors.items():
        found = by_hf.get(f"{hf_module}.weight")
        name = found[0].ours.removesuffix(".weight") if found else None
        if name not in adapted or set(pair) != {"A", "B"}:
            raise ValueError(f"{directory} adapts {hf_module}, which is not a projection of this {family} model: the "
                             f"adapter was made for another family or shape (base model "
                             f"{config.get('base_model_name_or_path')!r}); load it onto the model it was trained on")
        rule, j = found
        module, parts = adapted[name]
        part = list(parts)[j] if rule.how == "concat" else (next(iter(parts)) if len(parts) == 1 else name.split(".")[-1])
        r = _pattern(config, "rank_pattern", hf_module, config["r"])
        alpha = _pattern(config, "alpha_pattern", hf_module, config["lora_alpha"])
        scale = alpha / (r ** 0.5 if config.get("use_rslora") else r)
        expected = (parts[part] if part in parts else module.out_features, module.in_features)
        if pair["A"].shape != (r, expected[1]) or pair["B"].shape != (expected[0], r):
            raise ValueError(f"{directory}: the adapter of {hf_module} has shapes {tuple(pair['A'].shape)} and "
                             f"{tuple(pair['B'].shape)}, this model needs ({r}, {expected[1]}) and ({expected[0]}, {r}): "
                             f"it was made for a model of another shape")
        updates.setdefault(name, {})[part] = (pair["A"], pair["B"], scale)
    for name, parts_found in updates.items():
        module, parts = adapted[name]
        if any(part not in parts for part in parts_found):  # one adapter over a fused projection (GPT-2's c_attn)
            parts = {part: module.out_features for part in parts_found}
        if name == "lm_head" and module.weight is model.embed.weight:
            raise ValueError(f"{directory} adapts lm_head, which this model ties to its embedding: load it onto an "
                             f"untied model")
        rank = max(A.shape[0] for A, _, _ in parts_found.values())
        weight = module.weight
        adapter = LoRA(module.in_features, parts, parts_found, rank, alpha=rank, dropout=config.get("lora_dropout", 0.0),
                       dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            for part, (A, B, scale) in parts_found.items():  # scale folded into B, ranks padded with zeros: exact
                adapter.A[part].zero_()[:A.shape[0]] = A.to(weight.dtype)
                adapter.B[part].zero_()[:, :A.shape[0]] = (B * scale).to(weight.dtype)
        attach(module, adapter)
    model.requires_grad_(False)
    for module, _ in adapted.values():
        if hasattr(module, "adapter"):
            module.adapter.requires_grad_(True)
    return model


def _pattern(config: dict, key: str, module: str, default):
    """A module's value in PEFT's ``rank_pattern`` / ``alpha_pattern`` (keys match a module's name or its end)."""
    for pattern, value in (config.get(key) or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default
