"""Decoding speed: llmzoo's ``generate`` vs Hugging Face ``generate``, same config and weights, same run.

    python -m benchmarks.decode                    # all three parts
    python -m benchmarks.decode --part hf          # llmzoo vs HF, batch 1 and 8, 256 new tokens
    python -m benchmarks.decode --part cache       # KV cache vs no cache, 512 new tokens
    python -m benchmarks.decode --part window      # Mistral's rolling buffer vs Llama's growing cache

Greedy decoding of a ~24M-parameter Llama (llama2.c's stories15M shape with grouped-query attention,
vocab 32000) on CPU in fp32, both models with SDPA attention. Prints tokens/s (new tokens per second of
the whole ``generate`` call, prompt included) and the ratios; targets: >= 2x HF at batch 1, >= 5x for the
KV cache at 512 tokens, Mistral's cache memory flat past its window.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import environment, interleaved, op_seconds, ratio_text, ratios
from benchmarks.train_step import SIZES, TINY, build, shape
from llmzoo.generation import generate

TITLE = "Decoding: llmzoo generate vs Hugging Face generate"
PROMPT = 16
TARGETS = {"hf": 2.0, "cache": 5.0}


def hf_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)


def versus_hf(batches=(1, 8), new_tokens: int = 256, vocab: int = 32000, repeats: int = 3, family: str = "llama",
              device: str = "cpu", dtype: torch.dtype = torch.float32, **sizes) -> dict:
    """Times of llmzoo's and HF's whole ``generate`` calls in turns at each batch size, whether their tokens
    agree, and (batch 1, on CPU) the seconds each call spends in matrix multiplies."""
    hf, ours = build(family, vocab, PROMPT + new_tokens, device, **sizes)
    hf, ours = hf.to(dtype).eval(), ours.to(dtype).eval()
    results = {"family": family, "new_tokens": new_tokens, "shape": shape(ours), "dtype": str(dtype)[6:],
               "weight_bytes": ours.num_parameters() * dtype.itemsize,
               "head_bytes": ours.lm_head.weight.numel() * dtype.itemsize, "batches": []}
    for batch in batches:
        prompt = torch.randint(0, vocab, (batch, PROMPT), device=device)
        calls = {"hf": lambda: hf_generate(hf, prompt, new_tokens),
                 "llmzoo": lambda: generate(ours, prompt, max_new_tokens=new_tokens)}
        same = torch.equal(calls["llmzoo"](), calls["hf"]())
        times = interleaved(calls, repeats=repeats, warmup=0)  # the equality check above was the warm-up
        row = dict(batch=batch, same_tokens=same, times=times, ratio=ratios(times["hf"], times["llmzoo"]))
        if batch == 1 and device == "cpu":
            row["matmul_seconds"] = {name: op_seconds(call)["matmul"] for name, call in calls.items()}
        results["batches"].append(row)
    return results


def cache_speedup(new_tokens: int = 512, vocab: int = 32000, repeats: int = 3, **sizes) -> dict:
    """llmzoo with its KV cache vs re-reading the whole sequence every step, in turns."""
    _, ours = build("llama", vocab, PROMPT + new_tokens, **sizes)
    ours.eval()
    prompt = torch.randint(0, vocab, (1, PROMPT))
    generate(ours, prompt, max_new_tokens=8)  # warm-up
    times = interleaved({"cache": lambda: generate(ours, prompt, max_new_tokens=new_tokens),
                         "no cache": lambda: generate(ours, prompt, max_new_tokens=new_tokens, use_cache=False)},
                        repeats=repeats, warmup=0)
    return {"new_tokens": new_tokens, "times": times, "ratio": ratios(times["no cache"], times["cache"])}


def cache_memory(lengths=(128, 512, 2048), window: int = 128, vocab: int = 32000, **sizes) -> dict:
    """KV-cache bytes held at the last step of generations of ``lengths`` new tokens, and the median decode
    time per token over the last 64 tokens, for Mistral (sliding window) and Llama of the same shape."""
    sizes = {**SIZES["llama"][1], **sizes}
    rows = []
    for name, extra in (("mistral", {"sliding_window": window}), ("llama", {})):
        _, model = build(name, vocab, PROMPT + max(lengths), **sizes, **extra)
        model.eval()
        prompt = torch.randint(0, vocab, (1, PROMPT))
        for length in lengths:
            held, stamps = [], []

            def watch(_, model=model, held=held, stamps=stamps):
                stamps.append(time.perf_counter())
                held.append(sum(b.attention.kv_cache.k.nbytes + b.attention.kv_cache.v.nbytes for b in model.blocks))

            generate(model, prompt, max_new_tokens=length, streamer=watch)
            recent = stamps[-65:]  # the last 64 steps (fewer in short runs)
            steps = [b - a for a, b in zip(recent, recent[1:])]
            rows.append({"model": name, "new_tokens": length, "bytes": held[-1],
                         "ms_per_token": 1e3 * statistics.median(steps)})
    attention = model.blocks[0].attention
    return {"window": window, "layers": len(model.blocks), "kv_heads": attention.num_kv_heads,
            "head_dim": attention.head_dim, "rows": rows}


def measure(quick: bool = False, parts=("hf", "cache", "window"), new_tokens: int = 256, repeats: int = 3) -> dict:
    result = {"env": environment(), "quick": quick}
    sizes, vocab = (TINY["llama"], 512) if quick else ({}, 32000)
    if quick:
        new_tokens, repeats = 32, 2
    if "hf" in parts:
        result["hf"] = versus_hf(new_tokens=new_tokens, vocab=vocab, repeats=repeats, **sizes)
    if "cache" in parts:
        result["cache"] = cache_speedup(64 if quick else 512, vocab, repeats, **sizes)
    if "window" in parts:
        result["window"] = cache_memory((16, 64) if quick else (128, 512, 2048), 16 if quick else 128, vocab, **sizes)
    return result


def report(result: dict, plots: Path | None = None) -> str:
    lines = []
    if "hf" in result:
        lines += versus_hf_report(result["hf"])
    if "cache" in result:
        c = result["cache"]
        speed = {name: c["new_tokens"] / statistics.median(t) for name, t in c["times"].items()}
        lines += ["", f"**KV cache vs none** (batch 1, {c['new_tokens']} new tokens, {len(c['times']['cache'])} "
                  f"turns): {speed['cache']:.0f} tokens/s with the cache, {speed['no cache']:.0f} without: "
                  f"**{ratio_text(c['ratio'])}** (target >= {TARGETS['cache']:g}x). Without a cache every step "
                  "re-reads the whole sequence; on a CPU those are efficient matrix-matrix products, which is why "
                  "the gap is not larger at this length."]
    if plots is not None and ("hf" in result or "cache" in result):
        from benchmarks.plots import ratio_bars

        bars = [(f"batch {b['batch']} vs HF", b["ratio"], TARGETS["hf"] if b["batch"] == 1 else None)
                for b in result.get("hf", {}).get("batches", [])]
        if "cache" in result:
            bars.append(("KV cache vs none", result["cache"]["ratio"], TARGETS["cache"]))
        labels, values, goals = (list(column) for column in zip(*bars))
        lines += ["", ratio_bars(plots / "decode.png", labels, values, "decoding speed-ups", goals)]
    if "window" in result:
        lines += window_report(result["window"], plots)
    return "\n".join(lines)


def versus_hf_report(r: dict, setup: str = "CPU fp32") -> list[str]:
    turns = len(r["batches"][0]["times"]["hf"])
    lines = [f"Greedy decoding, {setup}, {r['family']} ({r['shape']}; HF with its defaults: SDPA attention, "
             f"`DynamicCache`), a {PROMPT}-token random prompt, "
             f"{r['new_tokens']} new tokens. tokens/s = new tokens / wall time of the whole `generate` call "
             f"(prefill included); ratio = HF time / llmzoo time in each of {turns} turns, median and min. "
             "\"Same tokens\": both produced the same tokens in this run.", "",
             "| batch | HF tokens/s | llmzoo tokens/s | ratio (min) | same tokens |", "|---|---|---|---|---|"]
    for b in r["batches"]:
        speed = {name: b["batch"] * r["new_tokens"] / statistics.median(t) for name, t in b["times"].items()}
        lines.append(f"| {b['batch']} | {speed['hf']:.0f} | {speed['llmzoo']:.0f} | {ratio_text(b['ratio'])} | "
                     f"{'yes' if b['same_tokens'] else '**no**'} |")
    one = next((b for b in r["batches"] if b["batch"] == 1 and "matmul_seconds" in b), None)
    if one is None:
        return lines
    ms = {name: 1e3 * statistics.median(t) / r["new_tokens"] for name, t in one["times"].items()}
    matmul = {name: 1e3 * s / r["new_tokens"] for name, s in one["matmul_seconds"].items()}
    bound = ms["hf"] / matmul["llmzoo"]
    met = one["ratio"]["median"] >= TARGETS["hf"]
    short = f", still short of {TARGETS['hf']:g}x in {r['dtype']} on this CPU" if bound < TARGETS["hf"] else ""
    lines += ["", f"The target of {TARGETS['hf']:g}x at batch 1 is {'met' if met else '**not met**'}. At batch 1 a "
              "decode step is a matrix-vector product per weight matrix: it reads all "
              f"{r['weight_bytes'] / 1e6:.0f} MB of {r['dtype']} weights for every token, "
              f"{r['head_bytes'] / 1e6:.0f} MB of them the output head. llmzoo takes {ms['llmzoo']:.2f} ms per "
              f"token, {matmul['llmzoo']:.2f} ms of it in matrix multiplies (torch profiler over a whole call); HF "
              f"takes {ms['hf']:.2f} ms, {matmul['hf']:.2f} ms of it in matrix multiplies. A decode loop doing "
              f"nothing but llmzoo's matrix multiplies would be {bound:.2f}x HF{short}. What "
              "llmzoo saves is HF's per-step Python and tensor bookkeeping (separate q/k/v and gate/up projections, "
              "cache objects, mask construction, logits processors, stopping criteria); the rest of llmzoo's step is "
              "small ops (RMSNorms, RoPE, SDPA on one query), which only a compiled decode step (gpt-fast style) "
              "would remove, and llmzoo has none."]
    return lines


def window_report(w: dict, plots: Path | None) -> list[str]:
    lengths = sorted({r["new_tokens"] for r in w["rows"]})
    cell = {(r["model"], r["new_tokens"]): r for r in w["rows"]}
    lines = ["", f"**Sliding-window memory** (Mistral of the same shape with `sliding_window={w['window']}`, vs "
             "Llama): KV-cache bytes held at the last step and the median time per token over the last 64 tokens.",
             "", "| new tokens | Mistral cache | Llama cache | Mistral ms/token | Llama ms/token |",
             "|---|---|---|---|---|"]
    for n in lengths:
        mistral, llama = cell["mistral", n], cell["llama", n]
        lines.append(f"| {n} | {mistral['bytes'] / 2**20:.2f} MiB | {llama['bytes'] / 2**20:.2f} MiB | "
                     f"{mistral['ms_per_token']:.1f} | {llama['ms_per_token']:.1f} |")
    rolling = w["layers"] * w["kv_heads"] * w["head_dim"] * w["window"] * 2 * 4
    lines += ["", f"Mistral's rolling buffer holds {w['window']} slots however long the output ({w['layers']} layers x "
              f"{w['kv_heads']} kv heads x {w['head_dim']} dims x {w['window']} slots x k and v x 4 bytes = "
              f"{rolling / 2**20:.2f} MiB); Llama's preallocated cache grows with prompt + output."]
    if plots is not None:
        from benchmarks.plots import curves

        panels = {"KV cache (MiB)": {m: [cell[m, n]["bytes"] / 2**20 for n in lengths] for m in ("mistral", "llama")},
                  "ms per token (last 64)": {m: [cell[m, n]["ms_per_token"] for n in lengths]
                                             for m in ("mistral", "llama")}}
        lines += ["", curves(plots / "window.png", lengths, panels, "new tokens", "KV cache: sliding window vs none")]
    return lines


def cache_flat(w: dict) -> bool:
    """Whether Mistral's cache holds the same bytes at every length past its window."""
    return len({r["bytes"] for r in w["rows"] if r["model"] == "mistral" and r["new_tokens"] >= w["window"]}) == 1


def targets(result: dict) -> list[tuple[str, str, str, bool]]:
    rows = []
    for b in result.get("hf", {}).get("batches", []):
        if b["batch"] == 1:
            rows.append(("decoding vs HF generate, batch 1", ratio_text(b["ratio"]), f">= {TARGETS['hf']:g}x",
                         b["ratio"]["median"] >= TARGETS["hf"]))
    if "cache" in result:
        c = result["cache"]
        rows.append((f"KV cache vs none, {c['new_tokens']} tokens", ratio_text(c["ratio"]),
                     f">= {TARGETS['cache']:g}x", c["ratio"]["median"] >= TARGETS["cache"]))
    if "window" in result:
        flat = cache_flat(result["window"])
        rows.append(("Mistral KV cache past the window", "flat" if flat else "grows", "flat", flat))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["hf", "cache", "window", "all"], default="all")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="toy sizes (a smoke run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = ("hf", "cache", "window") if args.part == "all" else (args.part,)
    from benchmarks.report import show

    show("decode", measure(args.quick, parts, args.new_tokens, args.repeats))


if __name__ == "__main__":
    main()
