"""How many bytes of UTF-8 text each token id stands for: what bits per byte divides by.

Bits per byte = total nats of the targets / ln 2 / the UTF-8 bytes of the text they spell. Validation batches
are windows of token ids cut from a cached token file, so the text is not at hand there (and a window may
cut a character in two); instead each token id gets its byte length once, and the bytes of a batch are the sum
of its targets' lengths, one gather per batch. For a byte-level BPE (llmzoo's ``bpe``, GPT-2, Llama 3, Qwen)
and for llmzoo's ``char`` tokenizer this sum is exactly the bytes of the text: each token is a byte string and
the text is their concatenation. Special tokens (``<|eos|>`` between documents, padding) count 0 bytes: they
spell no text, but their nats still count (predicting where a document ends is part of modelling the text).
"""

from __future__ import annotations

import json
import re

import torch

from llmzoo.data.tokenizer import Tokenizer

BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's tokens for single raw bytes
METASPACE = "\u2581"  # SentencePiece's "▁", a space


def is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's decoder is byte-level (each character of a token string is one byte)."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d.get("type") == "ByteLevel" for d in decoders)


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes of every token id, ``[vocab_size]`` int64: 0 for special tokens; for a byte-level tokenizer
    the characters of the token string (one per byte); otherwise the token's text encoded (SentencePiece's
    ``▁`` a space, its ``<0xNN>`` one byte). Exact for byte-level and character tokenizers; for a tokenizer with
    a normalizer (lower-casing, a prefix space) they are the bytes of the normalized text."""
    hf = tokenizer.tokenizer
    added = hf.get_added_tokens_decoder()
    byte_level = is_byte_level(tokenizer)
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    for token, index in hf.get_vocab(with_added_tokens=True).items():
        if index in added:
            lengths[index] = 0 if added[index].special else len(added[index].content.encode("utf-8"))
        elif byte_level:
            lengths[index] = len(token)
        elif BYTE_FALLBACK.fullmatch(token):
            lengths[index] = 1
        else:
            lengths[index] = len(token.replace(METASPACE, " ").encode("utf-8"))
    return lengths
