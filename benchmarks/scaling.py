"""How a training step's time grows with the sequence length and with the width: llmzoo vs Hugging Face Llama.

    python -m benchmarks.scaling

Sequence lengths 128 to 2048 at a fixed number of tokens per step (the batch shrinks as the length grows);
widths 128 to 768 (64-dim heads, half as many kv heads, SwiGLU 8/3 wide) at batch 8 x 256. The step is
the training section's (forward + next-token cross-entropy + backward, CPU fp32); ratio = HF step time /
llmzoo step time in each turn.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import environment, median_ms, ratio_text
from benchmarks.train_step import TINY, compare

TITLE = "Scaling: step time vs sequence length and width"


def width_sizes(dim: int, head_dim: int = 64) -> dict:
    """HF Llama config entries of a model ``dim`` wide: ``dim / head_dim`` heads, half as many kv heads."""
    heads = dim // head_dim
    return dict(hidden_size=dim, intermediate_size=8 * dim // 3 // 32 * 32, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2))


def measure(quick: bool = False, seqs=(128, 256, 512, 1024, 2048), tokens: int = 4096, widths=(128, 256, 512, 768),
            vocab: int = 32000, repeats: int = 5) -> dict:
    head_dim, base = 64, {}
    if quick:
        seqs, tokens, widths, vocab, repeats, head_dim, base = (16, 32, 64), 128, (32, 64), 512, 2, 16, TINY["llama"]
    by_seq = [compare("llama", tokens // seq, seq, vocab, repeats, warmup=1, **base) for seq in seqs]
    by_width = [compare("llama", 8 if not quick else 2, 256 if not quick else 32, vocab, repeats, warmup=1,
                        **{**base, **width_sizes(dim, head_dim)}) for dim in widths]
    return {"env": environment(), "quick": quick, "tokens": tokens, "by_seq": by_seq, "widths": list(widths),
            "by_width": by_width}


def table(rows: list[dict], key: str, values: list, shapes: bool = False) -> list[str]:
    model = " model |" if shapes else ""
    lines = [f"| {key} | batch x tokens |{model} HF median ms | llmzoo median ms | ratio (min) |",
             "|---|---|---|---|---|" + ("---|" if shapes else "")]
    for value, r in zip(values, rows):
        lines.append(f"| {value} | {r['batch']} x {r['seq']} |" + (f" {r['shape']} |" if shapes else "")
                     + f" {median_ms(r['times']['hf']):.0f} | {median_ms(r['times']['llmzoo']):.0f} | "
                     f"{ratio_text(r['ratio'])} |")
    return lines


def growth(rows: list[dict]) -> str:
    """How much the step time and the ratio change from the first point to the last."""
    ms = {name: [statistics.median(r["times"][name]) for r in rows] for name in ("hf", "llmzoo")}
    return (f"the step time grows {ms['llmzoo'][-1] / ms['llmzoo'][0]:.1f}x for llmzoo and "
            f"{ms['hf'][-1] / ms['hf'][0]:.1f}x for HF, and the median ratio goes from "
            f"{rows[0]['ratio']['median']:.2f}x to {rows[-1]['ratio']['median']:.2f}x")


def plot(plots: Path, name: str, x: list, rows: list[dict], xlabel: str, title: str) -> str:
    from benchmarks.plots import curves

    panels = {"median step time (ms)": {model: [median_ms(r["times"][key]) for r in rows]
                                        for model, key in (("HF", "hf"), ("llmzoo", "llmzoo"))},
              "HF time / llmzoo time (x)": {stat: [r["ratio"][stat] for r in rows] for stat in ("median", "min")}}
    return curves(plots / name, x, panels, xlabel, title)


def report(result: dict, plots: Path | None = None) -> str:
    seqs = [r["seq"] for r in result["by_seq"]]
    seq_rows, width_rows = result["by_seq"], result["by_width"]
    lines = [f"The training step of the training section (CPU fp32, same config and weights), "
             f"{len(seq_rows[0]['times']['hf'])} turns after a warm-up at each point.", "",
             f"**Sequence length**: {seq_rows[0]['shape']}, {result['tokens']} tokens per step at every length "
             "(the batch shrinks as the sequences grow, so the matrix multiplies are the same work at every length "
             f"and what grows is attention, whose work per token grows with the length). From {seqs[0]} to "
             f"{seqs[-1]} tokens {growth(seq_rows)}.", "", *table(seq_rows, "length", seqs)]
    if plots is not None:
        lines += ["", plot(plots, "scaling_seq.png", seqs, seq_rows, "sequence length (tokens per step fixed)",
                           "training step vs sequence length")]
    lines += ["", f"**Width** at batch {width_rows[0]['batch']} x {width_rows[0]['seq']}: from width "
              f"{result['widths'][0]} to {result['widths'][-1]} {growth(width_rows)}. The blocks' matrix multiplies "
              "grow with the square of the width; the output head and loss (width x vocabulary) and the per-op "
              "overheads, where llmzoo saves time, grow at most linearly.", "",
              *table(width_rows, "width", result["widths"], shapes=True)]
    if plots is not None:
        lines += ["", plot(plots, "scaling_width.png", result["widths"], width_rows, "width (embed_dim)",
                           "training step vs width")]
    return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, str, str, bool]]:
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="toy sizes (a smoke run)")
    args = parser.parse_args()
    from benchmarks.report import show

    show("scaling", measure(args.quick, repeats=args.repeats))


if __name__ == "__main__":
    main()
