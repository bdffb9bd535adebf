"""Llama (Touvron et al. 2023): the modern decoder recipe most open models share."""

from __future__ import annotations

from torch import nn

from llmzoo.layers import CausalSelfAttention, RMSNorm, RotaryEmbedding, SwiGLU
from llmzoo.models.base import CausalLM


def llama_ffn_dim(embed_dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4 * embed_dim, rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * 4 * embed_dim / 3)
    return multiple_of * -(-hidden // multiple_of)


class Llama(CausalLM):
    """Pre-norm RMSNorm blocks, rotary positions (RoPE), SwiGLU feed-forward, grouped-query attention
    (``num_kv_heads`` < ``num_heads``), no biases, untied output head. Hugging Face twin: ``LlamaForCausalLM``."""

    def __init__(self, vocab_size: int = 32000, embed_dim: int = 256, num_heads: int = 8, num_layers: int = 4,
                 max_position_embeddings: int = 2048, dropout: float = 0.0, num_kv_heads: int | None = None,
                 head_dim: int | None = None, ffn_dim: int | None = None, norm_eps: float = 1e-5,
                 rope_theta: float = 10000.0, rope_scaling: dict | None = None, bias: bool = False,
                 tie_word_embeddings: bool = False, **kwargs):
        """``num_kv_heads`` defaults to ``num_heads`` (MHA), ``head_dim`` to embed_dim / num_heads, ``ffn_dim``
        to :func:`llama_ffn_dim`; ``rope_scaling`` is ``{"rope_type": "linear" | "llama3", "factor": ...}``;
        ``bias`` adds biases to every projection; ``kwargs`` are the training arguments of ``CausalLM``."""
        super().__init__(vocab_size, embed_dim, num_heads, num_layers, max_position_embeddings, dropout,
                         tie_word_embeddings, **kwargs)

    @property
    def ffn_dim(self) -> int:
        return self.hparams.ffn_dim or llama_ffn_dim(self.hparams.embed_dim)

    @property
    def head_dim(self) -> int:
        return self.hparams.head_dim or self.hparams.embed_dim // self.hparams.num_heads

    def make_rope(self) -> RotaryEmbedding:
        hp = self.hparams
        return RotaryEmbedding(self.head_dim, hp.rope_theta, hp.rope_scaling)

    def make_attention(self, layer: int, **options) -> CausalSelfAttention:
        """Grouped-query attention; ``options``: more :class:`~llmzoo.layers.CausalSelfAttention` arguments
        (a subclass's diff: Mistral's ``sliding_window``, Qwen2's ``qkv_bias``, Qwen3's ``q_norm``/``k_norm``)."""
        hp = self.hparams
        return CausalSelfAttention(hp.embed_dim, hp.num_heads, hp.num_kv_heads, hp.head_dim, bias=hp.bias,
                                   dropout=hp.dropout, **options)

    def make_mlp(self, layer: int) -> nn.Module:
        return SwiGLU(self.hparams.embed_dim, self.ffn_dim, bias=self.hparams.bias)

    def make_norm(self) -> nn.Module:
        return RMSNorm(self.hparams.embed_dim, self.hparams.norm_eps)
