"""The architecture study: every architecture of the zoo trained the same way, compared on validation bits per byte.

    python -m benchmarks --part architectures              # the CPU study (about 30 min on 2 cores), docs/architectures.md
    python -m benchmarks.architectures --setting gpu       # the larger setting, on a GPU (about an hour)
    python -m benchmarks.architectures --quick --out /tmp/a   # a smoke run: toy sizes, a few seconds
    python -m benchmarks.architectures --render            # rewrite the page from the stored results
    python -m benchmarks.architectures --speeds            # time the speeds again (a quiet machine), keep the rest

Same corpus (Tiny Shakespeare, else a slice of the standard library's code), same byte-level BPE tokenizer, same
token budget, same optimizer recipe; the widths, depths and heads are the same too, and each architecture's MLP
width (``ffn_dim``) is chosen so that its non-embedding parameters (the blocks and the final norm: neither the
tied embedding/output matrix nor learned positions) match GPT-2's with ``ffn_dim = 4 * embed_dim``. Mixtral
matches with its active parameters (router + ``experts_per_token`` of its experts); its total is reported. Every
run is seeded (weights and batches); each setting runs several seeds.

Writes ``<out>/architectures.md``, ``<out>/architectures/results.json`` and its figures; ``--out`` defaults to
docs/ (``--quick``: runs/benchmarks-quick/).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from benchmarks.common import environment, interleaved, ratio_text, ratios

TITLE = "Architectures side by side: validation bits per byte at matched parameters"
ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(os.environ.get("LLMZOO_SHAKESPEARE", ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
ORDER = ["Transformer", "GPT", "GPT2", "Llama", "Mistral", "Mixtral", "Qwen2", "Qwen3"]  # oldest design first
REFERENCE = "GPT2"  # whose non-embedding parameters (ffn_dim = 4 * embed_dim) every other architecture matches

RECIPE = dict(learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.99), clip=1.0)  # AdamW, warmup, cosine to lr / 10
SETTINGS = {
    # ~30 min on 2 CPU cores: 24 runs, two at a time with one torch thread each
    "cpu": dict(embed_dim=128, num_layers=4, num_heads=4, seq_len=128, batch_size=16, bpe_vocab_size=1024,
                steps=200, warmup_steps=20, eval_every=25, curve_batches=8, seeds=[0, 1, 2], jobs=2, threads=1,
                num_experts=4, experts_per_token=2, device="cpu"),
    # a GPU: ~26M-token budget, 24 runs one after another
    "gpu": dict(embed_dim=512, num_layers=8, num_heads=8, seq_len=512, batch_size=32, bpe_vocab_size=8192,
                steps=1600, warmup_steps=100, eval_every=100, curve_batches=16, seeds=[0, 1, 2], jobs=1, threads=None,
                num_experts=8, experts_per_token=2, device="cuda"),
    # --quick: toy sizes, in this process, on the first 30,000 characters of the corpus
    "quick": dict(embed_dim=32, num_layers=1, num_heads=2, seq_len=32, batch_size=4, bpe_vocab_size=300, steps=4,
                  warmup_steps=1, eval_every=2, curve_batches=2, seeds=[0], jobs=0, threads=1, num_experts=4,
                  experts_per_token=2, device="cpu", speed_turns=2, corpus_chars=30_000),
}
PROMPT_TOKENS = 8  # decode speed: greedy from this many validation tokens to the end of the context, batch 1


# ------------------------------------------------------------------------------------------------ the models
def base_kwargs(name: str, setting: dict, vocab_size: int) -> dict:
    """What every architecture gets (the recipe, the shape) plus what defines the family at this size: grouped
    kv heads (half the query heads) for the Llama family, Mistral's window (half the context), Mixtral's experts."""
    s = setting
    kwargs = dict(vocab_size=vocab_size, embed_dim=s["embed_dim"], num_heads=s["num_heads"],
                  num_layers=s["num_layers"], max_position_embeddings=s["seq_len"], dropout=0.0,
                  tie_word_embeddings=True, learning_rate=RECIPE["learning_rate"],
                  weight_decay=RECIPE["weight_decay"], betas=RECIPE["betas"], warmup_steps=s["warmup_steps"],
                  lr_decay_steps=s["steps"], min_learning_rate=RECIPE["learning_rate"] / 10)
    if name not in ("Transformer", "GPT", "GPT2"):
        kwargs["num_kv_heads"] = max(1, s["num_heads"] // 2)
    if name == "Mistral":
        kwargs["sliding_window"] = s["seq_len"] // 2
    if name == "Mixtral":
        kwargs.update(num_experts=s["num_experts"], experts_per_token=s["experts_per_token"])
    return kwargs


def parameter_counts(model) -> dict[str, int]:
    """``non_embedding``: the blocks' and the final norm's parameters; ``active``: those a token goes through (an
    MoE layer's router and ``experts_per_token`` of its experts); ``total``: every parameter."""
    from llmzoo.layers import MoE

    non_embedding = sum(p.numel() for part in (model.blocks, model.norm) for p in part.parameters())
    idle = sum((m.gate_up.numel() + m.down.numel()) * (m.num_experts - m.experts_per_token) // m.num_experts
               for m in model.modules() if isinstance(m, MoE))
    return {"non_embedding": non_embedding, "active": non_embedding - idle, "total": model.num_parameters()}


def matched_shapes(setting: dict, vocab_size: int) -> dict[str, dict]:
    """Per architecture: its constructor's kwargs, with the ``ffn_dim`` (a multiple of 8) whose active
    non-embedding parameters come closest to the reference's, and its parameter counts."""
    from llmzoo import ARCHITECTURES
    from llmzoo.models.build import empty_model

    def counts(name: str, ffn_dim: int) -> dict[str, int]:
        kwargs = {**base_kwargs(name, setting, vocab_size), "ffn_dim": ffn_dim}
        return parameter_counts(empty_model(ARCHITECTURES[name], kwargs))

    def linear(name: str) -> Callable[[int], dict[str, int]]:  # every count is linear in ffn_dim: two models tell
        low, high = counts(name, 8), counts(name, 16)
        return lambda f: {key: low[key] + (f - 8) // 8 * (high[key] - low[key]) for key in low}

    target = linear(REFERENCE)(4 * setting["embed_dim"])["active"]
    shapes = {}
    for name in ORDER:
        at = linear(name)
        ffn_dim = 8 * max(1, round(1 + (target - at(8)["active"]) / (at(16)["active"] - at(8)["active"])))
        shapes[name] = {"kwargs": {**base_kwargs(name, setting, vocab_size), "ffn_dim": ffn_dim}, "params": at(ffn_dim)}
    return shapes


# ------------------------------------------------------------------------------------------------ one run
def peak_tracker(device: str):
    """``start()`` before training, ``peak()`` after: the bytes training added at its peak to what was held at
    the start (gradients, AdamW state, activations, temporaries). CPU: the peak resident set (``VmHWM``,
    restarted through ``/proc/self/clear_refs``) over the resident set; CUDA: ``max_memory_allocated`` over
    ``memory_allocated``."""
    from benchmarks.memory import status_bytes

    held = {}

    def start() -> None:
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held["before"] = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            held["before"] = status_bytes("VmRSS")

    def peak() -> int:
        if device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - held["before"]
        return status_bytes("VmHWM") - held["before"]

    return start, peak


@torch.no_grad()
def val_bpb(model, batches: list[torch.Tensor], token_bytes: torch.Tensor) -> tuple[float, float]:
    """Bits per byte and nats per token of ``model`` on ``batches`` (token windows ``[B, T + 1]``)."""
    model.eval()
    nats = tokens = num_bytes = 0
    for batch in batches:
        nll, count, _ = model.token_nll(batch.to(model.device), reduction="sum")
        nats, tokens = nats + float(nll), tokens + int(count)
        num_bytes += int(token_bytes[batch[:, 1:]].sum())
    model.train()
    return nats / math.log(2) / num_bytes, nats / tokens


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_run(name: str, kwargs: dict, setting: dict, seed: int, corpus: str, cache_dir: str) -> dict:
    """Train one architecture at one seed: its validation curve, final bits per byte, own speed and peak memory."""
    from llmzoo import ARCHITECTURES

    device, s = setting["device"], setting
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    torch.manual_seed(seed)
    data = study_data(s, corpus, cache_dir, seed)
    model = ARCHITECTURES[name](**kwargs).to(device)
    optimizers = model.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    val = list(data.val_dataloader())
    curve_batches, token_bytes = val[:s["curve_batches"]], data.token_bytes
    tokens_per_step = s["batch_size"] * s["seq_len"]
    curve = [[0, val_bpb(model, curve_batches, token_bytes)[0]]]
    start_memory, peak_memory = peak_tracker(device)
    start_memory()
    batches, train_seconds = iter(data.train_dataloader()), 0.0
    for step in range(1, s["steps"] + 1):
        batch = next(batches).to(device)
        synchronize(device)
        started = time.perf_counter()
        train_step(model, optimizer, batch)
        scheduler.step()
        synchronize(device)
        train_seconds += time.perf_counter() - started
        if step % s["eval_every"] == 0 or step == s["steps"]:
            curve.append([step * tokens_per_step, val_bpb(model, curve_batches, token_bytes)[0]])
    peak = peak_memory()
    final_bpb, final_nll = val_bpb(model, val, token_bytes)
    return {"arch": name, "seed": seed, "curve": curve, "final_bpb": final_bpb, "final_nll": final_nll,
            "train_tokens_per_s": s["steps"] * tokens_per_step / train_seconds, "peak_mib": peak / 2**20}


def measure_speeds(shapes: dict[str, dict], setting: dict, data, repeats: int = 5) -> dict[str, dict]:
    """Training-step and decoding speed of every architecture, timed in turns (each architecture once per turn,
    ``repeats`` turns after a warm-up) in this process: the machine's changing load then hits all alike, unlike
    the runs' own timings. A training step as in the runs (forward, backward, clipping, AdamW) on one training
    batch; decoding greedy, batch 1, KV cache, from a prompt of ``PROMPT_TOKENS`` tokens to the end of the
    context (no end-of-sequence stop). Also each one's training-step time against the reference's in each
    turn (``vs_reference``: reference time / its time, median and minimum)."""
    from llmzoo import ARCHITECTURES

    device = setting["device"]
    if setting["threads"]:
        torch.set_num_threads(setting["threads"])
    batch = next(iter(data.train_dataloader())).to(device)
    prompt, new = batch[:1, :PROMPT_TOKENS], setting["seq_len"] - PROMPT_TOKENS
    steps, decodes = {}, {}
    for name in ORDER:
        torch.manual_seed(0)
        model = ARCHITECTURES[name](**shapes[name]["kwargs"]).to(device)
        steps[name] = partial(train_step, model, model.configure_optimizers()["optimizer"], batch)
        decodes[name] = partial(model.generate, prompt, max_new_tokens=new)
    repeats = setting.get("speed_turns", repeats)
    step_times, decode_times = interleaved(steps, repeats), interleaved(decodes, repeats)
    return {name: {"train_tokens_per_s": batch[:, 1:].numel() / statistics.median(step_times[name]),
                   "decode_tokens_per_s": new / statistics.median(decode_times[name]),
                   "vs_reference": ratios(step_times[REFERENCE], step_times[name])} for name in ORDER}


def unigram_bpb(data) -> float:
    """The reference without context: validation bits per byte of each token's frequency in the training split
    (add-one smoothed), on the targets the models are scored on."""
    counts = torch.bincount(torch.from_numpy(data.train_tokens.astype("int64")), minlength=data.vocab_size) + 1.0
    targets = torch.cat([batch[:, 1:].flatten() for batch in data.val_dataloader()])
    nats = -(counts / counts.sum()).log()[targets].sum()
    return float(nats) / math.log(2) / int(data.token_bytes[targets].sum())


def train_step(model, optimizer, batch: torch.Tensor) -> None:
    """One training step of the recipe: forward (+ the MoE auxiliary loss), backward, clipping, AdamW."""
    loss, _, aux_loss = model.token_nll(batch)
    if aux_loss is not None:
        loss = loss + model.hparams.aux_loss_coef * aux_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ the study
def corpus_for(setting: dict, corpus: str | None, workdir: Path) -> tuple[str, str]:
    """The corpus file and its description: Tiny Shakespeare where it exists, else the standard library's ``.py``
    files joined up to 1.1 MB (Tiny Shakespeare's size); ``--quick`` cuts it to its first characters."""
    from llmzoo.data import default_corpus

    path = Path(corpus) if corpus else SHAKESPEARE
    if path.exists():
        text, what = path.read_text(encoding="utf-8"), f"`{path.name}`"
    else:
        text, what = "", "the Python standard library's `.py` files (Tiny Shakespeare was not found)"
        for file in default_corpus():
            text += file.read_text(encoding="utf-8", errors="replace")
            if len(text) > 1_100_000:
                break
    text = text[:setting.get("corpus_chars")]
    out = workdir / "corpus.txt"
    out.write_text(text, encoding="utf-8")
    return str(out), f"{what}, {len(text.encode('utf-8')):,} bytes"


def study_data(setting: dict, corpus: str, cache_dir: str, seed: int = 0):
    """The study's ``TextDataModule`` (``seed``: of the batches' order), set up: its tokenizer and token file are
    made once in ``cache_dir``, where every run finds them."""
    from llmzoo.data import TextDataModule

    data = TextDataModule(path=corpus, seq_len=setting["seq_len"], batch_size=setting["batch_size"], tokenizer="bpe",
                          bpe_vocab_size=setting["bpe_vocab_size"], seed=seed, cache_dir=cache_dir)
    data.prepare_data()
    data.setup("fit")
    return data


def remeasure_speeds(out: Path, corpus: str | None = None) -> Path:
    """Time the speeds of the stored study again (on a quieter machine, say) and rewrite its page; the training
    results stay. The tokenizer is trained again on the same corpus (the same text gives the same tokenizer)."""
    result = json.loads((out / "architectures" / "results.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        data = study_data(result["setting"], corpus_for(result["setting"], corpus, Path(tmp))[0], tmp)
        loads = [os.getloadavg()[0]]
        result["speeds"] = measure_speeds(result["shapes"], result["setting"], data)
        result["unigram_bpb"] = unigram_bpb(data)
    result["speeds_env"] = environment(result["setting"]["device"])
    result["speeds_load_average_1min"] = loads + [os.getloadavg()[0]]
    return write_page(result, out)


def child_command(name: str, kwargs: dict, setting: dict, seed: int, corpus: str, cache_dir: str) -> list[str]:
    job = dict(name=name, kwargs=kwargs, setting=setting, seed=seed, corpus=corpus, cache_dir=cache_dir)
    return [sys.executable, "-m", "benchmarks.architectures", "--child", json.dumps(job)]


def run_child(command: list[str], threads: int | None) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"a study run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(quick: bool = False, setting_name: str | None = None, corpus: str | None = None,
            seeds: list[int] | None = None) -> dict:
    """Every architecture at every seed of the setting (``--quick``: the quick one, in this process; else each
    run in a fresh process, ``jobs`` at a time). Returns the JSON-ready results with the load seen meanwhile."""
    name = "quick" if quick else setting_name or "cpu"
    setting = {**SETTINGS[name], **({"seeds": seeds} if seeds else {})}
    if setting["threads"]:
        torch.set_num_threads(setting["threads"])  # this process's timings run as the runs do
    if setting["device"] == "cuda" and not torch.cuda.is_available():
        return {"env": environment(), "skipped": f"the {name} setting needs a CUDA device"}
    started, loads = time.time(), [os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        path, described = corpus_for(setting, corpus, Path(tmp))
        data = study_data(setting, path, tmp)
        shapes = matched_shapes(setting, data.vocab_size)
        jobs = [(arch, shapes[arch]["kwargs"], seed) for seed in setting["seeds"] for arch in ORDER]
        runs = []
        if not setting["jobs"]:
            for arch, kwargs, seed in jobs:
                runs.append(train_run(arch, kwargs, setting, seed, path, tmp))
        else:
            with concurrent.futures.ThreadPoolExecutor(setting["jobs"]) as pool:
                futures = [pool.submit(run_child, child_command(arch, kwargs, setting, seed, path, tmp),
                                       setting["threads"]) for arch, kwargs, seed in jobs]
                for future in concurrent.futures.as_completed(futures):
                    runs.append(future.result())
                    loads.append(os.getloadavg())
                    print(f"  {runs[-1]['arch']:12s} seed {runs[-1]['seed']}: val bpb {runs[-1]['final_bpb']:.4f}, "
                          f"{runs[-1]['train_tokens_per_s']:.0f} training tokens/s", flush=True)
        corpus_tokens = {"train": len(data.train_tokens), "val": len(data.val_tokens)}
        speeds, speed_loads = measure_speeds(shapes, setting, data), [os.getloadavg()[0]]
        unigram = unigram_bpb(data)
    loads.append(os.getloadavg())
    return {"env": environment(setting["device"]), "quick": quick, "setting_name": name, "setting": setting,
            "recipe": RECIPE, "corpus": described, "corpus_tokens": corpus_tokens, "vocab_size": data.vocab_size,
            "shapes": shapes, "runs": sorted(runs, key=lambda r: (ORDER.index(r["arch"]), r["seed"])), "speeds": speeds,
            "speeds_load_average_1min": speed_loads + [os.getloadavg()[0]], "unigram_bpb": unigram,
            "wall_seconds": time.time() - started, "load_average_1min": [load[0] for load in loads]}


# ------------------------------------------------------------------------------------------------ the page
def by_arch(result: dict) -> dict[str, list[dict]]:
    return {arch: [r for r in result["runs"] if r["arch"] == arch] for arch in ORDER}


def summary(runs: list[dict]) -> dict:
    finals = [r["final_bpb"] for r in runs]
    return {"mean": statistics.mean(finals), "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "min": min(finals), "max": max(finals),
            **{key: statistics.median(r[key] for r in runs) for key in ("peak_mib", "final_nll")}}


def describe_setting(result: dict) -> str:
    s, recipe, tokens = result["setting"], result["recipe"], result["corpus_tokens"]
    budget = s["steps"] * s["batch_size"] * s["seq_len"]
    return (f"Corpus: {result['corpus']}; byte-level BPE of {result['vocab_size']} tokens trained on it (the same "
            f"for every run); the first 90% trains ({tokens['train']:,} tokens), the last 10% validates "
            f"({tokens['val']:,} tokens). Every model: width {s['embed_dim']}, {s['num_layers']} layer(s), "
            f"{s['num_heads']} query heads, context {s['seq_len']}, no dropout, tied input/output embedding; "
            f"{s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens ({budget:,} training tokens), AdamW lr "
            f"{recipe['learning_rate']:g}, betas {tuple(recipe['betas'])}, weight decay {recipe['weight_decay']}, "
            f"{s['warmup_steps']} warmup steps then cosine to lr / 10, gradient clipping {recipe['clip']}; seeds "
            f"{', '.join(map(str, s['seeds']))} (weights and batch order). The Llama family (Llama, Mistral, Mixtral, "
            f"Qwen2, Qwen3) uses {max(1, s['num_heads'] // 2)} kv heads; Mistral a sliding window of "
            f"{s['seq_len'] // 2}; Mixtral {s['num_experts']} experts, top {s['experts_per_token']}. The curves "
            f"are on the first {s['curve_batches']} validation batches; the final value on the whole validation "
            f"split. Device: {s['device']}" + (f", {s['threads']} torch thread(s) per run, {s['jobs']} run(s) at "
                                               f"a time" if s["jobs"] else "") + ".")


def table(result: dict) -> list[str]:
    lines = ["| architecture | ffn_dim | non-embedding params (active) | val bpb, mean ± std | min - max | "
             f"per seed | val nats/token | training tokens/s | training step vs {REFERENCE} | peak training memory "
             "MiB | decode tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    speed = result["speeds"]
    for arch, runs in by_arch(result).items():
        if not runs:
            continue
        shape, m, timing = result["shapes"][arch], summary(runs), speed[arch]
        params, seeds = shape["params"], ", ".join(f"{r['final_bpb']:.4f}" for r in runs)
        count = f"{params['active']:,}" + (f" of {params['non_embedding']:,}"
                                           if params["active"] != params["non_embedding"] else "")
        lines.append(f"| {arch} | {shape['kwargs']['ffn_dim']} | {count} | {m['mean']:.4f} ± {m['std']:.4f} | "
                     f"{m['min']:.4f} - {m['max']:.4f} | {seeds} | {m['final_nll']:.3f} | "
                     f"{timing['train_tokens_per_s']:.0f} | {ratio_text(timing['vs_reference'])} | {m['peak_mib']:.0f} | "
                     f"{timing['decode_tokens_per_s']:.0f} |")
    return lines


def reading(result: dict) -> str:
    """What the numbers say, computed from them: the ranking, which gaps exceed the spread over seeds, speeds."""
    stats = {arch: summary(runs) for arch, runs in by_arch(result).items() if runs}
    ranked = sorted(stats, key=lambda arch: stats[arch]["mean"])
    best = ranked[0]
    if len(result["setting"]["seeds"]) < 2:
        return (f"One seed only: no spread to compare the gaps with. Lowest validation bpb: {best} "
                f"({stats[best]['mean']:.4f}); highest: {ranked[-1]} ({stats[ranked[-1]]['mean']:.4f}).")
    tied = [arch for arch in ranked[1:] if stats[arch]["min"] <= stats[best]["max"]]
    apart = [arch for arch in ranked[1:] if arch not in tied]
    spread = max(s["max"] - s["min"] for s in stats.values())
    speed = result["speeds"]
    fast = sorted(stats, key=lambda arch: -speed[arch]["train_tokens_per_s"])
    text = [f"Lowest validation bits per byte: **{best}** ({stats[best]['mean']:.4f}); highest: "
            f"**{ranked[-1]}** ({stats[ranked[-1]]['mean']:.4f}), {stats[ranked[-1]]['mean'] - stats[best]['mean']:.4f} "
            f"apart, against a spread over seeds of at most {spread:.4f} for any one architecture.",
            f"Order by mean: {' < '.join(ranked)}."]
    if tied:
        text.append(f"The seed ranges of {', '.join(tied)} overlap {best}'s: at this budget they are not "
                    f"distinguishable from it.")
    if apart:
        text.append(f"Every seed of {', '.join(apart)} ends above every seed of {best}.")
    unigram = result.get("unigram_bpb")
    flat = [arch for arch in ranked if unigram is not None and abs(stats[arch]["mean"] - unigram) < 0.02]
    if flat:
        text.append(f"{', '.join(flat)} end within 0.02 bpb of the unigram reference ({unigram:.4f}: token frequencies, "
                    f"no context): in this budget they predict little more than which tokens are frequent.")
    post, pre = (["Transformer", "GPT"], [arch for arch in stats if arch not in ("Transformer", "GPT")])
    if all(arch in stats for arch in post) and pre:
        worst_pre, best_post = max(stats[a]["max"] for a in pre), min(stats[a]["min"] for a in post)
        relation = ("every seed of the post-norm designs (Transformer, GPT) ends above every seed of the pre-norm "
                    "ones" if best_post > worst_pre else "the post-norm designs (Transformer, GPT) and the pre-norm "
                    "ones overlap")
        text.append(f"Norm placement: {relation} (post-norm best {best_post:.4f}, pre-norm worst {worst_pre:.4f}).")
    text.append(f"Training speed (timed in turns in one process): {fast[0]} is the fastest ({speed[fast[0]]['train_tokens_per_s']:.0f} "
                f"tokens/s), {fast[-1]} the slowest ({speed[fast[-1]]['train_tokens_per_s']:.0f}).")
    return " ".join(text)


def caveats(result: dict) -> str:
    s = result["setting"]
    params = result["shapes"][REFERENCE]["params"]["non_embedding"]
    return (f"What this does not show: the ranking at other scales (these are models of {params:,} non-embedding "
            f"parameters trained on {s['steps'] * s['batch_size'] * s['seq_len']:,} tokens, far from convergence), "
            "with other learning rates or warmups (one recipe for all: an architecture that wants another is at a "
            "disadvantage here; the post-norm designs, Transformer and GPT, are known to need longer warmups), or "
            "on other text.")


def page(result: dict, plots: Path) -> str:
    lines = [f"# {TITLE}", "", "Written by `python -m benchmarks --part architectures` (see "
             "[benchmarks/architectures.py](../benchmarks/architectures.py)) from its stored results "
             f"(`{plots.name}/results.json`); `python -m benchmarks.architectures --render` rewrites it.", ""]
    if "skipped" in result:
        return "\n".join(lines + [f"Skipped: {result['skipped']}.", ""])
    minutes = result["wall_seconds"] / 60
    lines += [f"Measured {result['env']['date']} on {result['env']['hardware']}, torch {result['env']['torch']}, "
              f"setting `{result['setting_name']}`; the whole study took {minutes:.1f} minutes."]
    if result.get("quick"):
        lines.append("**Quick smoke run** (toy sizes, one seed): these numbers only show that the study works.")
    lines += ["", "## Setting", "", describe_setting(result),
              "", f"Parameters are matched on the non-embedding count (blocks and final norm) of {REFERENCE} with "
              "`ffn_dim = 4 * embed_dim`: each architecture gets the MLP width (a multiple of 8) that comes "
              "closest; Mixtral matches with its active parameters (total in the table). Bits per byte = the "
              "validation split's summed negative log-likelihood (nats) / ln 2 / its UTF-8 bytes, so it does not "
              "depend on the tokenizer (docs/evaluation.md).", "", "## Results", "", *table(result), "",
              (f"Reference without context: a unigram model of the training tokens (each token's frequency, "
               f"add-one smoothed) scores {result['unigram_bpb']:.4f} bpb on the same validation targets. "
               if "unigram_bpb" in result else "") +
              "Speeds come from a timing after the runs, in one process, every architecture once per turn "
              f"({result['setting'].get('speed_turns', 5)} turns after a warm-up; the machine's load then hits all "
              f"alike{speeds_when(result)}): training tokens/s = tokens of one "
              "step (forward, backward, clipping, AdamW on one training batch) / its median time, and the step "
              f"time of {REFERENCE} / that of each architecture in each turn (median, min); decode tokens/s: "
              f"greedy, batch 1, KV cache, from an {PROMPT_TOKENS}-token prompt to the end of the context. Peak "
              "training memory, from the runs (median over seeds): what training added at its peak to the memory "
              "held before its first step (gradients, AdamW state, activations, temporaries; on CPU the growth of "
              f"the peak resident set of the run's own process). The 1-minute load average of the machine went "
              f"from {min(result['load_average_1min']):.1f} to {max(result['load_average_1min']):.1f} during the "
              "study (it had 2 cores and was shared with other work).", "",
              curve_plot(result, plots / "curves.png"), "", final_plot(result, plots / "final.png"), "",
              "## Reading", "", reading(result), "", caveats(result), "",
              "## Reproduce", "", "```bash", "python -m benchmarks --part architectures      # this page (CPU)",
              "python -m benchmarks.architectures --setting gpu --out \"$OUT/docs\"   # the larger setting",
              "python -m benchmarks.architectures --quick --out /tmp/a   # a smoke run", "```", "",
              "The `gpu` setting: " + describe_gpu(), ""]
    return "\n".join(lines)


def describe_gpu() -> str:
    s = SETTINGS["gpu"]
    return (f"width {s['embed_dim']}, {s['num_layers']} layers, {s['num_heads']} heads, context {s['seq_len']}, "
            f"BPE of {s['bpe_vocab_size']} tokens, {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens "
            f"({s['steps'] * s['batch_size'] * s['seq_len']:,} training tokens, several epochs of Tiny "
            f"Shakespeare: give a larger corpus with `--corpus`), {s['num_experts']} experts for Mixtral, seeds "
            f"{', '.join(map(str, s['seeds']))}, one run at a time.")


def speeds_when(result: dict) -> str:
    """When and under what load the speeds were timed, if not with the runs."""
    loads = result.get("speeds_load_average_1min")
    env = result.get("speeds_env")
    return ((f"; timed again {env['date']} on {env['hardware']}" if env else "")
            + (f"; load average {min(loads):.1f} to {max(loads):.1f} meanwhile" if loads else ""))


def curve_plot(result: dict, path: Path) -> str:
    """Validation bpb vs training tokens: the mean over seeds per architecture, the seeds' range shaded."""
    from benchmarks.plots import plt  # matplotlib without a display

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arch, runs in by_arch(result).items():
        if not runs:
            continue
        tokens = [point[0] for point in runs[0]["curve"]]
        values = list(zip(*[[point[1] for point in r["curve"]] for r in runs]))
        line, = ax.plot(tokens, [statistics.mean(v) for v in values], label=arch)
        ax.fill_between(tokens, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
    start = min(point[1] for r in result["runs"] for point in r["curve"][1:2])
    ax.set_ylim(top=start * 1.05)  # the random-init point at 0 tokens is far above: keep the curves readable
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("validation bpb vs tokens (mean over seeds, range shaded)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return save(fig, path, "validation bits per byte vs training tokens")


def final_plot(result: dict, path: Path) -> str:
    """Final validation bpb per architecture: each seed a dot, the mean a bar."""
    from benchmarks.plots import plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    groups = [(arch, runs) for arch, runs in by_arch(result).items() if runs]
    for i, (arch, runs) in enumerate(groups):
        finals = [r["final_bpb"] for r in runs]
        ax.bar(i, statistics.mean(finals), color="tab:blue", alpha=0.5)
        ax.plot([i] * len(finals), finals, "ko", markersize=4)
    finals = [r["final_bpb"] for r in result["runs"]]
    ax.set_ylim(min(finals) - 0.1 * (max(finals) - min(finals) + 0.01), max(finals) + 0.1 * (max(finals) - min(finals) + 0.01))
    ax.set_xticks(range(len(groups)), [arch for arch, _ in groups])
    ax.set_ylabel("final validation bpb")
    ax.set_title("final validation bits per byte (bar: mean; dots: seeds)")
    ax.grid(alpha=0.3, axis="y")
    return save(fig, path, "final validation bits per byte per architecture")


def save(fig, path: Path, title: str) -> str:
    from benchmarks.plots import plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"![{title}]({path.parent.name}/{path.name})"


def write_page(result: dict, out: Path) -> Path:
    """``<out>/architectures.md`` and its figures from ``result``, stored in ``<out>/architectures/results.json``."""
    plots = out / "architectures"
    plots.mkdir(parents=True, exist_ok=True)
    (plots / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "architectures.md").write_text(page(result, plots))
    return out / "architectures.md"


def render(out: Path) -> Path | None:
    """Rewrite the page from its stored results (None when there are none)."""
    stored = out / "architectures" / "results.json"
    return write_page(json.loads(stored.read_text()), out) if stored.exists() else None


def run(quick: bool = False, out: Path | None = None, **options) -> Path:
    """Measure and write the page (``python -m benchmarks --part architectures`` calls this)."""
    out = out or ROOT / ("runs/benchmarks-quick" if quick else "docs")
    result = measure(quick, **options)
    path = write_page(result, out)
    if "skipped" not in result:
        print("\n".join(table(result)), f"\n\n{reading(result)}\n", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=[s for s in SETTINGS if s != "quick"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes, one seed, in this process (seconds)")
    parser.add_argument("--corpus", help="a text file (default: Tiny Shakespeare, else the standard library)")
    parser.add_argument("--seeds", type=int, nargs="+", help="instead of the setting's seeds")
    parser.add_argument("--out", type=Path, help="where the page goes (default: docs/, or runs/benchmarks-quick/)")
    parser.add_argument("--render", action="store_true", help="run nothing; rewrite the page from the stored results")
    parser.add_argument("--speeds", action="store_true",
                        help="time the stored study's speeds again (no training) and rewrite the page")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one run, its result printed as JSON
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(train_run(job["name"], job["kwargs"], job["setting"], job["seed"], job["corpus"],
                                   job["cache_dir"])))
        return
    out = args.out or ROOT / ("runs/benchmarks-quick" if args.quick else "docs")
    if args.render or args.speeds:
        path = remeasure_speeds(out, args.corpus) if args.speeds else render(out)
    else:
        path = run(args.quick, out, setting_name=args.setting, corpus=args.corpus, seeds=args.seeds)
    print(f"wrote {path}" if path else f"no stored results in {out / 'architectures'}")


if __name__ == "__main__":
    main()
