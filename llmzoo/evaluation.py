"""Perplexity and bits per byte of any text, with a sliding window (``llmzoo evaluate --files``).

Each file is one document: its tokens follow the document-start token (:func:`document_start_token`) and every
token is predicted once. The model sees ``window`` tokens at a time (default: its whole context); the first
window scores all of its tokens, each later one moves ``stride`` tokens on and scores only those ``stride`` new
tokens, so every token after the first window is predicted from at least ``window - stride`` tokens before it.
``stride = window`` is disjoint windows (the cheapest; lm-eval's rolling log-likelihood); the default
``window // 2`` costs about two forward passes per token and gives every token at least half a context.

Bits per byte = total nats / ln 2 / the UTF-8 bytes of the text: unlike per-token loss and perplexity it does
not depend on the tokenizer, so models with different tokenizers compare on it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from llmzoo.data.tokenizer import SPECIAL_ROLES, SPECIAL_TOKENS, Tokenizer
from llmzoo.layers.loss import IGNORE_INDEX


def document_start_token(tokenizer: Tokenizer) -> int:
    """The token a document follows: ``eos`` for llmzoo's own tokenizers (training packs documents after
    ``<|eos|>``; ``<|bos|>`` is never seen), else the tokenizer's ``bos`` if it has one (Llama's ``<s>``), else
    ``eos`` (GPT-2's ``<|endoftext|>``) — what lm-eval's Hugging Face model uses."""
    if tokenizer.special_tokens == dict(zip(SPECIAL_ROLES, SPECIAL_TOKENS)) or tokenizer.bos_token_id is None:
        return tokenizer.eos_token_id
    return tokenizer.bos_token_id


def bits_per_byte(nats: float, num_bytes: int) -> float:
    """``nats / ln 2 / num_bytes``."""
    return nats / math.log(2) / num_bytes


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(start, done)`` of each window over ``num_tokens`` token ids: it reads ids ``start .. start + window``
    (fewer at the end of a short text) and scores the targets (ids predicted from the ones before) after id
    ``done``; together the windows score ids ``1 .. num_tokens - 1`` once each."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride} must be between 1 and the window ({window}) tokens")
    windows, done = [], 0
    while done < num_tokens - 1:
        end = min(done + (window if not windows else stride), num_tokens - 1)  # the last id scored
        windows.append((max(0, end - window), done))
        done = end
    return windows


@torch.no_grad()
def text_nll(model, ids: list[int], window: int | None = None, stride: int | None = None,
             batch_size: int = 8) -> tuple[float, int]:
    """Summed nats and number of the tokens ``ids[1:]``, each predicted from what precedes it in a sliding
    window (see the module's docstring), ``batch_size`` windows per forward pass."""
    window = window or model.hparams.max_position_embeddings
    stride = stride or max(1, window // 2)
    rows, labels = [], []
    for start, done in sliding_windows(len(ids), window, stride):
        row = torch.tensor(ids[start:start + window + 1])
        rows.append(row)
        labels.append(row.clone().index_fill_(0, torch.arange(min(done - start + 1, len(row))), IGNORE_INDEX))
    nats, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {"input_ids": torch.stack(rows[i:i + batch_size]).to(model.device),
                 "labels": torch.stack(labels[i:i + batch_size]).to(model.device)}
        nll, scored, _ = model.token_nll(batch, reduction="sum")
        nats, count = nats + float(nll), count + int(scored)
    return nats, count


def evaluate_files(model, tokenizer: Tokenizer, paths: list[str | Path], window: int | None = None,
                   stride: int | None = None, batch_size: int = 8) -> dict:
    """Per file and in total: ``tokens``, ``bytes`` (UTF-8), ``nll`` (nats per token), ``ppl`` and ``bpb``."""
    model.eval()
    window = window or model.hparams.max_position_embeddings
    stride = stride or max(1, window // 2)
    start = document_start_token(tokenizer)
    files, nats, tokens, num_bytes = {}, 0.0, 0, 0
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        if not text:
            raise ValueError(f"{path} is empty: give files with text")
        file_nats, file_tokens = text_nll(model, [start, *tokenizer.encode(text)], window, stride, batch_size)
        files[str(path)] = scores(file_nats, file_tokens, len(text.encode("utf-8")))
        nats, tokens, num_bytes = nats + file_nats, tokens + file_tokens, num_bytes + files[str(path)]["bytes"]
    return {"files": files, "total": scores(nats, tokens, num_bytes), "window": window, "stride": stride}


def scores(nats: float, tokens: int, num_bytes: int) -> dict:
    return {"tokens": tokens, "bytes": num_bytes, "nll": nats / tokens, "ppl": math.exp(nats / tokens),
            "bpb": bits_per_byte(nats, num_bytes)}
