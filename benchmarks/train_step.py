"""Training-step throughput: llmzoo vs Hugging Face transformers, same config and weights, same run.

    python -m benchmarks.train_step                       # Llama, CPU fp32
    python -m benchmarks.train_step --family mixtral --vocab 8192

One step = forward + next-token cross-entropy + backward. Prints tokens/s of both and the ratio
(llmzoo / HF) of median step times; target for Llama on CPU fp32: >= 1.3x.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import transformers

from benchmarks.common import hardware, interleaved, summary
from llmzoo.hf import from_hf

SIZES = {  # small models of each family; "llama" is llama2.c's stories15M shape with grouped-query attention
    "llama": (transformers.LlamaConfig, dict(hidden_size=288, intermediate_size=768, num_hidden_layers=6,
                                             num_attention_heads=6, num_key_value_heads=2)),
    "mistral": (transformers.MistralConfig, dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                                 num_attention_heads=6, num_key_value_heads=2, sliding_window=128)),
    "mixtral": (transformers.MixtralConfig, dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                                 num_experts_per_tok=2)),
    "gpt2": (transformers.GPT2Config, dict(n_embd=384, n_layer=6, n_head=6)),
}


def build(family: str, vocab: int, context: int, device: str):
    config_cls, sizes = SIZES[family]
    positions = {"n_positions": context} if family == "gpt2" else {"max_position_embeddings": context}
    config = config_cls(vocab_size=vocab, **positions, **sizes, attn_implementation="sdpa",
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).train()
    ours = from_hf(hf).to(device).train()
    return hf, ours


def step_fn(model, batch, hf: bool):
    def step():
        model.zero_grad(set_to_none=True)
        if hf:
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        else:
            loss = model.token_nll(batch)[0]
        loss.backward()
    return step


def run(family: str = "llama", batch: int = 8, seq: int = 256, vocab: int = 32000, repeats: int = 7,
        device: str = "cpu") -> dict:
    hf, ours = build(family, vocab, seq + 1, device)
    data = torch.randint(0, vocab, (batch, seq + 1), device=device)
    times = interleaved({"hf": step_fn(hf, data, hf=True), "llmzoo": step_fn(ours, data, hf=False)},
                        repeats=repeats, warmup=2)
    tokens = batch * seq
    result = {name: tokens / statistics.median(t) for name, t in times.items()}
    result["ratio"] = statistics.median(times["hf"]) / statistics.median(times["llmzoo"])
    result["params"] = ours.num_parameters()
    result["times"] = times
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llama", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (Llama 2's tokenizer: 32000)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    r = run(args.family, args.batch, args.seq, args.vocab, repeats=args.repeats)
    print(f"{args.family}: {r['params'] / 1e6:.1f}M parameters, vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, "
          f"fp32 on {hardware()}")
    for name in ("hf", "llmzoo"):
        print(f"  {name:7s} {r[name]:9.0f} tokens/s  ({summary(r['times'][name])})")
    print(f"  ratio llmzoo / HF: {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
