"""Qwen3 (``qwen3``): Qwen2's adapter (as transformers derives Qwen3 from Qwen2) without the q, k, v biases and with
per-head RMSNorm of queries and keys (``self_attn.q_norm`` / ``k_norm`` = ``attention.q_norm`` / ``k_norm``)."""

from __future__ import annotations

from torch import nn

from llmzoo.hf.qwen2 import Qwen2Adapter
from llmzoo.hf.rules import Rule
from llmzoo.models import CausalLM, Qwen3


class Qwen3Adapter(Qwen2Adapter):
    model_type, hf_class, model_class = "qwen3", "Qwen3ForCausalLM", Qwen3
    defaults = dict(Qwen2Adapter.defaults, head_dim=128, attention_bias=False)

    def biases(self, config: dict) -> dict:
        if config["attention_bias"]:
            raise ValueError("qwen3 with attention_bias=True is not supported: llmzoo's Qwen3 has no biases")
        return dict(bias=False)

    def bias_config(self, model: CausalLM) -> dict:
        self.refuse_bias(model, "has no MLP biases (attention_bias covers the attention projections only)")
        return dict(attention_bias=False)

    def attention_rules(self, attention: nn.Module, ours: str, theirs: str) -> list[Rule]:
        return [*super().attention_rules(attention, ours, theirs),
                Rule(ours + "q_norm.weight", (theirs + "q_norm.weight",)),
                Rule(ours + "k_norm.weight", (theirs + "k_norm.weight",))]
