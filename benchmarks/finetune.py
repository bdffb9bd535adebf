"""Fine-tuning: a LoRA step against a full fine-tuning step, and the SFT data pipeline against transformers.

    python -m benchmarks.finetune                 # prints the section (python -m benchmarks --part finetune stores it)
    python -m benchmarks.finetune --quick

1. GPT-2 124M (llmzoo's GPT2 at its paper size, fp32, CPU), one training step (forward, fused loss, backward,
   AdamW step) on batch 4 x 256: full fine-tuning (every weight in AdamW) against LoRA (r=8 on q, k, v, out, up,
   down; the base frozen, only adapters in AdamW). Peak memory = the process's peak resident set during the step
   (``VmHWM``, restarted through ``/proc/self/clear_refs``), after a warm-up step allocated the gradients and the
   optimizer state, over the resident set before the model was built: weights, gradients, optimizer state and
   activations (glibc's mmap threshold fixed at 128 KiB, so that freed blocks leave the resident set). Each
   setting in a fresh process, one after the other, without and with activation checkpointing; step times in the
   same processes.
2. The SFT data pipeline: ``SFTDataModule.encode`` (render with the chat template, tokenize in one batch, labels on
   the assistant turns) against transformers' ``apply_chat_template`` + tokenizing, one conversation at a time, with
   the assistant mask (``return_assistant_tokens_mask``: the built-in ChatML template marks the turns with
   ``{% generation %}`` blocks) and without, on the same 2000 generated conversations and the same tokenizer. Examples per second, in turns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import environment, interleaved, ratio_text, ratios

TITLE = "Fine-tuning: LoRA vs full, and the SFT data pipeline"
ROOT = Path(__file__).resolve().parents[1]
GPT2_124M = dict(vocab_size=50257, embed_dim=768, num_heads=12, num_layers=12, max_position_embeddings=1024)
TOY = dict(vocab_size=512, embed_dim=64, num_heads=4, num_layers=2, max_position_embeddings=128)
LORA = dict(r=8, alpha=16, targets=["q", "k", "v", "out", "up", "down"])


def rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def timed_steps(step, steps: int) -> list[float]:
    """Seconds of ``steps`` calls of ``step`` after a warm-up call (which allocates the gradients and the optimizer
    state), the process's peak resident set restarted (``/proc/self/clear_refs``) after the warm-up."""
    step()
    Path("/proc/self/clear_refs").write_text("5")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def run_setting(module, setting: dict, quick: bool) -> dict:
    """``module.child(**setting)`` in a fresh process (in this one for a quick run: a smoke run checks that it works,
    its peaks mean nothing)."""
    if quick:
        return module.child(**setting)
    # a fixed mmap threshold: a freed large block goes back to the system, so the resident set is what is alive
    # (glibc's adaptive threshold keeps freed blocks of up to 32 MiB on the heap, which adds hundreds of MiB here)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "MALLOC_MMAP_THRESHOLD_": "131072"}
    output = subprocess.run([sys.executable, "-m", module.__name__, "--child", json.dumps(setting)], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True).stdout
    return json.loads(output.splitlines()[-1])


def part_main(argv: list[str] | None, module) -> None:
    """The command line of a part whose settings run in fresh processes: ``--quick``, and ``--child SETTING`` (JSON:
    ``module.child``'s arguments) for one of them."""
    parser = argparse.ArgumentParser(prog=f"python -m {module.__name__}", description=module.__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(module.child(**json.loads(args.child))))
        return
    result = module.measure(args.quick)
    print(json.dumps(result))
    print(module.report(result))


def child(lora: bool, checkpointing: bool, batch: int, seq: int, sizes: dict, steps: int) -> dict:
    """One setting in this process: its step's peak memory over the process before the model, and step times."""
    from llmzoo import GPT2
    from llmzoo.lora import add_lora, trainable_parameters

    before = rss()
    torch.manual_seed(0)
    model = GPT2(**sizes, activation_checkpointing=checkpointing)
    if lora:
        add_lora(model, **LORA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = torch.randint(0, sizes["vocab_size"], (batch, seq + 1))

    def step():
        model.token_nll(data)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed_steps(step, steps)
    return {"peak": rss("VmHWM") - before, "times": times, "trainable": trainable_parameters(model),
            "parameters": model.num_parameters()}


def step_settings(quick: bool) -> dict:
    sizes, batch, seq, steps = (TOY, 2, 64, 2) if quick else (GPT2_124M, 4, 256, 2)
    found = {}
    for checkpointing in (False, True):
        for name, lora in (("full", False), ("lora", True)):
            setting = dict(lora=lora, checkpointing=checkpointing, batch=batch, seq=seq, sizes=sizes, steps=steps)
            found[f"{name}{'-checkpointing' if checkpointing else ''}"] = run_setting(sys.modules[__name__], setting,
                                                                                      quick)

    def ratio(key: str, suffix: str) -> float:
        lora, full = found[f"lora{suffix}"], found[f"full{suffix}"]
        return lora[key] / full[key] if key == "peak" else statistics.median(lora[key]) / statistics.median(full[key])

    return {"batch": batch, "seq": seq, "sizes": sizes, **found,
            "memory_ratio": ratio("peak", ""), "time_ratio": ratio("times", ""),
            "memory_ratio_checkpointing": ratio("peak", "-checkpointing"),
            "time_ratio_checkpointing": ratio("times", "-checkpointing")}


def pipeline(quick: bool) -> dict:
    """Examples/s of llmzoo's SFT encoding and of transformers' apply_chat_template + tokenizing."""
    import transformers
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    from llmzoo.data import TEMPLATES, ChatTemplate, SFTDataModule, Tokenizer
    from llmzoo.data.instructions import make_records

    records = make_records(200 if quick else 2000, seed=0)
    conversations = [record["messages"] for record in records]
    inner = HF(models.BPE())
    inner.pre_tokenizer, inner.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    inner.train_from_iterator([m["content"] for c in conversations for m in c], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = Tokenizer(inner)
    data = SFTDataModule(tokenizer="unused", template="chatml", seq_len=1024)
    data.tokenizer = tokenizer
    data.chat_template = ChatTemplate(TEMPLATES["chatml"], "chatml", **tokenizer.special_tokens)
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<|bos|>", eos_token="<|eos|>",
                                                     pad_token="<|pad|>")
    marked = TEMPLATES["chatml"]  # its assistant turns in {% generation %} blocks, which transformers reads

    def hf_masked():
        for messages in conversations:
            reference.apply_chat_template(messages, chat_template=marked, return_dict=True,
                                          return_assistant_tokens_mask=True)

    def hf_plain():
        for messages in conversations:
            reference.apply_chat_template(messages, chat_template=TEMPLATES["chatml"])

    times = interleaved({"llmzoo": lambda: data.encode(conversations), "hf_masked": hf_masked, "hf_plain": hf_plain},
                        repeats=2 if quick else 5, warmup=1)
    rates = {name: len(conversations) / statistics.median(values) for name, values in times.items()}
    return {"examples": len(conversations), "times": times, "rates": rates,
            "vs_masked": ratios(times["hf_masked"], times["llmzoo"]), "vs_plain": ratios(times["hf_plain"], times["llmzoo"])}


def measure(quick: bool = False) -> dict:
    return {"env": environment(), "quick": quick, "load": os.getloadavg(), "step": step_settings(quick),
            "pipeline": pipeline(quick)}


def report(result: dict, plots: Path | None = None) -> str:
    step, data = result["step"], result["pipeline"]
    sizes = step["sizes"]
    names = ("full", "lora", "full-checkpointing", "lora-checkpointing")
    mib = {name: step[name]["peak"] / 2**20 for name in names}
    ms = {name: 1e3 * statistics.median(step[name]["times"]) for name in names}
    lines = [f"llmzoo GPT2 ({sizes['num_layers']} layers, {sizes['embed_dim']} wide, vocab {sizes['vocab_size']}: "
             f"{step['full']['parameters'] / 1e6:.1f}M parameters), CPU fp32, one training step (forward, fused loss, "
             f"backward, AdamW step) on batch {step['batch']} x {step['seq']}. Peak = the process's peak resident set "
             "during the step over the resident set before the model was built (weights, gradients, AdamW state, "
             "activations; glibc's mmap threshold fixed at 128 KiB so that freed blocks leave the resident set), after "
             "a warm-up step; each setting in a fresh process. LoRA: r=8, alpha=16 on q, k, v, "
             f"out, up, down ({step['lora']['trainable'] / 1e6:.2f}M trainable parameters), the rest frozen. "
             f"Load average during the run: {', '.join(f'{x:.1f}' for x in result['load'])} (a shared 2-core machine).",
             "", "| | peak MiB | median step ms | trainable parameters |", "|---|---|---|---|"]
    for name in names:
        label = ("full fine-tuning" if name.startswith("full") else "LoRA") + (
            ", activation checkpointing" if name.endswith("checkpointing") else "")
        lines.append(f"| {label} | {mib[name]:.0f} | {ms[name]:.0f} | {step[name]['trainable']:,} |")
    lines += ["", f"**LoRA / full: peak memory {step['memory_ratio']:.2f}x, step time {step['time_ratio']:.2f}x; with "
              f"activation checkpointing (both) {step['memory_ratio_checkpointing']:.2f}x and "
              f"{step['time_ratio_checkpointing']:.2f}x.** Without checkpointing the activations of 4 x 256 tokens "
              "(about the same for both) outweigh the weights, gradients and AdamW state that LoRA saves; with it, "
              "what is left is mostly those.", "",
              f"SFT data pipeline, {data['examples']} generated conversations (1-2 turns, ChatML), the same tokenizer: "
              "examples per second, median of turns.", "", "| | examples/s |", "|---|---|",
              f"| llmzoo `SFTDataModule.encode` (text, ids, assistant labels) | {data['rates']['llmzoo']:,.0f} |",
              f"| transformers `apply_chat_template` + tokenize + assistant mask | {data['rates']['hf_masked']:,.0f} |",
              f"| transformers `apply_chat_template` + tokenize, no mask | {data['rates']['hf_plain']:,.0f} |", "",
              f"**llmzoo is {ratio_text(data['vs_masked'])} as fast as transformers with the mask, "
              f"{ratio_text(data['vs_plain'])} without.**"]
    return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, str, str, bool]]:
    step, data = result["step"], result["pipeline"]
    rows = [(f"LoRA / full fine-tuning peak memory, GPT-2 124M {step['batch']} x {step['seq']}{label}",
             f"{step[key]:.2f}x", "<= 0.4x", step[key] <= 0.4)
            for label, key in ((", activation checkpointing", "memory_ratio_checkpointing"), ("", "memory_ratio"))]
    return rows + [("SFT pipeline vs apply_chat_template + tokenize (with the mask)", ratio_text(data["vs_masked"]),
                    "> 1x", data["vs_masked"]["median"] > 1)]


def main(argv: list[str] | None = None) -> None:
    part_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    main()
