"""The GPU part: GPT-2 124M training MFU (bf16-mixed, compiled blocks, flash attention) and decoding, on CUDA.

    python -m benchmarks.gpu                          # on a CUDA machine (a few minutes); else "skipped"
    python -m benchmarks.gpu --device cpu --quick     # a dry run of the same code on CPU: toy sizes, no compile

Training: llmzoo's ``GPT2`` in the shape of configs/gpt2-124m.yaml (12 layers, 768 wide, 12 heads, context
1024; vocabulary 50257 padded to 50304, as nanoGPT does), no dropout, fp32 weights with the forward pass under
bf16 autocast (Lightning's ``bf16-mixed``), TF32 allowed for what stays fp32, every block compiled
(``compile=True``), attention restricted to the flash SDPA backend (an error if flash cannot run), AdamW with
gradient clipping as the config trains. One step = forward + loss + backward + clipping + optimizer step.
MFU = tokens/s x ``model.flops_per_token(1024)`` / ``llmzoo.callbacks.peak_flops(device, bf16)``; target >= 45%
on H100/H200. Also: the fused loss's share of the step, peak memory with and without activation
checkpointing, and greedy decoding (bf16) vs Hugging Face ``generate``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import environment, timeit
from benchmarks.decode import versus_hf, versus_hf_report
from benchmarks.memory import step_peak
from benchmarks.train_step import build, shape
from llmzoo.callbacks import peak_flops
from llmzoo.hf import from_hf
from llmzoo.layers.loss import linear_cross_entropy

TITLE = "GPU: GPT-2 124M training MFU and decoding"
TARGET_MFU = 0.45
GPT2_124M = dict(n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
TOY = dict(GPT2_124M, n_embd=64, n_layer=2, n_head=4)
VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 64


def assert_flash(device: str, heads: int, head_dim: int, seq: int) -> None:
    """Raises unless the flash SDPA backend runs causal bf16 attention of this shape on ``device``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, heads, seq, head_dim, device=device, dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, q, q, is_causal=True)


def attention_backend(device: str):
    """A context that lets SDPA use only flash attention on CUDA (nothing changes on CPU)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if device == "cuda" else nullcontext()


def train(hf, batch: int, seq: int, steps: int, compile: bool, device: str) -> dict:
    """Step times of llmzoo's training step (a fresh copy of ``hf``'s weights) at ``batch`` x ``seq`` tokens."""
    model = from_hf(hf).to(device).train()
    model.hparams.compile, model.hparams.lr_decay_steps = compile, 600000
    model.configure_model()  # compiles every block in place when compile=True
    optimizers = model.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    data = torch.randint(0, hf.config.vocab_size, (batch, seq + 1), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model.token_nll(data)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    print(f"  training at batch {batch} x {seq}: 3 warm-up steps (compiling), then {steps} timed", flush=True)
    with attention_backend(device):
        times = timeit(step, repeats=steps, warmup=3)
        flash = saw_flash_kernels(step) if device == "cuda" else None
        with torch.autocast(device, dtype=torch.bfloat16):  # with gradients on, as compiled (no recompile)
            hidden = model.backbone(data[:, :-1])[0].flatten(0, 1).detach()
    targets = data[:, 1:].flatten()

    def loss_only(dtype: torch.dtype):  # the fused output projection + cross-entropy with its gradients
        def run():
            h = hidden.to(dtype).requires_grad_()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = linear_cross_entropy(h, model.lm_head.weight, targets)
            loss.backward()
        return run

    # as in the step: the hidden states arrive in whatever dtype the final norm returns under autocast, and
    # linear_cross_entropy runs its projection in the autocast dtype
    loss_times = {str(hidden.dtype)[6:]: timeit(loss_only(hidden.dtype), repeats=steps, warmup=2)}
    return dict(batch=batch, seq=seq, shape=shape(model), flops_per_token=model.flops_per_token(seq), times=times,
                loss_dtype=str(hidden.dtype)[6:], loss_times=loss_times, flash=flash)


def saw_flash_kernels(step) -> bool | None:
    """Whether one call of ``step`` launches flash-attention CUDA kernels (None if the profiler cannot say)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    except RuntimeError as error:
        print(f"  the CUDA profiler failed ({error}); flash kernels not checked", flush=True)
        return None
    return any("flash" in e.key.lower() for e in prof.key_averages())


def attempt(name: str, measure):
    """``measure()``, or the error it raised: in a one-shot GPU run one failing measurement must not lose the
    others."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001
        print(f"  {name} failed: {type(error).__name__}: {error}", flush=True)
        return {"error": f"{type(error).__name__}: {error}"}


def largest_batch_that_fits(run, batches: tuple[int, ...]):
    """``run(batch)`` for the first of ``batches`` that does not run out of GPU memory."""
    for batch in batches:
        try:
            return run(batch)
        except torch.cuda.OutOfMemoryError:
            print(f"  batch {batch} ran out of memory; trying a smaller one", flush=True)
        torch.cuda.empty_cache()
    raise RuntimeError(f"none of the batch sizes {batches} fits in GPU memory")


def run(device: str = "cuda", quick: bool = False, compile: bool = True, batches=(64, 32, 16), seq: int = 1024,
        steps: int = 20) -> dict:
    sizes, vocab = (TOY, 512) if quick else (GPT2_124M, VOCAB)
    if quick:
        batches, seq, steps = (2,), 64, 3
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
        assert_flash(device, sizes["n_head"], sizes["n_embd"] // sizes["n_head"], seq)
    hf, _ = build("gpt2", vocab, seq, device, **sizes)
    training = largest_batch_that_fits(lambda batch: train(hf, batch, seq, steps, compile, device), batches)
    peak = peak_flops(torch.device(device), torch.bfloat16)
    tokens = training["batch"] * seq
    mfu = [tokens * training["flops_per_token"] / t / peak for t in training["times"]] if peak else None
    if mfu:
        print(f"  {tokens / statistics.median(training['times']):,.0f} tokens/s, MFU {statistics.median(mfu):.1%}",
              flush=True)

    def peak_memory() -> dict:
        memory = {}
        for checkpointing in (False, True):
            model = from_hf(hf).to(device).train()
            model.hparams.activation_checkpointing = checkpointing
            data = torch.randint(0, vocab, (training["batch"], seq + 1), device=device)
            with attention_backend(device):
                memory["with" if checkpointing else "without"] = step_peak(model, data, autocast=torch.bfloat16)
            del model
        return memory

    print("  peak memory with and without activation checkpointing", flush=True)
    memory = attempt("the memory measurement", peak_memory)
    print("  decoding vs HF generate", flush=True)
    decoding = attempt("decoding", lambda: versus_hf((1, 8), 32 if quick else 256, vocab, 2 if quick else 3, "gpt2",
                                                     device, torch.bfloat16, **sizes))
    return {"env": environment(device), "quick": quick, "compile": compile, "train": training, "peak_flops": peak,
            "mfu": mfu, "memory": memory, "decode": decoding}


def measure(quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return {"env": environment(), "skipped": "no CUDA device"}
    return run("cuda", quick)


def report(result: dict, plots: Path | None = None) -> str:
    t = result["train"]
    tokens = t["batch"] * t["seq"]
    step = statistics.median(t["times"])
    loss = {dtype: statistics.median(times) for dtype, times in t["loss_times"].items()}
    shape_note = "" if result["quick"] else "; configs/gpt2-124m.yaml's shape, vocabulary padded to a multiple of 64"
    lines = [f"llmzoo `GPT2` ({t['shape']}{shape_note}), "
             f"batch {t['batch']} x {t['seq']} tokens, fp32 weights with the forward pass under bf16 autocast "
             f"(`bf16-mixed`), TF32 allowed, {'every block compiled' if result['compile'] else 'not compiled'}, "
             "SDPA restricted to the flash backend"
             + (f" (flash kernels {'seen' if t['flash'] else '**not seen**'} in a profiled step)"
                if t["flash"] is not None else "")
             + ". A step = forward + loss + backward + gradient clipping + AdamW step; "
             f"{len(t['times'])} steps after 3 warm-up steps. MFU = tokens/s x `flops_per_token` "
             f"({t['flops_per_token'] / 1e6:.0f} MFLOP per token) / the GPU's peak bf16 FLOP/s "
             + (f"({result['peak_flops'] / 1e12:.1f} TFLOP/s, `llmzoo.callbacks.peak_flops`)." if result["peak_flops"]
                else "(not known for this GPU, so no MFU)."), "",
             "| tokens/s (median step) | median step ms | MFU median (min, max) | target |", "|---|---|---|---|"]
    mfu = result["mfu"]
    lines.append(f"| {tokens / step:,.0f} | {1e3 * step:.1f} | "
                 + (f"{statistics.median(mfu):.1%} ({min(mfu):.1%}, {max(mfu):.1%})" if mfu else "n/a")
                 + f" | >= {TARGET_MFU:.0%} |")
    as_run = loss[t["loss_dtype"]]
    lines += ["", "The fused output projection + cross-entropy alone (`linear_cross_entropy` forward and backward on "
              f"the same batch; under autocast the hidden states reach it in {t['loss_dtype']}) takes "
              f"{1e3 * as_run:.1f} ms, {as_run / step:.0%} of the step; its projection runs in bfloat16, as an "
              "`nn.Linear` head would under autocast."]
    memory, decoding = result["memory"], result["decode"]
    if "error" in memory:
        lines += ["", f"Peak memory: the measurement failed ({memory['error']})."]
    else:
        lines += ["", f"Peak memory of a training step (`torch.cuda.max_memory_allocated` over what was allocated "
                  f"before, after a warm-up step; not compiled): {memory['without'] / 2**30:.2f} GiB without "
                  f"activation checkpointing, {memory['with'] / 2**30:.2f} GiB with"
                  + (f": {memory['without'] / memory['with']:.2f}x less" if memory["with"] else "")
                  + " (one measurement each)."]
    if "error" in decoding:
        lines += ["", f"Decoding: the measurement failed ({decoding['error']})."]
    else:
        lines += ["", *versus_hf_report(decoding, "bf16 on the GPU, not compiled")]
    return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, str, str, bool]]:
    if not result["mfu"]:
        return []
    mfu = statistics.median(result["mfu"])
    return [("GPT-2 124M training MFU (bf16-mixed, compiled, flash)", f"{mfu:.1%}", f">= {TARGET_MFU:.0%}",
             mfu >= TARGET_MFU)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run of the code (use with --quick)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, few steps")
    parser.add_argument("--no_compile", action="store_true")
    args = parser.parse_args()
    from benchmarks.report import show

    if args.device == "cpu":
        show("gpu", run("cpu", args.quick, compile=not args.no_compile))
    else:
        show("gpu", measure(args.quick))


if __name__ == "__main__":
    main()
