"""Data: tokenizers, the text datamodules, the sources they read, and instruction data for fine-tuning."""

from llmzoo.data.datamodules import LanguageDataModule, StreamingTextDataModule, TextDataModule
from llmzoo.data.chat import TEMPLATES, ChatTemplate, read_records
from llmzoo.data.datasets import PackedStream, Progress, TokenWindows
from llmzoo.data.sources import default_corpus, resolve_files
from llmzoo.data.preference import PreferenceDataModule
from llmzoo.data.sft import SFTDataModule
from llmzoo.data.tokenizer import Tokenizer, load_tokenizer_for_checkpoint

__all__ = ["ChatTemplate", "LanguageDataModule", "PackedStream", "PreferenceDataModule", "Progress",
           "SFTDataModule", "StreamingTextDataModule",
           "TEMPLATES", "TextDataModule", "TokenWindows", "Tokenizer", "default_corpus", "load_tokenizer_for_checkpoint",
           "read_records", "resolve_files"]
