"""Weight initialisation shared by the layers (each layer's ``init_weights(std, residual_std)`` uses it)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_linear(linear: nn.Linear, std: float) -> None:
    """Normal(0, std) weight, zero bias."""
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
