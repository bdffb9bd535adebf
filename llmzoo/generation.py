"""Autoregressive decoding for every model of the zoo: greedy, sampling (temperature, top-k, top-p, min-p,
repetition penalty), beam search and speculative decoding with a draft model; batches of prompts of
different lengths (left padding), per-row stopping on end-of-sequence tokens and stop strings, a seed,
and streaming.

Entry points: :func:`generate` returns the token ids, :func:`stream` yields new tokens as they are
decided, :class:`GenerationConfig` holds (and validates) how to decode, :func:`left_pad` batches prompts
of different lengths, :class:`TextStream` turns a stream of token ids into printable text, :class:`HeldBack`
keeps a stop string out of it. The logits processors are small functions of ``logits [..., V]`` that compose
(:func:`process_logits` applies them in Hugging Face's order).

The model is any :class:`~llmzoo.models.base.CausalLM` (``backbone``, ``lm_head``, the KV-cache methods).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor

Decode = Callable[[list[int]], str]
NEG_INF = -1.0e9  # Hugging Face's beam-search score for excluded candidates (added, not assigned)


@dataclass
class GenerationConfig:
    """How to decode; every field is checked when the config is made (a one-line ``ValueError``).

    Args:
        max_new_tokens: tokens to add at most. The (padded) prompt plus ``max_new_tokens`` must fit in the
            model's context (``max_position_embeddings``); nothing is truncated silently.
        do_sample: sample from the processed distribution instead of taking the most likely token.
        temperature: divides the logits before sampling (> 0; ignored by greedy and beam search).
        top_k: sample among the ``top_k`` most likely tokens only.
        top_p: sample from the smallest set of most likely tokens whose probability reaches ``top_p`` (0, 1].
        min_p: drop tokens less likely than ``min_p`` times the most likely one [0, 1].
        repetition_penalty: > 1 makes tokens already in the row (prompt included, padding not) less likely
            (CTRL's rule: negative logits multiplied, positive ones divided). Applies to every strategy.
        num_beams: beam search with this many beams (1: greedy or sampling).
        length_penalty: beam scores are ``sum log p / generated_length ** length_penalty``.
        early_stopping: beam search stops when ``num_beams`` hypotheses are finished (True), when the best
            one cannot improve by a heuristic (False), or only at ``max_new_tokens`` ("never"); Hugging Face's rules.
        eos_token_id: token(s) that end a row.
        pad_token_id: fills a row after it ends; defaults to the first ``eos_token_id``.
        stop_strings: a row ends once its generated text contains one of them (needs a ``decode`` function);
            the token that completes the stop string is kept.
        seed: seeds a generator private to this call (reproducible sampling, global RNG untouched).
        num_draft_tokens: tokens the draft model proposes per step of speculative decoding.
        use_cache: decode with a KV cache (without it, every step re-reads the whole sequence: a slow reference).
        compile: run each decode step (greedy, sampling, beam search) as one static-shape step compiled with
            ``torch.compile``, once per model and shape (batch, total length): True for inductor (CUDA graphs,
            ``reduce-overhead``, on a GPU), or a ``torch.compile`` backend name. Same tokens as without; where
            compiling fails, decoding goes on without it after one warning.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: list[str] | None = None
    seed: int | None = None
    num_draft_tokens: int = 4
    use_cache: bool = True
    compile: bool | str = False

    def __post_init__(self):
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
              f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}: ask for at least 1 token")
        check(not self.do_sample or self.temperature > 0,
              f"temperature must be > 0 when sampling, got {self.temperature}: use do_sample=False for greedy decoding")
        check(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1),
              f"top_k must be an integer >= 1, got {self.top_k!r}: leave it unset (None) to keep every token")
        check(self.top_p is None or 0 < self.top_p <= 1,
              f"top_p must be in (0, 1], got {self.top_p}: 1 (or None) keeps every token")
        check(self.min_p is None or 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty}: 1 means no penalty")
        check(isinstance(self.num_beams, int) and self.num_beams >= 1,
              f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        check(self.num_beams == 1 or not self.do_sample,
              "beam search with do_sample=True (beam sampling) is not supported: use num_beams=1 or do_sample=False")
        check(self.early_stopping in (True, False, "never"),
              f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        check(isinstance(self.num_draft_tokens, int) and self.num_draft_tokens >= 1,
              f"num_draft_tokens must be an integer >= 1, got {self.num_draft_tokens!r}")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        check(self.eos_token_id is None or len(self.eos_token_id) > 0,
              "eos_token_id is an empty list: pass None for no end-of-sequence token")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        check(not self.stop_strings or all(isinstance(s, str) and s for s in self.stop_strings),
              f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        check(not self.stop_strings or self.fill_token_id is not None,
              "stop_strings need pad_token_id or eos_token_id, to fill the rows that stopped")
        check(not self.compile or self.use_cache,
              "compile needs the KV cache (its static-shape step writes into it): drop use_cache=False")

    @property
    def fill_token_id(self) -> int | None:
        """The token written after a row has finished: ``pad_token_id``, else the first ``eos_token_id``."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else None


# --------------------------------------------------------------------------------------------- logits processors
def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature``: below 1 sharpens the distribution, above 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Keep the ``top_k`` largest logits of each row (ties with the k-th included), -inf elsewhere."""
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches ``top_p``
    (the most likely token always stays), -inf elsewhere."""
    ascending, order = logits.sort(dim=-1)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` times that of the most likely token."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def apply_repetition_penalty(logits: Tensor, previous: Tensor, penalty: float) -> Tensor:
    """Make the tokens of ``previous [N, S]`` less likely in ``logits [N, V]`` (penalty > 1): a negative
    logit is multiplied by ``penalty``, a positive one divided by it (Keskar et al. 2019, CTRL)."""
    seen = logits.gather(-1, previous)
    return logits.scatter(-1, previous, torch.where(seen < 0, seen * penalty, seen / penalty))


def process_logits(logits: Tensor, config: GenerationConfig, previous: Tensor | None = None) -> Tensor:
    """Apply the configured processors to ``logits [N, V]``, in Hugging Face's order: repetition penalty
    (needs ``previous [N, S]``), then, when sampling, temperature, top-k, top-p and min-p."""
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, previous, config.repetition_penalty)
    if config.do_sample:
        if config.temperature != 1.0:
            logits = apply_temperature(logits, config.temperature)
        if config.top_k is not None:
            logits = top_k_filter(logits, config.top_k)
        if config.top_p is not None and config.top_p < 1.0:
            logits = top_p_filter(logits, config.top_p)
        if config.min_p:
            logits = min_p_filter(logits, config.min_p)
    return logits


def sample(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of ``weights [..., V]`` (probabilities, not necessarily normalised), drawn with
    probability proportional to its weight: the argmax of ``weights / Exponential(1)`` (no host sync)."""
    noise = torch.empty_like(weights).exponential_(generator=generator).clamp_(min=torch.finfo(weights.dtype).tiny)
    return (weights / noise).argmax(dim=-1)


def next_token(logits: Tensor, config: GenerationConfig, previous: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """Next token ``[N]`` from ``logits [N, V]``: the most likely one, or a sample of the processed distribution."""
    logits = process_logits(logits, config, previous)
    return sample(logits.softmax(dim=-1), generator) if config.do_sample else logits.argmax(dim=-1)


# --------------------------------------------------------------------------------------------- entry points
def generate(model, input_ids: Tensor, config: GenerationConfig | None = None, *, attention_mask: Tensor | None = None,
             draft_model=None, decode: Decode | None = None, generator: torch.Generator | None = None,
             streamer: Callable[[Tensor], object] | None = None, **options) -> Tensor:
    """Continue ``input_ids [B, T]``; returns ``[B, T + new]`` token ids (``new <= max_new_tokens``: decoding
    ends when every row has finished). Rows that finished early are filled with ``pad_token_id``.

    ``config`` and ``options`` (its fields as keywords, overriding it) say how to decode; see
    :class:`GenerationConfig`. ``attention_mask [B, T]`` (1 = token, 0 = padding) marks left padding of
    prompts of different lengths. ``draft_model``: a smaller model of the zoo with the same vocabulary
    for speculative decoding. ``decode``: token ids -> text, needed by ``stop_strings``. ``generator``:
    the random source for sampling (or set ``seed``). ``streamer`` is called with every chunk of new
    tokens ``[B, n]`` as soon as it is decided (see :func:`stream`).
    """
    chunks = [input_ids]
    for chunk in stream(model, input_ids, config, attention_mask=attention_mask, draft_model=draft_model,
                        decode=decode, generator=generator, **options):
        if streamer is not None:
            streamer(chunk)
        chunks.append(chunk)
    return torch.cat(chunks, dim=1)


def stream(model, input_ids: Tensor, config: GenerationConfig | None = None, *, attention_mask: Tensor | None = None,
           draft_model=None, decode: Decode | None = None, generator: torch.Generator | None = None,
           **options) -> Iterator[Tensor]:
    """Like :func:`generate`, but yields the new tokens ``[B, n]`` as they are decided: one token per step
    (``n = 1``), the accepted run of tokens per step of speculative decoding (``n >= 1``), and the whole
    result at the end for beam search (whose beams are not final before). Arguments are checked now, the
    decoding runs as the iterator is consumed; the model is in eval mode meanwhile."""
    config = replace(config or GenerationConfig(), **options) if options else (config or GenerationConfig())
    _check_inputs(model, input_ids, attention_mask, config, draft_model, decode)
    if config.seed is not None:
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
        generator = torch.Generator(input_ids.device).manual_seed(config.seed)
    return _decode(model, input_ids, attention_mask, config, draft_model, decode, generator)


def left_pad(rows: list[list[int]], pad_token_id: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Token id lists of different lengths as one left-padded batch: ``(input_ids [B, T], attention_mask [B, T])``
    (1 = token, 0 = padding), ready for :func:`generate`."""
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def room_after_prompts(lengths: list[int], context: int) -> int:
    """How many new tokens fit in ``context`` after the longest of the prompts of ``lengths`` tokens.

    A prompt that leaves no room for one new token is refused with one line (nothing is cut silently)."""
    for number, length in enumerate(lengths, 1):
        if length >= context:
            which = "the prompt" if len(lengths) == 1 else f"prompt {number}"
            raise ValueError(f"{which} has {length} tokens, but the model's context of {context} tokens must hold "
                             f"it and at least one new token: shorten the prompt to at most {context - 1} tokens")
    return context - max(lengths)


class TextStream:
    """The text of one row as its tokens arrive: :meth:`push` returns what was added since the last call,
    holding back a trailing incomplete character (U+FFFD from a split UTF-8 sequence) until the next
    token completes it; :meth:`flush` returns the rest. Tokens in ``skip`` (padding) are left out."""

    def __init__(self, decode: Decode, skip: Iterable[int] = ()):
        self.decode, self.skip = decode, set(skip)
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, ids: Iterable[int]) -> str:
        self.ids += [i for i in ids if i not in self.skip]
        return self._take(self.decode(self.ids).rstrip("\ufffd"))

    def flush(self) -> str:
        return self._take(self.decode(self.ids))

    def _take(self, text: str) -> str:
        piece = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        return piece


class HeldBack:
    """Streamed text without the end-of-turn marker or stop string ``stop`` (one, or a list): what could be the
    beginning of one is held back until the next piece tells, and the first found and what follows are dropped."""

    def __init__(self, stop: str | list[str] | None):
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        self.pending, self.done = "", False

    def push(self, text: str) -> str:
        if self.done or not self.stops:
            return "" if self.done else text
        self.pending += text
        found = [self.pending.index(s) for s in self.stops if s in self.pending]
        if found:
            self.done = True
            return self.pending[:min(found)]
        keep = max(next((n for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                         if s.startswith(self.pending[-n:])), 0) for s in self.stops)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.done else self.pending), ""
        return out


def _check_inputs(model, input_ids: Tensor, attention_mask: Tensor | None, config: GenerationConfig,
                  draft_model, decode: Decode | None) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be integer token ids of shape [batch, length >= 1], "
                         f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    for name, m in (("model", model), ("draft_model", draft_model)):
        context = m.hparams.max_position_embeddings if m is not None else None
        if context is not None and length + config.max_new_tokens > context:
            fix = (f"lower max_new_tokens to {context - length}" if length < context
                   else f"shorten the prompt to at most {context - 1} tokens")
            raise ValueError(f"prompt of {length} tokens{' (padding included)' if attention_mask is not None else ''} "
                             f"+ max_new_tokens={config.max_new_tokens} exceeds the {name}'s context of "
                             f"{context} tokens: {fix}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"{tuple(input_ids.shape)} like input_ids")
        if not attention_mask[:, -1].all():
            raise ValueError("attention_mask must mark left padding (prompts aligned to the right): "
                             "its last column has zeros; pad on the left")
    if config.stop_strings and decode is None:
        raise ValueError("stop_strings need decode=<function from token ids to text> (e.g. tokenizer.decode)")
    if draft_model is not None:
        if config.num_beams > 1:
            raise ValueError("speculative decoding (draft_model) with num_beams > 1 is not supported: use one")
        if draft_model is model:
            raise ValueError("draft_model is the model itself: the two need their own KV caches (pass a copy)")
        if config.compile:
            raise ValueError("compile applies to greedy decoding, sampling and beam search, not to speculative "
                             "decoding (its steps change length): drop compile or the draft_model")
        if draft_model.hparams.vocab_size != model.hparams.vocab_size:
            raise ValueError(f"draft_model has vocab_size={draft_model.hparams.vocab_size}, the model "
                             f"{model.hparams.vocab_size}: the draft must share the model's tokenizer")


# --------------------------------------------------------------------------------------------- the loops
@torch.inference_mode()
def _decode(model, input_ids: Tensor, attention_mask: Tensor | None, config: GenerationConfig, draft_model,
            decode: Decode | None, generator: torch.Generator | None) -> Iterator[Tensor]:
    batch, length = input_ids.shape
    total = length + config.max_new_tokens
    fill = config.fill_token_id if config.fill_token_id is not None else 0
    tokens = input_ids.new_full((batch, total), fill)  # every token of the call, written in place
    tokens[:, :length] = input_ids
    mask = None  # padding mask over all slots, or None when there is no padding (SDPA's causal fast path)
    if attention_mask is not None and not attention_mask.all():
        mask = attention_mask.new_ones(batch, total)
        mask[:, :length] = attention_mask
    models = [m for m in (model, draft_model) if m is not None]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        stops = _Stops(config, decode, tokens, length)
        if config.num_beams > 1:
            yield from _beam_search(model, tokens, mask, length, config, decode)
        elif draft_model is not None:
            yield from _speculative(model, draft_model, tokens, mask, length, config, stops, generator)
        else:
            yield from _sample(model, tokens, mask, length, config, stops, generator)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@contextmanager
def _kv_cache(model, batch_size: int, max_length: int, max_rollback: int = 0, enabled: bool = True):
    """A KV cache preallocated for the whole call (or none), dropped afterwards."""
    if enabled:
        model.setup_kv_cache(batch_size, max_length, max_rollback=max_rollback)
    else:
        model.clear_kv_cache()
    try:
        yield
    finally:
        model.clear_kv_cache()


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {compile option: compiled forward}


def _decode_step(model, mask: Tensor | None, config: GenerationConfig) -> Callable[[Tensor, int], Tensor]:
    """``step(tokens, cur)``: float logits ``[B, V]`` after feeding the tokens at slot ``cur`` (the model holds the
    slots before it). With ``config.compile``, the static-shape forward (``backbone(input_pos=)``: whole cache,
    one mask) compiled once per model; if compiling fails, the same forward runs uncompiled after one warning."""
    if not config.compile:
        return lambda tokens, cur: _logits(model, tokens, mask, cur, cur + 1, config.use_cache)[:, -1]

    compiled = _COMPILED.setdefault(model, {})
    if config.compile not in compiled:
        def forward(model, input_ids: Tensor, input_pos: Tensor, attention_mask: Tensor | None) -> Tensor:
            hidden, _ = model.backbone(input_ids, attention_mask, input_pos=input_pos)
            return model.lm_head(hidden[:, -1]).float()

        forward.__code__ = forward.__code__.replace()  # dynamo keeps 8 graphs per code object: each model its own
        backend = "inductor" if config.compile is True else config.compile
        mode = "reduce-overhead" if backend == "inductor" and model.device.type == "cuda" else None
        compiled[config.compile] = (forward, torch.compile(forward, backend=backend, mode=mode, dynamic=False))
    forward, run = compiled[config.compile]
    input_pos = torch.zeros(1, dtype=torch.long, device=model.device)

    def step(tokens: Tensor, cur: int) -> Tensor:
        nonlocal run
        input_pos.fill_(cur)
        try:
            logits = run(model, tokens[:, cur:cur + 1].clone(), input_pos, mask)
        except Exception as error:  # e.g. no C++ compiler for inductor: the same forward, uncompiled
            if run is forward:
                raise
            message = str(error).strip().splitlines()
            warnings.warn(f"torch.compile failed, decoding without it (same tokens): {type(error).__name__}"
                          f"{': ' + message[0] if message else ''}", stacklevel=2)
            compiled[config.compile] = (forward, forward)
            run = forward
            logits = run(model, tokens[:, cur:cur + 1].clone(), input_pos, mask)
        model.kv_cache_length = cur + 1
        return logits

    return step


def _logits(model, tokens: Tensor, mask: Tensor | None, start: int, end: int, use_cache: bool,
            last: int | None = None) -> Tensor:
    """Float logits ``[B, last, V]`` after the last ``last`` (default all) of the slots ``start .. end - 1``.

    With a KV cache the model holds slots ``< start`` and is fed only the new ones; without one it re-reads
    every slot so far."""
    mask = None if mask is None else mask[:, :end]
    hidden, _ = model.backbone(tokens[:, start:end] if use_cache else tokens[:, :end], mask)
    last = end - start if last is None else last
    return model.lm_head(hidden[:, hidden.shape[1] - last:]).float()


def _history(tokens: Tensor, mask: Tensor | None, end: int) -> Tensor:
    """Tokens ``[B, end]`` of each row for the repetition penalty, padding replaced by the row's last token."""
    ids = tokens[:, :end]
    return ids if mask is None else torch.where(mask[:, :end].bool(), ids, ids[:, -1:])


class _Stops:
    """Per-row stopping on end-of-sequence tokens and stop strings; what follows the end is overwritten
    with the fill token. Inactive (no work, no host sync) when neither is configured."""

    def __init__(self, config: GenerationConfig, decode: Decode | None, tokens: Tensor, prompt_length: int):
        self.eos = None if not config.eos_token_id else torch.tensor(config.eos_token_id, device=tokens.device)
        self.strings, self.decode = config.stop_strings or [], decode
        self.prompt_length, self.fill = prompt_length, config.fill_token_id
        self.active = self.eos is not None or bool(self.strings)
        self.finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)

    def __call__(self, tokens: Tensor, start: int, end: int) -> bool:
        """Check the new tokens ``tokens[:, start:end]`` (fixed in place); return whether every row has finished."""
        if not self.active:
            return False
        new = tokens[:, start:end]
        hits = torch.isin(new, self.eos) if self.eos is not None else torch.zeros_like(new, dtype=torch.bool)
        if self.strings:
            hits |= stop_string_hits(tokens[:, self.prompt_length:end], end - start, self.strings, self.decode)
        ended_before = self.finished[:, None] | ((hits.cumsum(dim=1) - hits.long()) > 0)
        new.masked_fill_(ended_before, self.fill)
        self.finished |= hits.any(dim=1)
        return bool(self.finished.all())


def stop_string_hits(generated: Tensor, new: int, strings: list[str], decode: Decode) -> Tensor:
    """``[B, new]``: whether the text of ``generated [B, S]`` up to each of its last ``new`` tokens contains one
    of ``strings``. Decodes a tail long enough for any of them (4 tokens per character: byte-level tokens)."""
    tail = 4 * max(len(s) for s in strings) + 16
    rows = generated.tolist()
    hits = [[False] * new for _ in rows]
    for r, ids in enumerate(rows):
        for j in range(new):
            end = len(ids) - new + j + 1
            if any(s in decode(ids[max(0, end - tail):end]) for s in strings):
                hits[r][j] = True
                break
    return torch.tensor(hits, dtype=torch.bool, device=generated.device)


def _sample(model, tokens: Tensor, mask: Tensor | None, prompt_length: int, config: GenerationConfig,
            stops: _Stops, generator: torch.Generator | None) -> Iterator[Tensor]:
    """Greedy decoding or sampling, one token per step."""
    batch, total = tokens.shape
    penalize = config.repetition_penalty != 1.0
    with _kv_cache(model, batch, total, enabled=config.use_cache):
        logits = _logits(model, tokens, mask, 0, prompt_length, config.use_cache, last=1)[:, -1]
        step = _decode_step(model, mask, config)
        for cur in range(prompt_length, total):
            previous = _history(tokens, mask, cur) if penalize else None
            tokens[:, cur] = next_token(logits, config, previous, generator)
            finished = stops(tokens, cur, cur + 1)
            yield tokens[:, cur:cur + 1]
            if finished or cur + 1 == total:
                return
            logits = step(tokens, cur)


def _speculative(model, draft_model, tokens: Tensor, mask: Tensor | None, prompt_length: int,
                 config: GenerationConfig, stops: _Stops, generator: torch.Generator | None) -> Iterator[Tensor]:
    """Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): the draft proposes up to
    ``num_draft_tokens`` tokens one by one, the model scores them all in one forward pass and keeps the
    longest prefix it agrees with, plus one token of its own.

    Greedy: a draft token is kept when it is the model's argmax, so the output equals the model's greedy
    output. Sampling: draft token ``d ~ q`` is kept with probability ``min(1, p(d) / q(d))``; at the first
    rejection the token is drawn from ``max(0, p - q)`` (normalised), after a fully accepted run from the
    model's next distribution; every token is then distributed as ``p``, the model's processed distribution.
    In a batch every row keeps the same number of tokens (the fewest any unfinished row accepted), which
    keeps the caches aligned and each row's distribution intact; rejected slots are rolled back.
    """
    batch, total = tokens.shape
    k, use_cache, sampling = config.num_draft_tokens, config.use_cache, config.do_sample
    penalize = config.repetition_penalty != 1.0

    def processed(logits: Tensor, end: int) -> Tensor:  # logits [B, V] of the token at slot `end`
        return process_logits(logits, config, _history(tokens, mask, end) if penalize else None)

    with _kv_cache(model, batch, total, k, use_cache), _kv_cache(draft_model, batch, total, k, use_cache):
        if use_cache and prompt_length > 1:  # the model holds every slot but the last committed one
            _logits(model, tokens, mask, 0, prompt_length - 1, True, last=0)
        cur, drafted = prompt_length, 0  # committed tokens; slots the draft holds
        while cur < total:
            steps = min(k, total - cur - 1)
            draft_probs = []
            for i in range(steps):
                logits = _logits(draft_model, tokens, mask, drafted, cur + i, use_cache, last=1)[:, -1]
                logits = processed(logits, cur + i)
                drafted = cur + i
                if sampling:
                    draft_probs.append(logits.softmax(dim=-1))
                    tokens[:, cur + i] = sample(draft_probs[-1], generator)
                else:
                    tokens[:, cur + i] = logits.argmax(dim=-1)
            logits = _logits(model, tokens, mask, cur - 1, cur + steps, use_cache)  # [B, steps + 1, V]
            target = torch.stack([processed(logits[:, i], cur + i) for i in range(steps + 1)], dim=1)
            proposed = tokens[:, cur:cur + steps]
            if sampling:
                target = target.softmax(dim=-1)
                draft = torch.stack(draft_probs, dim=1) if steps else target[:, :0]
                p = target[:, :steps].gather(-1, proposed[..., None])[..., 0]
                q = draft.gather(-1, proposed[..., None])[..., 0]
                uniform = torch.rand(p.shape, generator=generator, device=p.device)
                accepted = uniform * q < p
            else:
                choice = target.argmax(dim=-1)
                accepted = proposed == choice[:, :steps]
            per_row = accepted.long().cumprod(dim=1).sum(dim=1).masked_fill(stops.finished, steps)
            n = int(per_row.min())  # tokens every unfinished row accepted
            if not sampling:
                token = choice[:, n]
            elif n == steps:
                token = sample(target[:, n], generator)
            else:
                residual = (target[:, n] - draft[:, n]).clamp(min=0)
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target[:, n])
                token = torch.where(per_row > n, proposed[:, n], sample(residual, generator))
            tokens[:, cur + n] = token
            finished = stops(tokens, cur, cur + n + 1)
            yield tokens[:, cur:cur + n + 1]
            cur += n + 1
            if finished:
                return
            drafted = min(drafted, cur - 1)
            if use_cache:  # forget the rejected slots; the model again holds all but the last committed token
                model.truncate_kv_cache(cur - 1)
                draft_model.truncate_kv_cache(drafted)


def _beam_search(model, tokens: Tensor, mask: Tensor | None, prompt_length: int, config: GenerationConfig,
                 decode: Decode | None) -> Iterator[Tensor]:
    """Beam search with Hugging Face's rules (transformers 5), so that the tokens match its ``generate``.

    Each step scores all ``num_beams * V`` continuations of the running beams by their summed log
    probability and keeps the best ``width`` (twice the beams, more with several eos tokens). Those that
    end (eos, stop string, ``max_new_tokens``) and rank among the first ``num_beams`` become finished
    hypotheses scored ``sum log p / generated_length ** length_penalty``; the best ``num_beams`` that go
    on are the next beams (the KV cache follows them). Yields the best hypothesis of each row once, at the end.
    """
    batch, total = tokens.shape
    beams, eos = config.num_beams, config.eos_token_id or []
    width = max(2, 1 + len(eos)) * beams
    device = tokens.device
    seqs = tokens.repeat_interleave(beams, dim=0)  # [B * beams, total], running beams of row b at b*beams ...
    mask = None if mask is None else mask.repeat_interleave(beams, dim=0)
    eos = torch.tensor(eos, dtype=torch.long, device=device)
    first_rows = torch.arange(batch, device=device)[:, None] * beams
    among_best = torch.arange(width, device=device) < beams
    running = torch.full((batch, beams), NEG_INF, device=device)
    running[:, 0] = 0.0  # all beams start equal: only the first may expand at the first step
    done_seqs = seqs.view(batch, beams, total).clone()
    done_scores = torch.full((batch, beams), NEG_INF, device=device)
    done = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    done_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    penalize = config.repetition_penalty != 1.0
    with _kv_cache(model, batch * beams, total, enabled=config.use_cache):
        logits = _logits(model, seqs, mask, 0, prompt_length, config.use_cache, last=1)[:, -1]
        step = _decode_step(model, mask, config)
        for cur in range(prompt_length, total):
            generated = cur + 1 - prompt_length
            previous = _history(seqs, mask, cur) if penalize else None
            log_probs = process_logits(logits.log_softmax(dim=-1), config, previous)
            vocab = log_probs.shape[-1]
            scores = (log_probs.view(batch, beams, vocab) + running[..., None]).view(batch, beams * vocab)
            top_scores, top = scores.topk(width, dim=1)
            source, new_tokens = top // vocab + first_rows, top % vocab  # [B, width]
            if cur + 1 == total:
                ends = torch.ones_like(new_tokens, dtype=torch.bool)
            else:
                ends = torch.isin(new_tokens, eos)
                if config.stop_strings:
                    candidates = torch.cat([seqs[source.flatten(), prompt_length:cur], new_tokens.view(-1, 1)], 1)
                    ends |= stop_string_hits(candidates, 1, config.stop_strings, decode).view(batch, width)
            # the best `beams` continuations that go on
            going_scores = top_scores + ends.float() * NEG_INF
            pick = going_scores.topk(beams, dim=1).indices
            running = going_scores.gather(1, pick)
            rows, next_tokens = source.gather(1, pick).flatten(), new_tokens.gather(1, pick).flatten()
            # the finished hypotheses: the best `beams` of those kept so far and those that end now
            just_ended = ends & among_best
            if bool(just_ended.any()):
                final = top_scores / generated ** config.length_penalty
                if config.early_stopping is True:
                    final = final + done.all(dim=1, keepdim=True).float() * NEG_INF
                final = final + (~improvable).float() * NEG_INF + (~just_ended).float() * NEG_INF
                candidates = seqs[source.flatten()].view(batch, width, total)
                candidates[:, :, cur] = new_tokens
                best = torch.cat([done_scores, final], dim=1).topk(beams, dim=1).indices
                done_scores = torch.cat([done_scores, final], dim=1).gather(1, best)
                done_seqs = torch.cat([done_seqs, candidates], dim=1).gather(1, best[..., None].expand(-1, -1, total))
                done = torch.cat([done, just_ended], dim=1).gather(1, best)
                done_lengths = torch.cat([done_lengths, torch.full_like(top, generated)], dim=1).gather(1, best)
            # can a running beam still beat the worst finished hypothesis?
            never = config.early_stopping == "never" and config.length_penalty > 0
            longest = total - prompt_length if never else generated
            best_possible = running[:, :1] / longest ** config.length_penalty
            worst_done = torch.where(done, done_scores.min(dim=1, keepdim=True).values, NEG_INF)
            improvable &= (best_possible > worst_done).any(dim=1, keepdim=True)
            if (not bool(improvable.any()) or (config.early_stopping is True and bool(done.all()))
                    or bool(ends.all())):
                break
            seqs[:, :cur] = seqs[rows, :cur]
            seqs[:, cur] = next_tokens
            if config.use_cache:
                model.reorder_kv_cache(rows)
            logits = step(seqs, cur)
    yield done_seqs[:, 0, prompt_length:prompt_length + int(done_lengths[:, 0].max())]
