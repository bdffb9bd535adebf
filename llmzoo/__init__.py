"""llmzoo: a PyTorch Lightning zoo of decoder-only language models.

The model classes are imported from :mod:`llmzoo.models` when first used (``from llmzoo import Llama``), so that
``import llmzoo.cli`` and the modules that need no models do not import torch and Lightning for them."""

__version__ = "0.1.0"

__all__ = ["ARCHITECTURES", "CausalLM", "GPT", "GPT2", "Llama", "Mistral", "Mixtral", "Qwen2", "Qwen3", "Transformer"]


def __getattr__(name: str):
    if name in __all__:
        import llmzoo.models

        return getattr(llmzoo.models, name)
    raise AttributeError(f"module 'llmzoo' has no attribute {name!r}")
