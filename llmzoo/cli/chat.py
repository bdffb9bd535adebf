"""``llmzoo chat``: a conversation with a fine-tuned model in the terminal; and what ``llmzoo generate --chat`` shares
with it: the run's chat template, the prompt it renders, where a reply stops. Needs no data or Trainer, so
:func:`~llmzoo.cli.main` runs it before LightningCLI starts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch
from jsonargparse import ArgumentParser

from llmzoo.checkpoints import read_checkpoint
from llmzoo.data import load_tokenizer_for_checkpoint
from llmzoo.data.chat import ChatTemplate, template_source
from llmzoo.data.sft import encode_chats
from llmzoo.data.tokenizer import Tokenizer
from llmzoo.generation import GenerationConfig, HeldBack, TextStream, stream
from llmzoo.hf import from_hf
from llmzoo.models.build import load_checkpoint_model


def run_template(ckpt_path: str, tokenizer: Tokenizer, checkpoint: dict | None = None,
                 template: str | None = None) -> ChatTemplate:
    """The chat template of a run (kept in its checkpoint by ``SFTDataModule``), of a Hugging Face directory, or
    ``template`` (a built-in name or a file); else ChatML."""
    name, source = template_source(template, ckpt_path, checkpoint)
    return ChatTemplate(source, name, **tokenizer.special_tokens)


def chat_prompt(template: ChatTemplate, tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of ``messages`` rendered for the assistant's next turn."""
    return encode_chats(tokenizer, [template.render(messages, add_generation_prompt=True)])[0].ids


def end_of_turn_ids(template: ChatTemplate, tokenizer: Tokenizer) -> list[int]:
    """The tokens that end a reply: end-of-sequence, and the template's end-of-turn marker when it is one token."""
    marker = tokenizer.tokenizer.token_to_id(template.end_of_turn) if template.end_of_turn else None
    return [tokenizer.eos_token_id] + ([marker] if marker is not None and marker != tokenizer.eos_token_id else [])


def load_chat_model(ckpt_path: str):
    """``(model, tokenizer, checkpoint contents or None)`` of a checkpoint file or a Hugging Face directory."""
    if Path(ckpt_path).is_dir():
        return from_hf(ckpt_path), load_tokenizer_for_checkpoint(ckpt_path), None
    checkpoint = read_checkpoint(ckpt_path)
    return (load_checkpoint_model(checkpoint).eval(), load_tokenizer_for_checkpoint(ckpt_path, checkpoint=checkpoint),
            checkpoint)


def chat(ckpt_path: str, system: str | None = None, template: str | None = None, max_new_tokens: int = 256,
         do_sample: bool = True, temperature: float = 0.7, top_k: int | None = 50, top_p: float | None = None,
         seed: int = 0, input: TextIO = sys.stdin, output: TextIO = sys.stdout) -> list[dict]:
    """Talk with a fine-tuned model: each line you type is a user turn, the reply streams as it comes, the history is
    kept (the oldest turns are left out when it outgrows the context). ``/reset`` starts over, Ctrl-D (end of input)
    quits. Returns the conversation.

    Args:
        ckpt_path: a checkpoint of a fine-tuning run (its chat template is inside), another checkpoint or a Hugging
            Face directory (its own template, else chatml).
        system: a system message that opens the conversation.
        template: another chat template: chatml, llama3, alpaca or a .jinja file.
        max_new_tokens: the longest reply, in tokens.
        do_sample: sample the reply (false: greedy).
        temperature: softmax temperature when sampling (> 0).
        top_k: sample among the k most likely tokens (null: all).
        top_p: nucleus sampling, in (0, 1].
        seed: seed of the sampling generator.
    """
    model, tokenizer, checkpoint = load_chat_model(ckpt_path)
    chat_template = run_template(ckpt_path, tokenizer, checkpoint, template)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, eos_token_id=end_of_turn_ids(chat_template, tokenizer),
                              pad_token_id=tokenizer.pad_token_id, seed=seed,
                              stop_strings=[chat_template.end_of_turn] if chat_template.end_of_turn else None)
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    context = model.hparams.max_position_embeddings
    interactive = input.isatty()
    if interactive:
        print(f"chatting with {ckpt_path} (template {chat_template.name}); /reset starts over, Ctrl-D quits",
              file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = input.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = list(opening)
            print("(the conversation starts over)", file=output, flush=True)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = chat_prompt(chat_template, tokenizer, history)
        while len(ids) >= context and len(history) > len(opening) + 1:  # the oldest exchange goes
            history = opening + history[len(opening) + 2:]
            ids = chat_prompt(chat_template, tokenizer, history)
        if len(ids) >= context:
            print(f"(this message has {len(ids)} tokens, the model's context {context}: write a shorter one)",
                  file=output, flush=True)
            history.pop()
            continue
        config.max_new_tokens = min(max_new_tokens, context - len(ids))
        pieces, held = TextStream(tokenizer.decode, set(config.eos_token_id) | {config.fill_token_id}), \
            HeldBack(chat_template.end_of_turn)
        reply = []
        with torch.no_grad():
            for chunk in stream(model, torch.tensor([ids]), config, decode=tokenizer.decode):
                piece = held.push(pieces.push(chunk[0].tolist()))
                reply.append(piece)
                print(piece, end="", file=output, flush=True)
        rest = held.push(pieces.flush()) + held.flush()
        print(rest, file=output, flush=True)
        history.append({"role": "assistant", "content": ("".join(reply) + rest).strip()})
    return history


HELP = "Talk with a fine-tuned model: a multi-turn conversation in the terminal (/reset starts over, Ctrl-D quits)"


def chat_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="llmzoo chat", description=HELP, exit_on_error=False)
    parser.add_function_arguments(chat, as_group=False, skip={"input", "output"})
    return parser


def run_chat(args: list[str]) -> list[dict]:
    """``llmzoo chat ARGS``; a bad option raises ``ArgumentError``."""
    config = chat_parser().parse_args(args)
    return chat(**{key: value for key, value in config.items() if key != "config"})
