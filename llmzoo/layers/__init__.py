"""Shared building blocks: plain ``nn.Module``s that know nothing of models, data or Lightning."""

from llmzoo.layers.attention import CausalSelfAttention, KVCache, slot_mask
from llmzoo.layers.block import Block
from llmzoo.layers.mlp import MLP, MoE, SwiGLU, load_balancing_loss
from llmzoo.layers.norms import RMSNorm
from llmzoo.layers.positions import (LearnedPositions, RotaryEmbedding, SinusoidalPositions, apply_rope,
                                     rope_inverse_frequencies)

__all__ = [
    "Block", "CausalSelfAttention", "KVCache", "LearnedPositions", "MLP", "MoE", "RMSNorm",
    "RotaryEmbedding", "SinusoidalPositions", "SwiGLU", "apply_rope", "load_balancing_loss",
    "rope_inverse_frequencies", "slot_mask",
]
