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

import torch
import transformers

from benchmarks.common import hardware, interleaved, summary
from benchmarks.train_step import build
from llmzoo import Llama, Mistral
from llmzoo.generation import generate

PROMPT = 16


def hf_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)


def versus_hf(batches=(1, 8), new_tokens: int = 256, vocab: int = 32000, repeats: int = 3) -> dict:
    """tokens/s of llmzoo and HF at each batch size; whether their tokens agree."""
    hf, ours = build("llama", vocab, PROMPT + new_tokens, "cpu")
    hf.eval(), ours.eval()
    results = {"params": ours.num_parameters()}
    for batch in batches:
        prompt = torch.randint(0, vocab, (batch, PROMPT))
        same = torch.equal(generate(ours, prompt, max_new_tokens=new_tokens), hf_generate(hf, prompt, new_tokens))
        times = interleaved({"hf": lambda: hf_generate(hf, prompt, new_tokens),
                             "llmzoo": lambda: generate(ours, prompt, max_new_tokens=new_tokens)},
                            repeats=repeats, warmup=0)  # the equality check above was the warm-up
        results[batch] = {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}
        results[batch].update(ratio=statistics.median(times["hf"]) / statistics.median(times["llmzoo"]),
                              same_tokens=same, times=times)
    return results


def cache_speedup(new_tokens: int = 512, vocab: int = 32000) -> dict:
    """llmzoo with its KV cache vs re-reading the whole sequence every step (one run each: the latter is long)."""
    _, ours = build("llama", vocab, PROMPT + new_tokens, "cpu")
    ours.eval()
    prompt = torch.randint(0, vocab, (1, PROMPT))
    generate(ours, prompt, max_new_tokens=8)  # warm-up
    times = interleaved({"cache": lambda: generate(ours, prompt, max_new_tokens=new_tokens),
                         "no cache": lambda: generate(ours, prompt, max_new_tokens=new_tokens, use_cache=False)},
                        repeats=1, warmup=0)
    return {name: new_tokens / t[0] for name, t in times.items()} | {"ratio": times["no cache"][0] / times["cache"][0]}


def cache_memory(lengths=(128, 512, 2048), window: int = 128, vocab: int = 32000) -> dict:
    """KV-cache bytes held at the last step of generations of ``lengths`` new tokens, and the median decode
    time per token over the last 64 tokens, for Mistral (sliding window) and Llama of the same shape."""
    shape = dict(vocab_size=vocab, embed_dim=288, num_heads=6, num_kv_heads=2, num_layers=6, ffn_dim=768,
                 max_position_embeddings=PROMPT + max(lengths))
    results = {}
    for name, model in (("mistral", Mistral(**shape, sliding_window=window)), ("llama", Llama(**shape))):
        model.eval()
        prompt = torch.randint(0, vocab, (1, PROMPT))
        for length in lengths:
            held, stamps = [], []

            def watch(_, model=model, held=held, stamps=stamps):
                stamps.append(time.perf_counter())
                held.append(sum(b.attention.kv_cache.k.nbytes + b.attention.kv_cache.v.nbytes for b in model.blocks))

            generate(model, prompt, max_new_tokens=length, streamer=watch)
            steps = [b - a for a, b in zip(stamps[-65:], stamps[-64:])]
            results[name, length] = {"bytes": held[-1], "ms_per_token": 1e3 * statistics.median(steps)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["hf", "cache", "window", "all"], default="all")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    print(f"fp32 on {hardware()}, transformers {transformers.__version__}")
    if args.part in ("hf", "all"):
        r = versus_hf(new_tokens=args.new_tokens, repeats=args.repeats)
        print(f"llama {r['params'] / 1e6:.1f}M parameters, greedy, prompt {PROMPT} + {args.new_tokens} new tokens")
        for batch in (1, 8):
            b = r[batch]
            print(f"  batch {batch}: HF {b['hf']:7.1f} tokens/s ({summary(b['times']['hf'])}), "
                  f"llmzoo {b['llmzoo']:7.1f} tokens/s ({summary(b['times']['llmzoo'])}); "
                  f"ratio {b['ratio']:.2f}x; same tokens: {b['same_tokens']}")
    if args.part in ("cache", "all"):
        r = cache_speedup()
        print(f"KV cache, batch 1, 512 new tokens: {r['cache']:.1f} tokens/s with, {r['no cache']:.1f} without; "
              f"speed-up {r['ratio']:.1f}x")
    if args.part in ("window", "all"):
        r = cache_memory()
        print(f"KV-cache bytes at the last step / median ms per token over the last 64 "
              f"(Mistral window 128, {PROMPT}-token prompt):")
        for (name, length), v in r.items():
            print(f"  {name:8s} {length:5d} new tokens: {v['bytes'] / 2**20:6.2f} MiB, "
                  f"{v['ms_per_token']:.2f} ms/token")


if __name__ == "__main__":
    main()
