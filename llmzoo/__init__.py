"""llmzoo: a PyTorch Lightning zoo of decoder-only language models."""

from llmzoo.models import ARCHITECTURES, GPT, GPT2, CausalLM, Llama, Mistral, Mixtral, Qwen2, Qwen3, Transformer

__version__ = "0.1.0"

__all__ = ["ARCHITECTURES", "CausalLM", "GPT", "GPT2", "Llama", "Mistral", "Mixtral", "Qwen2", "Qwen3", "Transformer"]
