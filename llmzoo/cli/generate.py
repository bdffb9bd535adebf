"""``llmzoo generate``: :meth:`LLMZooTrainer.generate <llmzoo.cli.LLMZooTrainer.generate>`, whose parameters are
the subcommand's options. Decoding is :mod:`llmzoo.generation`; this wires its options, the prompts and the
checkpoint's weights and tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from tqdm.auto import tqdm

from llmzoo.checkpoints import QUANTIZATION_KEY, read_checkpoint
from llmzoo.cli.chat import chat_prompt, end_of_turn_ids, run_template
from llmzoo.data import LanguageDataModule, load_tokenizer_for_checkpoint
from llmzoo.generation import GenerationConfig, HeldBack, TextStream, left_pad, room_after_prompts, stream
from llmzoo.hf import from_hf
from llmzoo.models import CausalLM
from llmzoo.models.build import fill_model, load_checkpoint_model
from llmzoo.quantize import quantize as quantize_model
from llmzoo.quantize import check_options, quantized_structure


def generate(self: L.Trainer, model: CausalLM, ckpt_path: str, prompt: list[str] | None = None,
             prompt_file: str | None = None, max_new_tokens: int = 200, num_samples: int = 1,
             do_sample: bool | None = None, temperature: float = 0.8, top_k: int | None = 50,
             top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
             stop: list[str] | None = None, seed: int = 0, draft_ckpt_path: str | None = None,
             num_draft_tokens: int = 4, compile: bool = False, quantize: str | None = None, group_size: int = 32,
             chat: bool = False, system: str | None = None, datamodule: LanguageDataModule | None = None, weights_only: bool | None = None,
             checkpoint_contents: dict | None = None) -> list[str]:
    """Continue prompts with a checkpoint or a Hugging Face directory, printing the text as it comes.

    One row (one prompt, one sample) streams to stdout token by token; several rows are decoded as one
    left-padded batch (a progress bar meanwhile) and printed in order under ``----- prompt i, sample j -----``.
    Each row stops at the tokenizer's end-of-sequence token or a stop string. Returns the continuations.

    ``model`` is given the weights of ``ckpt_path`` once every option is checked: built on the meta device
    (:func:`~llmzoo.models.build.empty_model`, as the CLI builds it), it is filled with the checkpoint's
    tensors, in their dtype; a model with weights has them replaced. ``checkpoint_contents``: those of
    ``ckpt_path`` when they are already read (the CLI reads each checkpoint once); ``datamodule``: its
    tokenizer is used instead of the checkpoint's.

    Args:
        ckpt_path: a Lightning checkpoint (its run's tokenizer is used) or a Hugging Face model directory
            with a tokenizer.json (one llmzoo exported, or any of the seven families).
        prompt: text to continue, taken literally; repeat the option for a batch. None or empty starts a
            new document (after the end-of-sequence token).
        prompt_file: a UTF-8 file of prompts, one per line (blank lines skipped), added to the batch.
        max_new_tokens: tokens to add at most; lowered, with a note, to what the model's context leaves.
        num_samples: continuations of each prompt, in the same batch.
        do_sample: sample instead of greedy decoding; default: true, false with beam search.
        temperature: softmax temperature when sampling (> 0).
        top_k: sample among the k most likely tokens (null: all).
        top_p: sample among the most likely tokens whose probabilities reach top_p, in (0, 1].
        min_p: drop tokens less likely than min_p times the most likely one, in [0, 1].
        repetition_penalty: > 1 makes tokens already in the row less likely (1: none).
        num_beams: beam search with this many beams (greedy: do_sample false).
        length_penalty: beam scores are sum log p / length ** length_penalty.
        early_stopping: beam search stops when num_beams hypotheses are done (true), by a heuristic
            (false), or at max_new_tokens only (never).
        stop: a row ends once its new text contains this string; repeat the option for several.
        seed: seed of the sampling generator.
        draft_ckpt_path: a smaller model with the same tokenizer (checkpoint or Hugging Face directory)
            for speculative decoding: greedy output equals the model's alone, sampling keeps its distribution.
        num_draft_tokens: tokens the draft proposes per step of speculative decoding.
        compile: decode with a compiled static-shape step (torch.compile; same tokens, faster steps after a
            compilation of seconds to a minute; see docs/inference.md).
        quantize: int8 or int4 weight-only quantization of the model before decoding (a checkpoint written by
            llmzoo convert --quantize is quantized already).
        group_size: input columns per scale and zero of int4 (32, 64, 128 or 256).
        chat: each prompt is a user message, rendered with the run's chat template (a fine-tuning run keeps its
            template in its checkpoint; a Hugging Face directory its own; else chatml); the reply ends at the
            template's end-of-turn marker, which is not printed.
        system: with --chat, a system message before each prompt.
        weights_only: unused (lets a fit config.yaml be reused).
    """
    checkpoint = checkpoint_contents
    if checkpoint is None and not Path(ckpt_path).is_dir():
        checkpoint = read_checkpoint(ckpt_path)
    tokenizer = (datamodule.tokenizer if datamodule is not None
                 else load_tokenizer_for_checkpoint(ckpt_path, checkpoint=checkpoint))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if system is not None and not chat:
        raise ValueError("--system is a chat setting: add --chat (the prompt is then a user message)")
    template = run_template(ckpt_path, tokenizer, checkpoint) if chat else None
    ends = end_of_turn_ids(template, tokenizer) if chat else [eos]
    stop = [*(stop or []), *([template.end_of_turn] if chat and template.end_of_turn else [])] or None
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=num_beams == 1 if do_sample is None else do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
        num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=ends,
        pad_token_id=pad, stop_strings=stop, seed=seed, num_draft_tokens=num_draft_tokens,
        compile=compile)  # checks every option
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if quantize is not None:
        check_options(quantize, group_size)
    prompts = [*(prompt or []), *read_prompts(prompt_file)] or [""]
    if chat:
        opening = [{"role": "system", "content": system}] if system else []
        encoded = [chat_prompt(template, tokenizer, [*opening, {"role": "user", "content": text}]) for text in prompts]
    else:
        encoded = [ids or [eos] for ids in tokenizer.encode_batch(prompts)]
    rows = [ids for ids in encoded for _ in range(num_samples)]
    draft_model = None
    if draft_ckpt_path is not None:
        draft_model, draft_tokenizer = load_draft(draft_ckpt_path)
        if draft_tokenizer != tokenizer:
            raise ValueError(f"the draft model {draft_ckpt_path} was trained with another tokenizer: speculative "
                             f"decoding needs a draft with the model's tokenizer")
    config.max_new_tokens = fitting_max_new_tokens(encoded, max_new_tokens, model, draft_model)
    if checkpoint is not None and checkpoint.get(QUANTIZATION_KEY):  # written by llmzoo convert --quantize
        quantized_structure(model, checkpoint[QUANTIZATION_KEY])
    fill_model(model, checkpoint["state_dict"] if checkpoint is not None else from_hf(ckpt_path).state_dict())
    model.to(self.strategy.root_device)
    if quantize is not None:
        quantize_model(model, quantize, group_size)
    if draft_model is not None:
        draft_model.to(model.device)
    input_ids, attention_mask = left_pad(rows, eos if pad is None else pad, model.device)
    chunks = stream(model, input_ids, config, attention_mask=attention_mask, draft_model=draft_model,
                    decode=tokenizer.decode)
    skip = {eos, pad, *ends}  # what follows the end of a row
    if len(rows) == 1:  # printed as it comes
        text, held = TextStream(tokenizer.decode, skip), HeldBack(template.end_of_turn if chat else "")
        print("" if chat else prompts[0], end="", flush=True)
        for chunk in chunks:
            print(held.push(text.push(chunk[0].tolist())), end="", flush=True)
        print(held.push(text.flush()) + held.flush(), flush=True)
        reply = tokenizer.decode(text.ids)
        return [reply.split(template.end_of_turn)[0] if chat and template.end_of_turn else reply]
    with tqdm(total=config.max_new_tokens, desc="generating", unit="token", disable=None, leave=False) as bar:
        new = []
        for chunk in chunks:
            new.append(chunk)
            bar.update(chunk.shape[1])
    continuations = [tokenizer.decode([i for i in ids if i not in skip]) for ids in torch.cat(new, 1).tolist()]
    if chat and template.end_of_turn:
        continuations = [text.split(template.end_of_turn)[0] for text in continuations]
    for row, continuation in enumerate(continuations):
        number, sample = divmod(row, num_samples)
        label = ", ".join(part for part, many in ((f"prompt {number + 1}", len(prompts) > 1),
                                                  (f"sample {sample + 1}", num_samples > 1)) if many)
        print(f"----- {label} -----\n{'' if chat else prompts[number]}{continuation}", flush=True)
    return continuations


def load_draft(path: str):
    """The draft model of speculative decoding and its tokenizer, from a Hugging Face directory or a checkpoint
    (read once for both)."""
    if Path(path).is_dir():
        return from_hf(path), load_tokenizer_for_checkpoint(path)
    checkpoint = read_checkpoint(path)
    return load_checkpoint_model(checkpoint), load_tokenizer_for_checkpoint(path, checkpoint=checkpoint)


def read_prompts(path: str | None) -> list[str]:
    """The prompts of a prompt file: one per line, blank lines skipped."""
    if path is None:
        return []
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompt file {path} not found: give a text file with one prompt per line")
    prompts = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts: write one prompt per line")
    return prompts


def fitting_max_new_tokens(prompts: list[list[int]], max_new_tokens: int, *models: CausalLM | None) -> int:
    """``max_new_tokens``, lowered (with a note on stderr) to what the models' context leaves after the longest
    of the tokenized ``prompts``; a prompt that leaves no room is refused."""
    context = min(m.hparams.max_position_embeddings for m in models if m is not None)
    room = room_after_prompts([len(ids) for ids in prompts], context)
    if max_new_tokens > room:
        print(f"llmzoo: note: max_new_tokens lowered from {max_new_tokens} to {room}: the longest prompt has "
              f"{context - room} tokens and the model's context is {context}", file=sys.stderr)
    return min(max_new_tokens, room)
