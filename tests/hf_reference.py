"""Hugging Face reference models built from tiny configs with random weights (nothing is downloaded),
shared by the parity and interop tests; each case names the llmzoo class it maps to.
Import only after ``pytest.importorskip("transformers")``."""

import torch
import transformers

from llmzoo import GPT, GPT2, Llama, Mistral, Mixtral, Qwen2, Qwen3

VOCAB = 101
GPT_SIZES = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
LLAMA_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

CASES = {
    "gpt": (transformers.OpenAIGPTConfig, GPT_SIZES, GPT),
    "gpt-untied": (transformers.OpenAIGPTConfig, dict(GPT_SIZES, tie_word_embeddings=False), GPT),
    "gpt2": (transformers.GPT2Config, GPT_SIZES, GPT2),
    "gpt2-untied": (transformers.GPT2Config, dict(GPT_SIZES, tie_word_embeddings=False), GPT2),
    "llama-gqa": (transformers.LlamaConfig, LLAMA_SIZES, Llama),
    "llama-mqa-tied": (transformers.LlamaConfig, dict(LLAMA_SIZES, num_key_value_heads=1, tie_word_embeddings=True), Llama),
    "llama-mha-bias-headdim": (transformers.LlamaConfig, dict(LLAMA_SIZES, num_key_value_heads=4, head_dim=16,
                                                             attention_bias=True, mlp_bias=True), Llama),
    "llama3-rope-scaling": (transformers.LlamaConfig, dict(LLAMA_SIZES, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), Llama),
    "llama-linear-rope": (transformers.LlamaConfig, dict(LLAMA_SIZES, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0)), Llama),
    "mistral-window": (transformers.MistralConfig, dict(LLAMA_SIZES, sliding_window=5), Mistral),
    "mixtral-top2-of-4": (transformers.MixtralConfig, dict(LLAMA_SIZES, num_local_experts=4, num_experts_per_tok=2), Mixtral),
    "mixtral-window": (transformers.MixtralConfig, dict(LLAMA_SIZES, num_local_experts=4, num_experts_per_tok=2,
                                                        sliding_window=6), Mixtral),
    "qwen2": (transformers.Qwen2Config, dict(LLAMA_SIZES, tie_word_embeddings=True,
                                             rope_parameters=dict(rope_type="default", rope_theta=1e6)), Qwen2),
    "qwen2-untied": (transformers.Qwen2Config, LLAMA_SIZES, Qwen2),
    "qwen3": (transformers.Qwen3Config, dict(LLAMA_SIZES, head_dim=16, rope_parameters=dict(
        rope_type="default", rope_theta=1e6)), Qwen3),
    "qwen3-tied-mqa": (transformers.Qwen3Config, dict(LLAMA_SIZES, num_key_value_heads=1, head_dim=8,
                                                      tie_word_embeddings=True), Qwen3),
}


def randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere, norms included (HF initialises norms to exactly 1 and biases to 0)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)


def hf_model(case: str, dtype: torch.dtype = torch.float32):
    """A random ``*ForCausalLM`` of ``case`` in eval mode, with eager attention (SDPA differs by ~1e-5)."""
    config_cls, sizes, _ = CASES[case]
    config = config_cls(**sizes, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    randomize(model)
    return model
