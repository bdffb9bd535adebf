"""Peak memory of a training step with and without activation checkpointing (llmzoo's Llama, same weights).

    python -m benchmarks.memory
    python -m benchmarks.memory --batch 8 --seq 1024

A step = forward + next-token cross-entropy + backward. Its peak memory is what it adds to the memory held
before it, after a warm-up step on a tiny batch has allocated the gradients: activations and temporaries,
not weights or gradients. On CPU that is the growth of the peak resident set (``VmHWM``, restarted just
before the step through ``/proc/self/clear_refs``) over the resident set before it, each configuration in a
fresh process; on CUDA ``torch.cuda.max_memory_allocated`` over ``memory_allocated``. Ratio = without /
with checkpointing; the step-time cost of recomputing (with / without) is measured in turns on one model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import environment, interleaved, median_ms, ratio_text, ratios
from benchmarks.train_step import TINY, build, shape, step_fn

TITLE = "Training memory: activation checkpointing"
ROOT = Path(__file__).resolve().parents[1]


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def step_peak(model, batch: torch.Tensor, autocast: torch.dtype | None = None) -> int:
    """Bytes one training step of ``model`` on ``batch`` adds at its peak to what was held before it
    (the forward pass under autocast to ``autocast`` if given)."""

    def step(tokens):
        with torch.autocast(tokens.device.type, dtype=autocast, enabled=autocast is not None):
            loss = model.token_nll(tokens)[0]
        loss.backward()

    step(batch[:1, :17])  # warm-up: gradients allocated, kernels loaded
    cuda = batch.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident set restarts from the current one
        before = status_bytes("VmRSS")
    step(batch)
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return status_bytes("VmHWM") - before


def fresh_process_peaks(settings: list[dict]) -> list[int]:
    """:func:`step_peak` on CPU in a new Python process per setting (nothing earlier in a process distorts it),
    all at the same time: each process's peak memory is its own."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as many threads as this process
    commands = [[sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(setting)] for setting in settings]
    processes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
                 for command in commands]
    outputs = [process.communicate()[0] for process in processes]
    for command, process in zip(commands, processes):
        if process.returncode:
            raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}")
    return [int(output.split()[-1]) for output in outputs]


def child(checkpointing: bool, batch: int, seq: int, vocab: int, sizes: dict) -> None:
    _, model = build("llama", vocab, seq + 1, **sizes)
    del _
    model.hparams.activation_checkpointing = checkpointing
    torch.manual_seed(0)
    print(step_peak(model, torch.randint(0, vocab, (batch, seq + 1))))


def measure(quick: bool = False, batch: int = 8, seq: int = 256, vocab: int = 32000, repeats: int = 3) -> dict:
    sizes = TINY["llama"] if quick else {}
    if quick:
        batch, seq, vocab, repeats = 2, 64, 512, 1
    settings = [dict(checkpointing=flag, batch=batch, seq=seq, vocab=vocab, sizes=sizes) for flag in (False, True)]
    measured = fresh_process_peaks([setting for setting in settings for _ in range(repeats)])
    peaks = {"without": measured[:repeats], "with": measured[repeats:]}
    _, model = build("llama", vocab, seq + 1, **sizes)
    data = torch.randint(0, vocab, (batch, seq + 1))

    def step(checkpointing: bool):
        def run():
            model.hparams.activation_checkpointing = checkpointing
            step_fn(model, data, hf=False)()
        return run

    times = interleaved({"without": step(False), "with": step(True)}, repeats=5, warmup=1)
    return {"env": environment(), "quick": quick, "batch": batch, "seq": seq, "shape": shape(model), "peaks": peaks,
            "memory_ratio": ratios(peaks["without"], peaks["with"]), "times": times,
            "time_ratio": ratios(times["with"], times["without"])}


def report(result: dict, plots: Path | None = None) -> str:
    peaks = result["peaks"]
    mib = {name: [p / 2**20 for p in values] for name, values in peaks.items()}
    lines = [f"llmzoo Llama ({result['shape']}), CPU fp32, one training step on batch {result['batch']} x "
             f"{result['seq']} tokens. Peak = what the step adds to the memory held before it, after a warm-up step "
             "on a tiny batch allocated the gradients (so activations and temporaries, not weights or gradients): "
             "the growth of the process's peak resident set (`VmHWM`, restarted just before the step through "
             "`/proc/self/clear_refs`) over its resident set, in a fresh process per measurement "
             f"({len(peaks['with'])} per configuration, all at once: a process's peak is its own). Step time "
             f"measured in {len(result['times']['with'])} turns on one model.", "",
             "| | peak MiB (min-max) | median step ms |", "|---|---|---|"]
    for name in ("without", "with"):
        lines.append(f"| {name} checkpointing | {min(mib[name]):.0f}-{max(mib[name]):.0f} | "
                     f"{median_ms(result['times'][name]):.0f} |")
    lines += ["", f"Memory without / with checkpointing: **{ratio_text(result['memory_ratio'])}**; step time with / "
              f"without: {ratio_text(result['time_ratio'])} (recomputing each block's forward in the backward pass). "
              "With checkpointing a block keeps only its input for the backward pass; the rest is rebuilt one block "
              "at a time, so the peak holds the block inputs plus one block's activations (and the loss's "
              "chunk buffers) instead of every block's activations."]
    if plots is not None:
        from benchmarks.plots import ratio_bars

        lines += ["", ratio_bars(plots / "memory.png", ["memory saved (without / with)", "time cost (with / without)"],
                                 [result["memory_ratio"], result["time_ratio"]], "activation checkpointing",
                                 xlabel="ratio (x)")]
    return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, str, str, bool]]:
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="toy sizes (a smoke run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one measurement, in this fresh process
    args = parser.parse_args()
    if args.child:
        return child(**json.loads(args.child))
    from benchmarks.report import show

    show("memory", measure(args.quick, args.batch, args.seq, args.vocab, args.repeats))


if __name__ == "__main__":
    main()
