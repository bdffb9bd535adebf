"""Qwen3 (Qwen team 2025, "Qwen3 Technical Report")."""

from __future__ import annotations

from llmzoo.layers import CausalSelfAttention, RMSNorm
from llmzoo.models.llama import Llama


class Qwen3(Llama):
    """Llama whose queries and keys are RMS-normalised per head before RoPE (QK-norm), with no biases, RoPE
    theta 1e6 and RMSNorm epsilon 1e-6; ``head_dim`` is usually set explicitly (128, wider than
    embed_dim / num_heads on the small sizes). Hugging Face twin: ``Qwen3ForCausalLM``."""

    def __init__(self, rope_theta: float = 1e6, norm_eps: float = 1e-6, **kwargs):
        """``kwargs``: as Llama."""
        super().__init__(rope_theta=rope_theta, norm_eps=norm_eps, **kwargs)

    def make_attention(self, layer: int, **options) -> CausalSelfAttention:
        eps = self.hparams.norm_eps
        return super().make_attention(layer, q_norm=RMSNorm(self.head_dim, eps), k_norm=RMSNorm(self.head_dim, eps),
                                      **options)
