"""Decoding speed: llmzoo's ``generate`` vs Hugging Face ``generate``, same config and weights, same run; and
what weight-only quantization costs in quality.

    python -m benchmarks.decode                    # all four parts
    python -m benchmarks.decode --part hf          # HF vs llmzoo eager, compiled, int8, int4; batch 1 and 8, 256 tokens
    python -m benchmarks.decode --part cache       # KV cache vs no cache, 512 new tokens
    python -m benchmarks.decode --part window      # Mistral's rolling buffer vs Llama's growing cache
    python -m benchmarks.decode --part quality     # Tiny Shakespeare perplexity and greedy tokens, int8 / int4 vs fp32

Greedy decoding of a ~24M-parameter Llama (llama2.c's stories15M shape with grouped-query attention,
vocab 32000) on CPU in fp32, both models with SDPA attention. Prints tokens/s (new tokens per second of
the whole ``generate`` call, prompt included) and the ratios; targets at batch 1: >= 2x HF eager, >= 1.3x
compiled float32, >= 2.5x int8, >= 3x int4; >= 5x for the KV cache at 512 tokens; Mistral's cache memory flat
past its window; perplexity within +1% (int8) and +5% (int4, group 32) of float32's, greedy int8 tokens equal
to float32's for >= 95% of 256. The physical limit (measured memory bandwidth / bytes a step reads) is reported
beside the speeds.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import environment, interleaved, op_seconds, ratio_text, ratios, timeit
from benchmarks.shakespeare import SHAKESPEARE
from benchmarks.train_step import SIZES, TINY, build, shape
from llmzoo.generation import generate
from llmzoo.quantize import quantize

TITLE = "Decoding: llmzoo generate vs Hugging Face generate"
PROMPT = 16
TARGETS = {"hf": 2.0, "cache": 5.0, "compiled": 1.3, "int8": 2.5, "int4": 3.0}


def hf_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)


VARIANTS = {  # llmzoo's ways to decode: (weight quantization, compiled decode step)
    "llmzoo": (None, False), "compiled": (None, True), "int8": ("int8", True), "int4": ("int4", True)}
GROUP_SIZE = 32  # of int4
PROMPTS = 5  # greedy texts of the quality part, each after 16 characters of the validation text


def versus_hf(batches=(1, 8), new_tokens: int = 256, vocab: int = 32000, repeats: int = 3, family: str = "llama",
              device: str = "cpu", dtype: torch.dtype = torch.float32, variants=("llmzoo",),
              compile: bool | str = True, **sizes) -> dict:
    """Times of HF's and llmzoo's whole ``generate`` calls (each of ``variants``: eager float, compiled float,
    compiled int8 / int4) in turns at each batch size, whether llmzoo's tokens equal HF's and how many of each
    variant's agree with them, the bytes a decode step reads, and (batch 1, on CPU) the seconds the eager call
    spends in matrix multiplies. ``compile``: what ``generate(compile=)`` gets for the compiled variants."""
    hf, ours = build(family, vocab, PROMPT + new_tokens, device, **sizes)
    hf, ours = hf.to(dtype).eval(), ours.to(dtype).eval()
    models = {name: ours if VARIANTS[name][0] is None else quantize(copy.deepcopy(ours), VARIANTS[name][0], GROUP_SIZE)
              for name in variants}
    results = {"family": family, "new_tokens": new_tokens, "shape": shape(ours), "dtype": str(dtype)[6:],
               "weight_bytes": ours.num_parameters() * dtype.itemsize,
               "head_bytes": ours.lm_head.weight.numel() * dtype.itemsize, "variants": list(variants),
               "step_bytes": {name: step_bytes(model, PROMPT + new_tokens) for name, model in models.items()},
               "batches": []}
    for batch in batches:
        prompt = torch.randint(0, vocab, (batch, PROMPT), device=device)
        calls = {"hf": lambda: hf_generate(hf, prompt, new_tokens)}
        for name in variants:
            options = dict(max_new_tokens=new_tokens, compile=compile if VARIANTS[name][1] else False)
            calls[name] = lambda model=models[name], options=options: generate(model, prompt, **options)
        outputs = {name: call() for name, call in calls.items()}  # the warm-up, and the compilations
        agreement = {name: (out[:, PROMPT:] == outputs["hf"][:, PROMPT:]).float().mean().item()
                     for name, out in outputs.items() if name != "hf"}
        times = interleaved(calls, repeats=repeats, warmup=0)
        row = dict(batch=batch, same_tokens=torch.equal(outputs["llmzoo"], outputs["hf"]), agreement=agreement,
                   times=times, ratio=ratios(times["hf"], times["llmzoo"]),
                   ratios={name: ratios(times["hf"], times[name]) for name in variants})
        if batch == 1 and device == "cpu":
            row["matmul_seconds"] = {name: op_seconds(calls[name])["matmul"] for name in ("hf", "llmzoo")}
        results["batches"].append(row)
    if device == "cpu":
        results["bandwidth"] = memory_bandwidth()
    return results


def step_bytes(model, length: int) -> int:
    """Bytes one decode step of one row reads at least: every weight but the embedding (one row of it), as held
    (quantized weights with their scales), and the whole KV cache of ``length`` slots (the compiled step reads all)."""
    embedding = model.embed.weight.nbytes if model.lm_head.weight is not model.embed.weight else 0
    attention = model.blocks[0].attention
    cache = 2 * len(model.blocks) * attention.num_kv_heads * attention.head_dim * length * model.embed.weight.itemsize
    return model.memory_footprint()["held"] - embedding + cache


def memory_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """This machine's memory read bandwidth in bytes/s: the best of ``repeats`` sums of a float32 tensor far larger
    than the caches, with torch's threads."""
    x = torch.ones(megabytes * 2**20 // 4)
    return x.nbytes / min(timeit(lambda: x.sum(), repeats=repeats, warmup=1))


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


def quality(corpus: str | Path = SHAKESPEARE, steps: int = 1000, context: int = 256, new_tokens: int = 256,
            batch: int = 12, val_chars: int | None = None, lora_steps: int = 200) -> dict:
    """Quantization vs float32 on a model trained here: a character-level Llama (4 layers, 128 wide, context
    ``context``) trained ``steps`` steps on the first 90% of Tiny Shakespeare, then the perplexity of the last 10%
    (all of it, or its first ``val_chars``, in windows of ``context``) and ``new_tokens`` greedy tokens after the
    first 16 characters of it, in float32, int8 and int4 (group 32); and LoRA fine-tuning of it on a float32 and on
    an int8 base (:func:`lora_on_quantized_base`)."""
    from llmzoo import Llama
    from llmzoo.models.base import warmup_cosine

    text = Path(corpus).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:][:val_chars]
    torch.manual_seed(1337)
    model = Llama(vocab_size=len(chars), embed_dim=128, num_heads=4, num_kv_heads=2, num_layers=4,
                  max_position_embeddings=context + new_tokens + 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, 100, steps, 0.1))
    start = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, len(train) - context - 1, (batch,))
        loss = model.token_nll(torch.stack([train[i:i + context + 1] for i in starts.tolist()]))[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    train_seconds = time.perf_counter() - start
    model.eval()
    windows = val[:len(val) // context * context].view(-1, context)
    prompts = torch.stack([val[i:i + 16] for i in range(0, len(val) - 16, (len(val) - 16) // PROMPTS)][:PROMPTS])
    models = {"fp32": model, "int8": quantize(copy.deepcopy(model), "int8"),
              "int4": quantize(copy.deepcopy(model), "int4", GROUP_SIZE),
              "bf16": copy.deepcopy(model).to(torch.bfloat16)}  # the kernels' activation dtype, float weights
    result = {"steps": steps, "context": context, "new_tokens": new_tokens, "train_seconds": train_seconds,
              "val_tokens": windows.numel() - windows.shape[0], "shape": shape(model), "ppl": {}, "agreement": {},
              "agreement_per_prompt": {}, "decisions": {}}
    greedy = {}
    for name, m in models.items():
        with torch.no_grad():  # the logits of the model's own head (the fused loss takes a float head weight)
            nll = sum(torch.nn.functional.cross_entropy(m(chunk[:, :-1]).flatten(0, 1).float(), chunk[:, 1:].flatten(),
                                                        reduction="sum").item() for chunk in windows.split(32))
        result["ppl"][name] = math.exp(nll / result["val_tokens"])
        greedy[name] = torch.stack([generate(m, p[None], max_new_tokens=new_tokens)[0, 16:] for p in prompts])
        result["agreement_per_prompt"][name] = (greedy[name] == greedy["fp32"]).float().mean(1).tolist()
        result["agreement"][name] = (greedy[name] == greedy["fp32"]).float().mean().item()
        with torch.no_grad():  # each next-token decision on float32's own text: no flip is carried forward
            path = torch.cat([prompts, greedy["fp32"]], 1)
            choices = m(path[:, :-1])[:, prompts.shape[1] - 1:].argmax(-1)
        result["decisions"][name] = (choices == greedy["fp32"]).float().mean().item()
    result["text"] = {name: "".join(chars[i] for i in tokens[0].tolist()) for name, tokens in greedy.items()}
    result["qlora"] = lora_on_quantized_base(model, train, windows, lora_steps, context, batch)
    return result


def lora_on_quantized_base(model, train: torch.Tensor, windows: torch.Tensor, steps: int, context: int,
                           batch: int) -> dict:
    """QLoRA vs LoRA: the same LoRA fine-tuning (r 8 on every projection, ``steps`` more steps on the training text,
    the same batches) on the trained model with float32 weights and with int8 weights (all but the head), then the
    validation loss of each and the bytes of its frozen base weights."""
    from llmzoo.lora import add_lora

    result = {"steps": steps}
    for name, mode in (("fp32", None), ("int8", "int8")):
        tuned = add_lora(copy.deepcopy(model), r=8, alpha=16, targets=["q", "k", "v", "out", "gate", "up", "down"])
        if mode:
            quantize(tuned, mode, head=False)
        adapters = [p for p in tuned.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(adapters, lr=2e-3, weight_decay=0.0)
        generator = torch.Generator().manual_seed(7)
        tuned.train()
        for _ in range(steps):
            starts = torch.randint(0, len(train) - context - 1, (batch,), generator=generator)
            loss = tuned.token_nll(torch.stack([train[i:i + context + 1] for i in starts.tolist()]))[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        tuned.eval()
        with torch.no_grad():
            nll = sum(tuned.token_nll(chunk, reduction="sum")[0].item() for chunk in windows.split(32))
        held = tuned.memory_footprint()["held"] - sum(p.nbytes for p in adapters)
        result[name] = {"val_loss": nll / (windows.numel() - windows.shape[0]), "base_bytes": held}
    return result


def measure(quick: bool = False, parts=("hf", "cache", "window", "quality"), new_tokens: int = 256,
            repeats: int = 3) -> dict:
    result = {"env": environment(), "quick": quick}
    sizes, vocab = (TINY["llama"], 512) if quick else ({}, 32000)
    if quick:
        new_tokens, repeats = 32, 2
    if "hf" in parts:
        print("  decoding vs HF generate: eager, compiled, int8, int4", flush=True)
        result["hf"] = versus_hf(new_tokens=new_tokens, vocab=vocab, repeats=repeats, variants=tuple(VARIANTS),
                                 compile="aot_eager" if quick else True, **sizes)
    if "cache" in parts:
        result["cache"] = cache_speedup(64 if quick else 512, vocab, repeats, **sizes)
    if "window" in parts:
        result["window"] = cache_memory((16, 64) if quick else (128, 512, 2048), 16 if quick else 128, vocab, **sizes)
    if "quality" in parts and SHAKESPEARE.exists():
        print("  quantized vs float32 on Tiny Shakespeare (training a model first)", flush=True)
        result["quality"] = quality(steps=20 if quick else 1000, context=64 if quick else 256,
                                    new_tokens=32 if quick else 256, val_chars=2048 if quick else None,
                                    lora_steps=5 if quick else 200)
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

        bars = [(f"{LABELS[name]}, batch {b['batch']} vs HF", ratio,
                 TARGETS["hf" if name == "llmzoo" else name] if b["batch"] == 1 else None)
                for b in result.get("hf", {}).get("batches", [])
                for name, ratio in b.get("ratios", {"llmzoo": b["ratio"]}).items()]
        if "cache" in result:
            bars.append(("KV cache vs none", result["cache"]["ratio"], TARGETS["cache"]))
        labels, values, goals = (list(column) for column in zip(*bars))
        lines += ["", ratio_bars(plots / "decode.png", labels, values, "decoding speed-ups", goals)]
    if "window" in result:
        lines += window_report(result["window"], plots)
    if "quality" in result:
        lines += quality_report(result["quality"])
    return "\n".join(lines)


LABELS = {"llmzoo": "llmzoo", "compiled": "compiled", "int8": "compiled int8", "int4": f"compiled int4 (g{GROUP_SIZE})"}


def versus_hf_report(r: dict, setup: str = "CPU fp32") -> list[str]:
    turns = len(r["batches"][0]["times"]["hf"])
    variants = r.get("variants", ["llmzoo"])
    lines = [f"Greedy decoding, {setup}, {r['family']} ({r['shape']}; HF with its defaults: SDPA attention, "
             f"`DynamicCache`), a {PROMPT}-token random prompt, "
             f"{r['new_tokens']} new tokens. tokens/s = new tokens / wall time of the whole `generate` call "
             f"(prefill included); ratio = HF time / llmzoo time in each of {turns} turns, median and min. "
             "\"Same tokens\": llmzoo's eager tokens equal HF's in this run."]
    if len(variants) > 1:
        lines[-1] += (" The other columns are llmzoo's `generate(compile=True)` (the static-shape decode step compiled "
                      f"by inductor) in float32, and with int8 / int4 (group {GROUP_SIZE}) weights "
                      "(`llmzoo.quantize`); *agree* = the share of their new tokens equal to HF's (quantized weights "
                      "change some: on this random-weight model the logits are nearly tied, see the quality "
                      "section below for a trained one). Compilation is done before the turns (the first call).")
    header = "| batch | HF tokens/s | " + " | ".join(f"{LABELS[v]} tokens/s | ratio (min)" for v in variants)
    header += " | same tokens |" + "".join(f" {LABELS[v]} agree |" for v in variants[1:])
    lines += ["", header, "|---" * (3 + 2 * len(variants) + len(variants) - 1) + "|"]
    for b in r["batches"]:
        speed = {name: b["batch"] * r["new_tokens"] / statistics.median(t) for name, t in b["times"].items()}
        row = f"| {b['batch']} | {speed['hf']:.0f} | "
        row += " | ".join(f"{speed[v]:.0f} | {ratio_text(b.get('ratios', {}).get(v, b['ratio']))}" for v in variants)
        row += f" | {'yes' if b['same_tokens'] else '**no**'} |"
        row += "".join(f" {b['agreement'][v]:.0%} |" for v in variants[1:])
        lines.append(row)
    if "bandwidth" in r and len(variants) > 1:
        lines += limit_report(r)
    one = next((b for b in r["batches"] if b["batch"] == 1 and "matmul_seconds" in b), None)
    if one is None:
        return lines
    ms = {name: 1e3 * statistics.median(t) / r["new_tokens"] for name, t in one["times"].items()}
    matmul = {name: 1e3 * s / r["new_tokens"] for name, s in one["matmul_seconds"].items()}
    bound = ms["hf"] / matmul["llmzoo"]
    lines += ["", "At batch 1 a decode step is a matrix-vector product per weight matrix: it reads all "
              f"{r['weight_bytes'] / 1e6:.0f} MB of {r['dtype']} weights for every token, "
              f"{r['head_bytes'] / 1e6:.0f} MB of them the output head. Eager llmzoo takes {ms['llmzoo']:.2f} ms per "
              f"token, {matmul['llmzoo']:.2f} ms of it in matrix multiplies (torch profiler over a whole call); HF "
              f"takes {ms['hf']:.2f} ms, {matmul['hf']:.2f} ms of it in matrix multiplies. A float32 decode loop doing "
              f"nothing but those matrix multiplies would be {bound:.2f}x HF: the most a compiled float32 step can "
              "gain by removing the small ops between them (RMSNorms, RoPE, SDPA on one query, the per-step "
              "bookkeeping). Beyond that only fewer bytes per weight help: int8 reads a quarter of them, int4 an "
              "eighth (plus their scales)."]
    return lines


def limit_report(r: dict) -> list[str]:
    """The physical limit at batch 1: measured bandwidth / bytes a step reads, and how close each variant gets."""
    one = next(b for b in r["batches"] if b["batch"] == 1)
    bandwidth = r["bandwidth"]
    lines = ["", f"**The physical limit** at batch 1: this machine reads memory at {bandwidth / 1e9:.1f} GB/s (the "
             "best of 7 sums of a 512 MiB float32 tensor, torch's threads), and a decode step must read every weight "
             "but the embedding (one row) and the KV cache once, so tokens/s cannot exceed bandwidth / bytes per "
             "step. At batch 8 the same bytes serve 8 tokens.", "",
             "| variant | bytes per step | limit tokens/s | measured tokens/s | bytes/s read | share of the limit |",
             "|---|---|---|---|---|---|"]
    for name in r["variants"]:
        step = r["step_bytes"][name]
        speed = r["new_tokens"] / statistics.median(one["times"][name])
        lines.append(f"| {LABELS[name]} | {step / 1e6:.1f} MB | {bandwidth / step:.0f} | {speed:.0f} | "
                     f"{speed * step / 1e9:.1f} GB/s | {speed * step / bandwidth:.0%} |")
    return lines


def quality_report(q: dict) -> list[str]:
    names = {"fp32": "float32", "int8": "int8", "int4": f"int4 (group {GROUP_SIZE})",
             "bf16": "bfloat16 (float weights, no quantization)"}
    per_prompt, decisions = q.get("agreement_per_prompt", {}), q.get("decisions", {})
    rows = [f"| {label} | {q['ppl'][name]:.4f} | {q['ppl'][name] / q['ppl']['fp32'] - 1:+.2%} | "
            f"{q['agreement'][name]:.0%} | {', '.join(f'{a:.0%}' for a in per_prompt.get(name, []))} | "
            f"{format(decisions[name], '.1%') if name in decisions else ''} |"
            for name, label in names.items() if name in q["ppl"]]
    lora = q.get("qlora")
    if lora:
        rows += ["", f"**LoRA on a quantized base** (QLoRA-style): LoRA adapters (r 8, alpha 16, on q, k, v, out, gate, "
                 f"up, down) fine-tuned {lora['steps']} more steps on the same text, the same batches, on the float32 "
                 "model and on its int8 copy (every projection but the head quantized, frozen; only the adapters "
                 "train, the gradient reaching the activations through the dequantized weights).", "",
                 "| base | validation loss | vs float32 base | frozen base weights |", "|---|---|---|---|",
                 *(f"| {name} | {run['val_loss']:.4f} | {run['val_loss'] / lora['fp32']['val_loss'] - 1:+.2%} "
                   f"| {run['base_bytes'] / 2**20:.2f} MiB |" for name, run in lora.items() if name != "steps")]
    return ["", f"**Quantization quality** on a model trained here: a character-level Llama ({q['shape']}) trained "
            f"{q['steps']} steps (batches of 12 x {q['context']} characters, AdamW 1e-3, cosine; "
            f"{q['train_seconds']:.0f} s) on the first 90% of Tiny Shakespeare; perplexity of the last 10% "
            f"({q['val_tokens']} predicted characters, windows of {q['context']}) and {q['new_tokens']} greedy "
            f"characters after 16 of it (at {PROMPTS} places), with the same weights in float32, int8 and int4 (group "
            f"{GROUP_SIZE}), and the float weights in bfloat16 (the activations' dtype of the quantized kernels); "
            "*agree* = the share of greedy characters equal to float32's, position by position (after a first "
            "difference the texts go their own ways), over all prompts and for each; *same choice* = the share of "
            "next-token choices equal to float32's when both read float32's greedy text (a choice at a time, so "
            "one near tie costs one choice, not the rest of the text).", "",
            "| weights | perplexity | vs float32 | greedy agree | per prompt | same choice |", "|---|---|---|---|---|---|",
            *rows]


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
            for name, ratio in b.get("ratios", {}).items():
                if name in TARGETS:
                    rows.append((f"decoding vs HF generate, batch 1, {LABELS[name]}", ratio_text(ratio),
                                 f">= {TARGETS[name]:g}x", ratio["median"] >= TARGETS[name]))
    if "quality" in result:
        q = result["quality"]
        for name, bound in (("int8", 0.01), ("int4", 0.05)):
            rise = q["ppl"][name] / q["ppl"]["fp32"] - 1
            rows.append((f"Shakespeare perplexity, {LABELS[name].removeprefix('compiled ')} vs float32", f"{rise:+.2%}",
                         f"<= +{bound:.0%}", rise <= bound))
        rows.append((f"greedy int8 tokens equal to float32's, {PROMPTS} x {q['new_tokens']}",
                     f"{q['agreement']['int8']:.0%}", ">= 95%", q["agreement"]["int8"] >= 0.95))
        if "decisions" in q:
            rows.append((f"int8 next-token choices equal to float32's on its greedy text, {PROMPTS} x "
                         f"{q['new_tokens']}", f"{q['decisions']['int8']:.1%}", "(reported)", True))
        if "qlora" in q:
            rise = q["qlora"]["int8"]["val_loss"] / q["qlora"]["fp32"]["val_loss"] - 1
            rows.append(("LoRA val loss, int8 base vs float32 base", f"{rise:+.2%}", "<= +2%", rise <= 0.02))
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
    parser.add_argument("--part", choices=["hf", "cache", "window", "quality", "all"], default="all")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="toy sizes (a smoke run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = ("hf", "cache", "window", "quality") if args.part == "all" else (args.part,)
    from benchmarks.report import show

    show("decode", measure(args.quick, parts, args.new_tokens, args.repeats))


if __name__ == "__main__":
    main()
