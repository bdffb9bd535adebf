"""Mistral 7B (Jiang et al. 2023)."""

from __future__ import annotations

from llmzoo.layers import CausalSelfAttention
from llmzoo.models.llama import Llama


class Mistral(Llama):
    """Llama with sliding-window attention: each token attends to the last ``sliding_window`` tokens
    (itself included), and the KV cache becomes a rolling buffer of that many slots.
    Hugging Face twin: ``MistralForCausalLM``."""

    def __init__(self, sliding_window: int | None = 4096, **kwargs):
        """``sliding_window``: keys visible to each query (None: full causal attention); ``kwargs``: as Llama."""
        super().__init__(**kwargs)

    def make_attention(self, layer: int, **options) -> CausalSelfAttention:
        return super().make_attention(layer, sliding_window=self.hparams.sliding_window, **options)
