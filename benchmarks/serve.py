"""Serving: ``llmzoo serve`` under N concurrent streaming clients, batched against the same requests one at a time.

    python -m benchmarks.serve                    # prints the section (python -m benchmarks --part serve stores it)
    python -m benchmarks.serve --quick

The real server (uvicorn on a free localhost port, in a thread of this process) with a Llama of llama2.c's
stories15M shape (288 wide, 6 layers, grouped-query attention) and a byte-level BPE, random weights, fp32 on
CPU, ``--max_batch_size 16``. N = 1, 4, 16 clients (asyncio, one HTTP connection each) stream greedy
completions of ``max_tokens`` tokens at once (each a different prompt); every request must end with a
``finish_reason`` and ``[DONE]``, with no error. Reported: aggregate tokens/s (completion tokens of all requests /
wall time from the first request to the last token), p50 / p99 time to first token (request sent to its first
text chunk), and the same N = 16 requests sent one after the other (sequential tokens/s). Target: batched >= 2.5x
sequential at N = 16. Bounded: 3 + 1 rounds of at most 16 requests, each request at most 120 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment

TITLE = "Serving: llmzoo serve, concurrent streaming clients"
TARGET = 2.5
CLIENTS = (1, 4, 16)
SIZES = dict(embed_dim=288, num_heads=6, num_kv_heads=2, num_layers=6, ffn_dim=768, max_position_embeddings=512)
TOY = dict(embed_dim=32, num_heads=4, num_kv_heads=2, num_layers=2, ffn_dim=48, max_position_embeddings=128)
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. ")


def start_server(quick: bool, directory: Path):
    """A served random Llama: ``(base URL, stop function)``."""
    from llmzoo import Llama
    from llmzoo.cli.serve import build_app, serve_in_thread
    from llmzoo.data import Tokenizer
    from llmzoo.hf import to_hf

    tokenizer = Tokenizer.train_bpe([TEXT] * 20, vocab_size=512)
    torch.manual_seed(0)
    to_hf(Llama(vocab_size=tokenizer.vocab_size, **(TOY if quick else SIZES)), directory, tokenizer)
    return serve_in_thread(build_app(str(directory), max_batch_size=16))


async def one_request(client, base: str, prompt: str, max_tokens: int) -> dict:
    """Stream one greedy completion: its time to first token, completion tokens, and whether it ended properly."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, first, reason, tokens, done = time.perf_counter(), None, None, 0, False
    async with client.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["text"] and first is None:
                    first = time.perf_counter()
                reason = choice["finish_reason"] or reason
    ok = done and reason in ("stop", "length") and tokens > 0
    return {"ttft": (first or time.perf_counter()) - sent, "tokens": tokens, "end": time.perf_counter(),
            **({} if ok else {"error": f"incomplete (done={done}, finish_reason={reason}, tokens={tokens})"})}


async def round_of(base: str, clients: int, max_tokens: int, sequential: bool = False) -> dict:
    """``clients`` requests at once (or one after the other): aggregate tokens/s, TTFT percentiles, errors."""
    try:
        import httpx2 as httpx  # what the openai client uses
    except ModuleNotFoundError:
        import httpx

    prompts = [f"{TEXT[i * 7 % 120:][:30]}" for i in range(clients)]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as client:
        start = time.perf_counter()
        if sequential:
            results = [await one_request(client, base, p, max_tokens) for p in prompts]
        else:
            results = await asyncio.gather(*(one_request(client, base, p, max_tokens) for p in prompts))
    errors = [r["error"] for r in results if "error" in r]
    good = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in good)
    wall = max((r["end"] for r in good), default=start) - start
    tokens = sum(r["tokens"] for r in good)
    return {"clients": clients, "sequential": sequential, "requests": len(results), "errors": errors,
            "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "ttft_p50": statistics.median(ttft) if ttft else None,
            "ttft_p99": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))] if ttft else None}


def measure(quick: bool = False) -> dict:
    max_tokens = 8 if quick else 64
    with tempfile.TemporaryDirectory() as tmp:
        base, stop = start_server(quick, Path(tmp) / "model")
        try:
            asyncio.run(round_of(base, 2, 4))  # warm-up
            rounds = [asyncio.run(round_of(base, n, max_tokens)) for n in CLIENTS]
            rounds.append(asyncio.run(round_of(base, CLIENTS[-1], max_tokens, sequential=True)))
        finally:
            stop()
    return {"env": environment(), "quick": quick, "load": os.getloadavg(), "max_tokens": max_tokens,
            "model": "toy" if quick else "stories15M shape", "rounds": rounds}


def speedup(result: dict) -> float:
    batched, sequential = (next(r for r in result["rounds"] if r["clients"] == CLIENTS[-1] and r["sequential"] is s)
                           for s in (False, True))
    return batched["tokens_per_s"] / sequential["tokens_per_s"]


def report(result: dict, plots: Path | None = None) -> str:
    load = ", ".join(f"{x:.1f}" for x in result["load"])
    lines = [f"Greedy streamed completions of {result['max_tokens']} tokens, {result['model']} Llama (random weights, "
             f"fp32), `--max_batch_size 16`, server and clients on this machine (load average {load}).", "",
             "| clients | requests | errors | tokens | seconds | tokens/s | TTFT p50 | TTFT p99 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rounds"]:
        name = f"{r['clients']}{' one at a time' if r['sequential'] else ''}"
        ttft = [f"{r[k] * 1000:.0f} ms" if r[k] is not None else "-" for k in ("ttft_p50", "ttft_p99")]
        lines.append(f"| {name} | {r['requests']} | {len(r['errors'])} | {r['tokens']} | {r['seconds']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {ttft[0]} | {ttft[1]} |")
    lines += ["", f"Batched vs one at a time at N = {CLIENTS[-1]}: **{speedup(result):.1f}x** aggregate tokens/s "
                  f"(target >= {TARGET:g}x)."]
    return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, str, str, bool]]:
    errors = sum(len(r["errors"]) for r in result["rounds"])
    return [(f"serving, {CLIENTS[-1]} concurrent streams vs one at a time", f"{speedup(result):.1f}x",
             f">= {TARGET:g}x", speedup(result) >= TARGET),
            ("serving, requests answered completely", f"{errors} errors", "0 errors", errors == 0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a toy model and 8 tokens (a smoke run)")
    args = parser.parse_args()
    from benchmarks.report import show

    show("serve", measure(args.quick))


if __name__ == "__main__":
    main()
