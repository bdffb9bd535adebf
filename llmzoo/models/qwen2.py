"""Qwen2 / Qwen2.5 (Qwen team 2024, "Qwen2 Technical Report")."""

from __future__ import annotations

from llmzoo.layers import CausalSelfAttention
from llmzoo.models.llama import Llama


class Qwen2(Llama):
    """Llama with biases on the query, key and value projections only (none on the output projection or
    the MLP), RoPE theta 1e6 and RMSNorm epsilon 1e-6; small sizes tie the embeddings.
    Hugging Face twin: ``Qwen2ForCausalLM``."""

    def __init__(self, qkv_bias: bool = True, rope_theta: float = 1e6, norm_eps: float = 1e-6, **kwargs):
        """``qkv_bias``: biases on q, k and v; ``kwargs``: as Llama."""
        super().__init__(rope_theta=rope_theta, norm_eps=norm_eps, **kwargs)

    def make_attention(self, layer: int, **options) -> CausalSelfAttention:
        return super().make_attention(layer, qkv_bias=self.hparams.qkv_bias, **options)
