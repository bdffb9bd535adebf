"""Qwen2 / Qwen2.5 (``qwen2``): Llama's adapter with biases on q, k and v only and every layer attending to the
whole context (configs whose layers slide are refused)."""

from __future__ import annotations

from llmzoo.hf.llama import LlamaAdapter
from llmzoo.models import CausalLM, Qwen2
from llmzoo.models.build import listing


class Qwen2Adapter(LlamaAdapter):
    model_type, hf_class, model_class = "qwen2", "Qwen2ForCausalLM", Qwen2
    defaults = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
                    max_position_embeddings=32768, rms_norm_eps=1e-6, attention_dropout=0.0, tie_word_embeddings=False,
                    rope_theta=10000.0, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                    layer_types=None)
    nullable = LlamaAdapter.nullable | {"sliding_window"}  # null: no window

    def refuse_sliding_layers(self, config: dict) -> None:
        """Refuse layers other than full attention: ``layer_types``, else (as transformers derives them) the
        layers from ``max_window_layers`` on when ``use_sliding_window``."""
        window = config["sliding_window"] if config["use_sliding_window"] else None
        types = config["layer_types"] or ["sliding_attention" if window is not None and i >= config["max_window_layers"]
                                          else "full_attention" for i in range(config["num_hidden_layers"])]
        other = {i: kind for i, kind in enumerate(types) if kind != "full_attention"}
        if other:
            raise ValueError(f"{self.model_type} with {'/'.join(sorted(set(other.values())))} layers {listing(list(other))} "
                             f"(use_sliding_window / layer_types) is not supported: llmzoo's "
                             f"{self.model_class.__name__} attends to the whole context in every layer")

    def biases(self, config: dict) -> dict:
        return dict(bias=False, qkv_bias=True)

    def kwargs(self, config: dict) -> dict:
        self.refuse_sliding_layers(config)
        return super().kwargs(config)

    def bias_config(self, model: CausalLM) -> dict:
        self.refuse_bias(model, "has biases on q, k and v only (qkv_bias)")
        if not model.hparams.qkv_bias:
            raise ValueError(f"{type(model).__name__} with qkv_bias=False cannot be exported: transformers' "
                             f"{self.model_type} always has q, k and v biases")
        return {}

    def config(self, model: CausalLM) -> dict:
        layers = model.hparams.num_layers
        return dict(super().config(model), use_sliding_window=False, sliding_window=None, max_window_layers=layers,
                    layer_types=["full_attention"] * layers)
