"""Tokenizer export: ``tokenizer.json`` with the files that make ``AutoTokenizer`` load it as it is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmzoo.hf.weights import write_json

SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
_CONVENTIONAL = {  # added special tokens recognised by name when no role is given
    "bos_token": ("<|bos|>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>"),
    "eos_token": ("<|eos|>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"),
    "pad_token": ("<|pad|>", "<pad>", "[PAD]"),
    "unk_token": ("<|unk|>", "<unk>", "[UNK]"),
}


def as_tokenizers(tokenizer: Any):
    """``(tokenizers.Tokenizer, roles)`` from a ``tokenizers.Tokenizer``, a path to a ``tokenizer.json`` (or
    a directory holding one) or an object with a ``.tokenizer`` attribute (llmzoo's ``Tokenizer``), whose
    ``bos_token`` / ``eos_token`` / ... attributes give the roles."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found: pass a tokenizer.json or its directory")
        return Tokenizer.from_file(str(path)), {}
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, {}
    inner = getattr(tokenizer, "tokenizer", None)
    if isinstance(inner, Tokenizer):
        roles = {role: getattr(tokenizer, role) for role in SPECIAL_ROLES if isinstance(getattr(tokenizer, role, None), str)}
        return inner, roles
    raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, a path to a tokenizer.json or an object with a "
                    f".tokenizer attribute holding one, got {type(tokenizer).__name__}")


def special_tokens(tokenizer, roles: dict[str, str | None]) -> dict[str, str]:
    """The special tokens of ``tokenizer`` by role: ``roles`` first, then the tokenizer's added special
    tokens with conventional names (``<|eos|>``, ``</s>``, ``<|endoftext|>`` ...). Each must be in the vocabulary."""
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    found = {}
    for role in SPECIAL_ROLES:
        token = roles.get(role) or next((t for t in _CONVENTIONAL[role] if t in added), None)
        if token is None:
            continue
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{role} {token!r} is not in the tokenizer's vocabulary: add it or pass another {role}")
        found[role] = token
    return found


def save_tokenizer(tokenizer, tokens: dict[str, str], directory: Path, model_max_length: int) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` (class ``PreTrainedTokenizerFast``, so that AutoTokenizer
    never picks a slow class for the model type) and ``special_tokens_map.json``."""
    tokenizer.save(str(directory / "tokenizer.json"))
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False, **tokens})
    write_json(directory / "special_tokens_map.json", tokens)
