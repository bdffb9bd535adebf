"""GPT-1 (Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training")."""

from __future__ import annotations

from torch import nn

from llmzoo.layers import LearnedPositions
from llmzoo.models.transformer import Transformer


class GPT(Transformer):
    """The Transformer decoder with learned positions, GELU (tanh approximation) and unscaled
    embeddings; still post-norm, with no final norm. Hugging Face twin: ``OpenAIGPTLMHeadModel``."""

    embed_scale = 1.0
    activation = "gelu_tanh"

    def make_positions(self) -> nn.Module:
        return LearnedPositions(self.hparams.max_position_embeddings, self.hparams.embed_dim)
