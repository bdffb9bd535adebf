"""Mistral (``mistral``): Llama's adapter plus ``sliding_window``; no projection biases."""

from __future__ import annotations

from llmzoo.hf.llama import LlamaAdapter
from llmzoo.models import CausalLM, Mistral


class MistralAdapter(LlamaAdapter):
    model_type, hf_class, model_class = "mistral", "MistralForCausalLM", Mistral
    defaults = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, attention_dropout=0.0,
                    tie_word_embeddings=False, rope_theta=10000.0, sliding_window=4096)
    nullable = LlamaAdapter.nullable | {"sliding_window"}  # null: full attention

    def biases(self, config: dict) -> dict:
        return dict(bias=False)

    def bias_config(self, model: CausalLM) -> dict:
        self.refuse_bias(model, "has no projection biases (Llama has: attention_bias, mlp_bias)")
        return {}

    def kwargs(self, config: dict) -> dict:
        return dict(super().kwargs(config), sliding_window=config["sliding_window"])

    def config(self, model: CausalLM) -> dict:
        return dict(super().config(model), sliding_window=model.hparams.sliding_window)
