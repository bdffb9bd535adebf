"""The decoder block: attention and feed-forward, each in a residual branch."""

from __future__ import annotations

from torch import Tensor, nn

from llmzoo.layers.attention import CausalSelfAttention


class Block(nn.Module):
    """One decoder layer, pre-norm (GPT-2, Llama) or post-norm (Transformer, GPT-1)::

        pre-norm:   x = x + attention(attention_norm(x));   x = x + mlp(mlp_norm(x))
        post-norm:  x = attention_norm(x + attention(x));   x = mlp_norm(x + mlp(x))

    ``mlp`` may be a mixture of experts returning ``(output, aux_loss)``; ``forward`` returns
    ``(x [B, T, D], aux_loss or None)``.
    """

    def __init__(self, attention: CausalSelfAttention, mlp: nn.Module, attention_norm: nn.Module,
                 mlp_norm: nn.Module, prenorm: bool = True, dropout: float = 0.0):
        super().__init__()
        self.attention, self.mlp = attention, mlp
        self.attention_norm, self.mlp_norm = attention_norm, mlp_norm
        self.prenorm = prenorm
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, attention_mask: Tensor | None = None,
                **static) -> tuple[Tensor, Tensor | None]:
        """``static``: ``input_pos`` and ``attn_mask`` of the static-shape path, passed to the attention."""
        if self.prenorm:
            x = x + self.dropout(self.attention(self.attention_norm(x), rope, attention_mask, **static))
            out, aux_loss = self._mlp(self.mlp_norm(x))
            return x + self.dropout(out), aux_loss
        x = self.attention_norm(x + self.dropout(self.attention(x, rope, attention_mask, **static)))
        out, aux_loss = self._mlp(x)
        return self.mlp_norm(x + self.dropout(out)), aux_loss

    def _mlp(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.mlp(x)
        return out if isinstance(out, tuple) else (out, None)
