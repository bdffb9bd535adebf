"""Mixtral 8x7B (Jiang et al. 2024, "Mixtral of Experts")."""

from __future__ import annotations

from torch import nn

from llmzoo.layers import MoE
from llmzoo.models.mistral import Mistral


class Mixtral(Mistral):
    """Mistral whose feed-forward is a sparse mixture of SwiGLU experts: a router sends each token to
    ``experts_per_token`` of ``num_experts`` experts. Training adds ``aux_loss_coef`` (an argument of
    ``CausalLM``) times the load-balancing loss (mean over layers). Hugging Face twin: ``MixtralForCausalLM``."""

    def __init__(self, num_experts: int = 8, experts_per_token: int = 2, sliding_window: int | None = None,
                 rope_theta: float = 1e6, **kwargs):
        """``kwargs``: as Mistral / Llama."""
        super().__init__(sliding_window=sliding_window, rope_theta=rope_theta, **kwargs)

    def make_mlp(self, layer: int) -> nn.Module:
        hp = self.hparams
        return MoE(hp.embed_dim, self.ffn_dim, hp.num_experts, hp.experts_per_token)
