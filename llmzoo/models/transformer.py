"""The classic Transformer decoder LM (Vaswani et al. 2017, "Attention Is All You Need")."""

from __future__ import annotations

import math

from torch import nn

from llmzoo.layers import MLP, CausalSelfAttention, SinusoidalPositions
from llmzoo.models.base import CausalLM


class Transformer(CausalLM):
    """Sinusoidal positions, embeddings scaled by sqrt(embed_dim), post-norm blocks of multi-head
    attention and a ReLU MLP, embedding shared with the output layer. No Hugging Face twin."""

    prenorm = False
    activation = "relu"

    def __init__(self, vocab_size: int = 50257, embed_dim: int = 256, num_heads: int = 4, num_layers: int = 4,
                 max_position_embeddings: int = 1024, dropout: float = 0.1, ffn_dim: int | None = None,
                 norm_eps: float = 1e-5, tie_word_embeddings: bool = True, **kwargs):
        """``ffn_dim`` defaults to 4 * embed_dim; ``norm_eps`` is the LayerNorm epsilon; ``kwargs`` are the
        training arguments of :class:`~llmzoo.models.base.CausalLM`."""
        super().__init__(vocab_size, embed_dim, num_heads, num_layers, max_position_embeddings, dropout,
                         tie_word_embeddings, **kwargs)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hparams.embed_dim)

    def make_positions(self) -> nn.Module:
        return SinusoidalPositions(self.hparams.max_position_embeddings, self.hparams.embed_dim)

    def make_attention(self, layer: int) -> CausalSelfAttention:
        hp = self.hparams
        return CausalSelfAttention(hp.embed_dim, hp.num_heads, bias=True, dropout=hp.dropout)

    def make_mlp(self, layer: int) -> nn.Module:
        hp = self.hparams
        return MLP(hp.embed_dim, hp.ffn_dim or 4 * hp.embed_dim, activation=self.activation)

    def make_norm(self) -> nn.Module:
        return nn.LayerNorm(self.hparams.embed_dim, eps=self.hparams.norm_eps)
