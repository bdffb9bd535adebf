"""LoRA (Hu et al., 2021): a frozen projection ``x @ W^T`` plus a trained low-rank update ``scale * x A^T B^T``.

An adapter is attached to a module that computes ``[.., in] -> [.., out]`` as ``x @ W^T (+ b)`` (an ``nn.Linear``,
or any module that does the same: a quantized linear) by a forward hook that adds the adapter's output to the
module's, so the module keeps its parameters and their names (``attention.qkv.weight``) and the adapter's live
beside them (``attention.qkv.adapter.A.q``). A fused projection (q|k|v, gate|up) gets one adapter per part of its
output, with the math of separate projections with adapters of their own. The stacked weights of a
mixture of experts get an :class:`ExpertLoRA`, which ``MoE`` runs inside its grouped matmuls.

:func:`add_lora` puts adapters on the projections a list of targets names and freezes everything else;
:func:`merge_lora` folds them into the weights. Both work on any model built from the shared layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmzoo.layers.attention import CausalSelfAttention
from llmzoo.layers.mlp import MLP, MoE, SwiGLU

ATTENTION_TARGETS = ("q", "k", "v", "out")
TARGETS = (*ATTENTION_TARGETS, "gate", "up", "down", "experts", "head")  # every name add_lora knows


@dataclass
class LoRASettings:
    """LoRA adapters on a model (the ``lora`` section of the model settings: ``--model.lora.r 16``).

    Args:
        r: rank of each adapter (a positive integer; a multiple of 8 with the ``experts`` target).
        alpha: the update is scaled by ``alpha / r``.
        dropout: dropout on the adapters' input (not on the head's), in [0, 1).
        targets: the projections to adapt: ``q``, ``k``, ``v``, ``out`` (attention), ``gate``, ``up``, ``down``
            (MLP), ``experts`` (mixture-of-experts weights), ``head`` (the output head, untied models only).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))


class LoRA(nn.Module):
    """The low-rank update ``delta(x) [.., out]`` of a projection ``[.., in] -> [.., out]`` whose outputs are the
    concatenation of ``parts`` (``{name: size}`` in order: q, k, v of a fused qkv; one part for a plain projection).

    Part ``p`` of ``delta(x)`` is ``scale * dropout(x) @ A[p]^T @ B[p]^T`` (``A[p] [r, in]``, ``B[p] [size_p, r]``)
    if ``p`` is in ``adapted``, else zero; ``scale = alpha / r``. ``B`` starts at zero (the update starts at 0), ``A``
    Kaiming-uniform, as in PEFT. ``dtype`` / ``device``: of the parameters (the base weight's)."""

    def __init__(self, in_features: int, parts: dict[str, int], adapted: Iterable[str], r: int, alpha: float,
                 dropout: float = 0.0, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.parts, self.r, self.alpha = in_features, dict(parts), r, alpha
        self.scale = alpha / r
        self.adapted = [name for name in self.parts if name in set(adapted)]  # in the order of the outputs
        kwargs = dict(dtype=dtype, device=device)
        self.A = nn.ParameterDict({name: nn.Parameter(torch.empty(r, in_features, **kwargs)) for name in self.adapted})
        self.B = nn.ParameterDict({name: nn.Parameter(torch.empty(size, r, **kwargs))
                                   for name, size in self.parts.items() if name in self.adapted})
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True  # False inside adapters_disabled: the projection computes its base output alone
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name in self.A:
            nn.init.kaiming_uniform_(self.A[name], a=math.sqrt(5))
            nn.init.zeros_(self.B[name])

    def forward(self, x: Tensor) -> Tensor:
        """``x [.., in]`` -> ``delta [.., out]``: one matmul with every part's ``A``, then one per adapted part."""
        low_rank = F.linear(self.dropout(x), torch.cat([self.A[name] for name in self.adapted]))  # [.., parts * r]
        chunks = dict(zip(self.adapted, low_rank.split(self.r, dim=-1)))
        pieces = [F.linear(chunks[name], self.B[name]) if name in chunks else low_rank.new_zeros(*x.shape[:-1], size)
                  for name, size in self.parts.items()]
        return torch.cat(pieces, dim=-1) * self.scale

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` per part, stacked like the base weight: ``[out, in]``."""
        A = self.A[self.adapted[0]]
        return torch.cat([self.B[name] @ self.A[name] if name in self.B else A.new_zeros(size, self.in_features)
                          for name, size in self.parts.items()]) * self.scale

    def extra_repr(self) -> str:
        return f"parts={self.adapted} of {list(self.parts)}, r={self.r}, alpha={self.alpha}"


class ExpertLoRA(nn.Module):
    """LoRA of stacked expert weights ``W [E, out, in]``: per expert ``A [E, r, in]``, ``B [E, out, r]``.

    ``forward(x [N, in], offsets [E])`` takes rows sorted by expert, as ``MoE`` holds them (``offsets``: the end of
    each expert's rows), and returns ``scale * x @ A_e^T @ B_e^T [N, out]``, two grouped matmuls. ``r`` must be a
    multiple of 8 (the grouped matmul's alignment)."""

    def __init__(self, weight: Tensor, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r % 8:
            raise ValueError(f"LoRA on experts needs r divisible by 8 (the grouped matmul's alignment), got r={r}: "
                             f"use r=8, 16, ...")
        experts, out_features, in_features = weight.shape
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        kwargs = dict(dtype=weight.dtype, device=weight.device)
        self.A = nn.Parameter(torch.empty(experts, r, in_features, **kwargs))
        self.B = nn.Parameter(torch.empty(experts, out_features, r, **kwargs))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for expert in self.A:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        low_rank = F.grouped_mm(self.dropout(x), self.A.transpose(1, 2), offs=offsets)  # [N, r]
        return F.grouped_mm(low_rank, self.B.transpose(1, 2), offs=offsets) * self.scale

    def delta_weight(self) -> Tensor:
        """``scale * B_e @ A_e`` for every expert: ``[E, out, in]``."""
        return torch.bmm(self.B, self.A) * self.scale

    def extra_repr(self) -> str:
        return f"experts={self.A.shape[0]}, r={self.r}, alpha={self.alpha}"


# ====================================================================== attaching adapters to projections
def _add_delta(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return output + module.adapter(args[0]) if module.adapter.enabled else output


def attach(module: nn.Module, adapter: LoRA) -> None:
    """Add ``adapter``'s output to ``module``'s from now on (``module.adapter``, a forward hook)."""
    module.adapter = adapter
    module.adapter_hook = module.register_forward_hook(_add_delta)


def detach(module: nn.Module) -> LoRA:
    """Take ``module``'s adapter off (the module computes its own output again); returns the adapter."""
    module.adapter_hook.remove()
    adapter = module.adapter
    del module.adapter, module.adapter_hook
    return adapter


def head_weight(head: nn.Module) -> Tensor:
    """The output head's effective weight ``[vocab, D]``: its own, plus its adapter's update when it has one (what
    the fused loss, which never calls the head, multiplies by)."""
    adapter = getattr(head, "adapter", None)
    return head.weight if adapter is None or not adapter.enabled else head.weight + adapter.delta_weight()


def projections(module: nn.Module) -> Iterator[tuple[nn.Module, str, dict[str, int]]]:
    """The projections of a shared layer that LoRA can adapt: ``(projection, attribute, {part: size})``."""
    if isinstance(module, CausalSelfAttention):
        q, kv = module.num_heads * module.head_dim, module.num_kv_heads * module.head_dim
        yield module.qkv, "qkv", {"q": q, "k": kv, "v": kv}
        yield module.out, "out", {"out": module.out.out_features}
    elif isinstance(module, MLP):
        yield module.up, "up", {"up": module.up.out_features}
        yield module.down, "down", {"down": module.down.out_features}
    elif isinstance(module, SwiGLU):
        ffn_dim = module.down.in_features
        yield module.gate_up, "gate_up", {"gate": ffn_dim, "up": ffn_dim}
        yield module.down, "down", {"down": module.down.out_features}


def check_settings(r: int, alpha: float, dropout: float, targets: Iterable[str]) -> tuple[str, ...]:
    """The targets as a tuple; a one-line ``ValueError`` for settings LoRA cannot use."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}: use r=8 (or 4, 16, ...)")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}: use alpha=16 (scale = alpha / r)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [target for target in targets if target not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown or '(none given)'}: choose among {', '.join(TARGETS)}")
    return targets


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             targets: Iterable[str] = ATTENTION_TARGETS) -> nn.Module:
    """Put LoRA adapters on ``model``'s projections named by ``targets`` and freeze every other parameter; in place.

    Targets: ``q``, ``k``, ``v``, ``out`` (attention), ``gate``, ``up``, ``down`` (MLP, SwiGLU), ``experts`` (the
    stacked gate|up and down weights of every MoE), ``head`` (``model.lm_head``; not when it is tied to the
    embedding). Parts of a fused projection get their own adapters (``q`` and ``v`` of ``qkv``). The head's adapter
    has no dropout (the fused loss uses its merged weight). Every target must match a layer of ``model``.
    Returns ``model``."""
    targets = check_settings(r, alpha, dropout, targets)
    if any(isinstance(m, (LoRA, ExpertLoRA)) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters: merge_lora(model) first, or train those")
    found: set[str] = set()
    adapters: list[tuple[nn.Module, LoRA]] = []
    expert_adapters: list[tuple[MoE, str, ExpertLoRA]] = []
    for module in model.modules():
        for projection, _, parts in projections(module):
            adapted = [part for part in parts if part in targets]
            if adapted:
                found.update(adapted)
                adapters.append((projection, LoRA(projection.in_features, parts, adapted, r, alpha, dropout,
                                                  projection.weight.dtype, projection.weight.device)))
        if isinstance(module, MoE) and "experts" in targets:
            found.add("experts")
            expert_adapters += [(module, name, ExpertLoRA(getattr(module, name), r, alpha, dropout))
                                for name in ("gate_up", "down")]
    head = getattr(model, "lm_head", None)
    if "head" in targets and isinstance(head, nn.Linear):
        embed = getattr(model, "embed", None)
        if embed is not None and head.weight is embed.weight:
            raise ValueError("LoRA target 'head' on a model whose head is tied to its embedding (tie_word_embeddings): "
                             "leave 'head' out of the targets")
        found.add("head")
        adapters.append((head, LoRA(head.in_features, {"head": head.out_features}, ["head"], r, alpha, 0.0,
                                    head.weight.dtype, head.weight.device)))
    missing = [target for target in targets if target not in found]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no layer of {type(model).__name__}: choose among the "
                         f"targets it has ({', '.join(t for t in TARGETS if t in available_targets(model))})")
    model.requires_grad_(False)
    for projection, adapter in adapters:
        attach(projection, adapter)
    for moe, name, adapter in expert_adapters:
        moe.adapters[name] = adapter
    for adapter in lora_modules(model):
        adapter.requires_grad_(True)
    model.lora_settings = LoRASettings(r, alpha, dropout, list(targets))
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Every adapter of ``model`` switched off inside the block: the model computes what its frozen base does, with
    the same weights (no copy; a preference run's reference under LoRA). Re-entrant; the adapters are on again after."""
    adapters = lora_modules(model)
    states = [adapter.enabled for adapter in adapters]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield model
    finally:
        for adapter, state in zip(adapters, states):
            adapter.enabled = state


def available_targets(model: nn.Module) -> set[str]:
    """The targets :func:`add_lora` finds in ``model``."""
    names = {part for module in model.modules() for _, _, parts in projections(module) for part in parts}
    if any(isinstance(module, MoE) for module in model.modules()):
        names.add("experts")
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        names.add("head")
    return names


def lora_modules(model: nn.Module) -> list[nn.Module]:
    """Every adapter of ``model`` (:class:`LoRA` and :class:`ExpertLoRA`)."""
    return [module for module in model.modules() if isinstance(module, (LoRA, ExpertLoRA))]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its projection's weight (``W += scale * B @ A``) and take it off: the model computes
    the same function with plain layers (for export and fast inference). Every parameter is trainable again. In
    place; returns ``model``. A projection without a ``weight`` to add to (a quantized one) is refused."""
    for module in list(model.modules()):
        if isinstance(getattr(module, "adapter", None), LoRA):
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Tensor) or not weight.is_floating_point():
                raise ValueError(f"cannot merge a LoRA adapter into a {type(module).__name__}: it has no floating "
                                 f"point weight; dequantize it first")
            weight += detach(module).delta_weight().to(weight.dtype)
        if isinstance(module, MoE):
            for name, adapter in list(module.adapters.items()):
                getattr(module, name).add_(adapter.delta_weight().to(getattr(module, name).dtype))
                del module.adapters[name]
    model.requires_grad_(True)
    model.__dict__.pop("lora_settings", None)
    return model
