"""``llmzoo evaluate``: lm-evaluation-harness tasks (:mod:`llmzoo.harness`) and the perplexity and bits per byte of
text files (:mod:`llmzoo.evaluation`) for a checkpoint or a Hugging Face directory. Like ``convert`` it needs no
data or Trainer, so :func:`~llmzoo.cli.main` runs it before LightningCLI starts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from llmzoo.checkpoints import is_sharded_checkpoint, read_checkpoint, sharded_checkpoint_error
from llmzoo.cli.arguments import gather_lists
from llmzoo.data import load_tokenizer_for_checkpoint, resolve_files
from llmzoo.evaluation import evaluate_files
from llmzoo.files import write_atomic
from llmzoo.hf import from_hf
from llmzoo.hf.weights import as_dtype
from llmzoo.models.build import load_checkpoint_model

LIST_OPTIONS = ("--tasks", "--files", "--include_path")  # repeatable; --tasks also takes "a,b"


def evaluate(ckpt_path: str, tasks: list[str] | None = None, files: list[str] | None = None,
             limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 16,
             include_path: list[str] | None = None, output: str | None = None, stride: int | None = None,
             device: str | None = None, dtype: str | None = None, seed: int = 0,
             model_class: str | None = None) -> dict:
    """Score a checkpoint or a Hugging Face directory on lm-evaluation-harness tasks and/or text files.

    Prints a table of the results; ``--output`` writes them as JSON. See docs/evaluation.md.

    Args:
        ckpt_path: a Lightning checkpoint (its run's tokenizer is used) or a Hugging Face model directory with a
            tokenizer.json.
        tasks: lm-eval task names ("hellaswag,arc_easy", or repeat the option), run through the harness with
            llmzoo's model adapter (needs the eval extra: pip install "llmzoo[eval]").
        files: text files (or folders, globs; repeat the option): perplexity and bits per byte of each, each
            file one document, with a sliding window over the model's context.
        limit: at most this many examples per task (a fraction below 1: that share of them).
        num_fewshot: few-shot examples in each prompt (default: the task's own, else 0).
        batch_size: requests (tasks) or windows (files) per forward pass.
        include_path: folders of task YAML files to add to the harness's own (local tasks work offline).
        output: the JSON file to write the results to.
        stride: --files: tokens the window moves on (each later window scores only those); default half the
            context, the context itself for disjoint windows.
        device: where the model runs (default: cuda if available, else cpu).
        dtype: the weights' dtype (float32, bfloat16, float16); default: the checkpoint's.
        seed: seed of the harness's few-shot sampling and of any sampled generation.
        model_class: the class of a checkpoint that does not record it (Llama, GPT2, ...).
    """
    if not tasks and not files:
        raise ValueError("evaluate needs --tasks (lm-eval task names) or --files (text files), or both")
    model, tokenizer = load_model(ckpt_path, dtype, model_class)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {"ckpt_path": str(ckpt_path)}
    if files:
        paths = resolve_files(files)
        results["files"] = evaluate_files(model, tokenizer, paths, stride=stride, batch_size=batch_size)
        print(files_table(results["files"]), flush=True)
    if tasks:
        try:
            from llmzoo.harness import run_tasks, table
        except ModuleNotFoundError as error:
            raise ValueError(f"--tasks needs lm-evaluation-harness ({error}): pip install \"llmzoo[eval]\"") from None
        names = [name for task in tasks for name in task.split(",") if name]
        results["harness"] = run_tasks(model, tokenizer, names, limit, num_fewshot, batch_size, include_path, seed)
        print(table(results["harness"]), flush=True)
    if output:
        write_atomic(Path(output), (json.dumps(results, indent=2, default=str) + "\n").encode())
        print(f"wrote {output}")
    return results


def load_model(ckpt_path: str, dtype: str | None = None, model_class: str | None = None):
    """The model (eval mode) and tokenizer of a checkpoint file or a Hugging Face directory, read once."""
    if is_sharded_checkpoint(ckpt_path):
        raise sharded_checkpoint_error(ckpt_path)
    if (Path(ckpt_path) / "config.json").is_file():
        return from_hf(ckpt_path, dtype=dtype), load_tokenizer_for_checkpoint(ckpt_path)
    checkpoint = read_checkpoint(ckpt_path)
    model = load_checkpoint_model(checkpoint, model_class)
    if dtype is not None:
        model.to(as_dtype(dtype))
    return model.eval(), load_tokenizer_for_checkpoint(ckpt_path, checkpoint=checkpoint)


def files_table(scores: dict) -> str:
    """The ``--files`` results as a Markdown table, one row per file and the total."""
    lines = [f"window {scores['window']} tokens, stride {scores['stride']}", "",
             "| file | tokens | bytes | nll/token | ppl | bits/byte |", "|---|---|---|---|---|---|"]
    for name, s in [*scores["files"].items(), ("total", scores["total"])]:
        lines.append(f"| {name} | {s['tokens']} | {s['bytes']} | {s['nll']:.4f} | {s['ppl']:.3f} | {s['bpb']:.4f} |")
    return "\n".join(lines)


HELP = " ".join(evaluate.__doc__.split("\n\n")[0].split())


def evaluate_parser() -> ArgumentParser:
    """The parser of ``llmzoo evaluate``'s options: :func:`evaluate`'s arguments."""
    parser = ArgumentParser(prog="llmzoo evaluate", description=HELP, exit_on_error=False)
    parser.add_function_arguments(evaluate, as_group=False)
    return parser


def run_evaluate(args: list[str]) -> dict:
    """``llmzoo evaluate ARGS``; a bad option raises ``ArgumentError``."""
    config = evaluate_parser().parse_args(gather_lists(args, LIST_OPTIONS))
    return evaluate(**{key: value for key, value in config.items() if key != "config"})
