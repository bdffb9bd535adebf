"""The architectures: each a LightningModule built from the shared layers."""

from llmzoo.models.base import CausalLM
from llmzoo.models.gpt import GPT
from llmzoo.models.gpt2 import GPT2
from llmzoo.models.llama import Llama
from llmzoo.models.mistral import Mistral
from llmzoo.models.mixtral import Mixtral
from llmzoo.models.qwen2 import Qwen2
from llmzoo.models.qwen3 import Qwen3
from llmzoo.models.transformer import Transformer

ARCHITECTURES = {cls.__name__: cls for cls in (GPT, GPT2, Llama, Mistral, Mixtral, Qwen2, Qwen3, Transformer)}

__all__ = ["ARCHITECTURES", "CausalLM", "GPT", "GPT2", "Llama", "Mistral", "Mixtral", "Qwen2", "Qwen3", "Transformer"]
