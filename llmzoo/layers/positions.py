"""Position information: learned and sinusoidal absolute embeddings, rotary embeddings (RoPE).

Every module here takes ``positions [B or 1, T]`` (int64), so left-padded batches can give each row
its own positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LearnedPositions(nn.Embedding):
    """Absolute positions as a trained table ``[max_positions, embed_dim]`` (GPT-1, GPT-2)."""

    def __init__(self, max_positions: int, embed_dim: int):
        super().__init__(max_positions, embed_dim)


class SinusoidalPositions(nn.Module):
    """Fixed absolute positions (Vaswani et al. 2017), a buffer with no parameters:
    ``PE(pos, 2i) = sin(pos / 10000^(2i/d))``, ``PE(pos, 2i+1) = cos(pos / 10000^(2i/d))``."""

    def __init__(self, max_positions: int, embed_dim: int, base: float = 10000.0):
        super().__init__()
        position = torch.arange(max_positions, dtype=torch.float64)[:, None]
        inv_freq = base ** (-torch.arange(0, embed_dim, 2, dtype=torch.float64) / embed_dim)
        table = torch.zeros(max_positions, embed_dim, dtype=torch.float64)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq[: embed_dim // 2])
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions]


def rope_inverse_frequencies(head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> Tensor:
    """``inv_freq [head_dim / 2]`` for RoPE, with optional context-extension ``scaling``:
    ``{"rope_type": "linear", "factor": f}`` (position interpolation) or ``{"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}`` (Llama 3.1)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported: use 'linear' or 'llama3' (or none)")


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half layout of Hugging Face checkpoints: returns ``(cos, sin)`` of
    ``[B or 1, T, head_dim]`` for ``positions [B or 1, T]``, applied to q and k by :func:`apply_rope`."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, theta, scaling), persistent=False)

    def _apply(self, fn, recurse=True):
        # follow the model's device but never its dtype: bf16 frequencies are off by radians at long positions
        exact = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = exact.to(self.inv_freq.device)
        return self

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, head_dim / 2]
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, Dh]`` by ``cos, sin [B or 1, T, Dh]``: ``x*cos + rotate_half(x)*sin``."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
