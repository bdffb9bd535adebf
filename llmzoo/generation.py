"""Autoregressive decoding for every model of the zoo (anything with ``forward(input_ids, attention_mask)``
and ``setup_kv_cache`` / ``clear_kv_cache``)."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_logits(logits: Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Next token ``[B]`` from ``logits [B, V]``: argmax, or a sample after temperature, top-k and top-p."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, input_ids: Tensor, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             attention_mask: Tensor | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> Tensor:
    """Continue ``input_ids [B, T]`` by up to ``max_new_tokens``; returns ``[B, T + new]``.

    With ``use_cache`` the prompt fills a preallocated KV cache once and each step feeds one token;
    without it every step re-reads the whole sequence (slow; a reference for tests). A row that emits
    ``eos_token_id`` keeps emitting it; decoding stops early when every row has.
    """
    was_training = model.training
    model.eval()
    tokens = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    if use_cache:
        model.setup_kv_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
    try:
        logits = model(input_ids, attention_mask)[:, -1]
        for step in range(max_new_tokens):
            next_token = sample_logits(logits, do_sample, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, eos_token_id)
                finished |= next_token == eos_token_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
            if step == max_new_tokens - 1 or (eos_token_id is not None and finished.all()):
                break
            step_input = next_token[:, None] if use_cache else tokens
            logits = model(step_input, attention_mask)[:, -1]
    finally:
        if use_cache:
            model.clear_kv_cache()
        model.train(was_training)
    return tokens
