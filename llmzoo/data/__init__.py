"""Data: tokenizers, the text datamodules and the sources they read."""

from llmzoo.data.datamodules import LanguageDataModule, StreamingTextDataModule, TextDataModule
from llmzoo.data.datasets import PackedStream, Progress, TokenWindows
from llmzoo.data.sources import default_corpus, resolve_files
from llmzoo.data.tokenizer import Tokenizer, load_tokenizer_for_checkpoint

__all__ = ["LanguageDataModule", "PackedStream", "Progress", "StreamingTextDataModule", "TextDataModule",
           "TokenWindows", "Tokenizer", "default_corpus", "load_tokenizer_for_checkpoint", "resolve_files"]
