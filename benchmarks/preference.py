"""Preference tuning: a DPO step under LoRA (the reference = the same weights, adapters switched off) against full
fine-tuning with a frozen copy of the weights as the reference.

    python -m benchmarks.preference               # prints the section (python -m benchmarks --part preference stores it)
    python -m benchmarks.preference --quick

A Llama (8 layers, 512 wide, vocab 8192; fp32, CPU), one DPO step (the reference's no-grad forward, the policy's
forward over chosen + rejected in one batch, backward, AdamW step) on 4 pairs of 128-token rows each. Peak memory
and step times as in benchmarks/finetune.py: each setting in a fresh process, the peak resident set during a step
over the resident set before the model was built, after a warm-up step.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.common import environment
from benchmarks.finetune import part_main, rss, run_setting, timed_steps

TITLE = "Preference tuning: a DPO step, LoRA (no reference copy) vs full fine-tuning (a frozen copy)"
SIZES = dict(vocab_size=8192, embed_dim=512, num_heads=8, num_kv_heads=4, num_layers=8, max_position_embeddings=256)
TOY = dict(vocab_size=512, embed_dim=64, num_heads=4, num_kv_heads=2, num_layers=2, max_position_embeddings=128)
LORA = dict(r=8, alpha=16, targets=["q", "k", "v", "out", "gate", "up", "down"])


def child(lora: bool, pairs: int, seq: int, sizes: dict, steps: int) -> dict:
    """One setting in this process: its DPO step's peak memory over the process before the model, and step times."""
    from llmzoo import Llama
    from llmzoo.layers.preference import PreferenceSettings, preference_loss
    from llmzoo.lora import trainable_parameters

    before = rss()
    torch.manual_seed(0)
    model = Llama(**sizes, lora=LORA if lora else None, preference=PreferenceSettings(reference="model"))
    if not lora:
        model.__dict__["reference_model"] = model.frozen_copy()  # what on_fit_start does without LoRA
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, sizes["vocab_size"], (2 * pairs, seq + 1))
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # the first half of each row is its prompt
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "pair_index": torch.arange(pairs)}

    def step():
        logps, tokens, _ = model.completion_logps(batch)
        losses = preference_loss(logps.view(2, -1), model.reference_logps(batch), tokens.view(2, -1),
                                 model.preference_settings)[0]
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed_steps(step, steps)
    copy = model.__dict__.get("reference_model")
    return {"peak": rss("VmHWM") - before, "times": times, "trainable": trainable_parameters(model),
            "parameters": model.num_parameters(), "weights": sum(p.nbytes for p in model.parameters()),
            "reference_copy": 0 if copy is None else sum(p.nbytes for p in copy.parameters())}


def measure(quick: bool = False) -> dict:
    sizes, pairs, seq, steps = (TOY, 2, 32, 2) if quick else (SIZES, 4, 128, 3)
    found = {name: run_setting(sys.modules[__name__], dict(lora=lora, pairs=pairs, seq=seq, sizes=sizes, steps=steps),
                               quick) for name, lora in (("full", False), ("lora", True))}
    return {"env": environment(), "quick": quick, "load": os.getloadavg(), "pairs": pairs, "seq": seq, "sizes": sizes,
            **found, "memory_ratio": found["lora"]["peak"] / found["full"]["peak"] if found["full"]["peak"] else math.nan,
            "time_ratio": statistics.median(found["lora"]["times"]) / statistics.median(found["full"]["times"])}


def report(result: dict, plots: Path | None = None) -> str:
    sizes = result["sizes"]
    lines = [f"llmzoo Llama ({sizes['num_layers']} layers, {sizes['embed_dim']} wide, vocab {sizes['vocab_size']}: "
             f"{result['full']['parameters'] / 1e6:.1f}M parameters), CPU fp32, one DPO step on {result['pairs']} pairs "
             f"x {result['seq']} tokens (chosen + rejected in one batch of {2 * result['pairs']} rows; the reference's "
             "forward without gradients, the policy's forward and backward, AdamW). Peak = the process's peak resident "
             "set during the step over the resident set before the model was built, after a warm-up step; each "
             f"setting in a fresh process. LoRA: r=8 on every projection ({result['lora']['trainable'] / 1e6:.2f}M "
             "trainable parameters), the reference its own weights with the adapters switched off; full: every weight "
             "in AdamW, the reference a frozen copy. Load average during the run: "
             f"{', '.join(f'{x:.1f}' for x in result['load'])} (a shared 2-core machine).", "",
             "| | peak MiB | median step ms | reference copy MiB |", "|---|---|---|---|"]
    for name, label in (("full", "full fine-tuning, frozen reference copy"), ("lora", "LoRA, adapters switched off")):
        lines.append(f"| {label} | {result[name]['peak'] / 2**20:.0f} | "
                     f"{1e3 * statistics.median(result[name]['times']):.0f} | "
                     f"{result[name]['reference_copy'] / 2**20:.0f} |")
    lines += ["", f"**LoRA / full: peak memory {result['memory_ratio']:.2f}x, step time {result['time_ratio']:.2f}x.** "
              "Full fine-tuning holds the weights twice (policy and reference), their gradients and AdamW's two "
              "moments; LoRA holds the weights once and the adapters' state."]
    return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, str, str, bool]]:
    return [("DPO step peak memory, LoRA (no reference copy) / full (frozen copy)", f"{result['memory_ratio']:.2f}x",
             "< 1x", result["memory_ratio"] < 1)]


def main(argv: list[str] | None = None) -> None:
    part_main(argv, sys.modules[__name__])


if __name__ == "__main__":
    main()
