"""Quality benchmark: character-level Tiny Shakespeare with nanoGPT's "baby GPT" CPU settings, through `llmzoo fit`.

    python -m benchmarks.shakespeare                     # one run of each, about 5 minutes on 2 cores
    python -m benchmarks.shakespeare --repeats 2 --corpus path/to/tinyshakespeare.txt

Settings (configs/shakespeare-char.yaml): GPT-2-style model, 4 layers, 4 heads, 128 wide, context 64,
batch 12, no dropout, AdamW lr 1e-3 with beta2 0.99, 100 warmup steps, cosine to 1e-4 at 2000 steps,
gradient clipping 1.0; first 90% of the text trains, the last 10% validates every 250 steps (all of it).
nanoGPT reaches val loss 1.886 at step 2000 in this setting; target for llmzoo: <= 1.89.

Speed: the same model trained by a plain PyTorch loop (this file with ``--plain``) on the same batches
(the same TextDataModule windows), with the same optimizer, schedule, clipping and validation work.
Each run is a fresh process, plain and llmzoo in turns; the ratio is of process wall times,
llmzoo / plain (target <= 1.10), and of the training spans (first step to last validation).
``--simultaneous`` runs each pair at the same time with one torch thread each instead: on a machine
shared with other work, both then see the same background load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shakespeare-char.yaml"
SHAKESPEARE = Path(os.environ.get("LLMZOO_SHAKESPEARE", ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))


def plain_loop(corpus: str, cache_dir: str) -> dict:
    """The reference: a hand-written training loop over the config's model, data and evaluation."""
    import torch

    from llmzoo import ARCHITECTURES
    from llmzoo.data import TextDataModule

    config = yaml.safe_load(CONFIG.read_text())
    torch.manual_seed(config["seed_everything"])
    dm = TextDataModule(**{**config["data"]["init_args"], "path": corpus, "cache_dir": cache_dir})
    dm.prepare_data()
    dm.setup("fit")
    model = ARCHITECTURES[config["model"]["class_path"].rsplit(".", 1)[1]](vocab_size=dm.vocab_size,
                                                                          **config["model"]["init_args"])
    optimizers = model.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    trainer = config["trainer"]
    train, val_losses, start = dm.train_dataloader(), {}, time.time()
    batches = iter(train)
    for step in range(1, trainer["max_steps"] + 1):
        batch = next(batches, None)
        if batch is None:  # a new epoch (new windows: the loader starts where the last one stopped)
            batches = iter(train)
            batch = next(batches)
        dm.progress.batches += 1  # what the datamodule counts under Lightning
        loss = model.token_nll(batch)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer["gradient_clip_val"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % trainer["val_check_interval"] == 0:
            model.eval()
            with torch.no_grad():
                sums = [model.token_nll(b, reduction="sum")[:2] for b in dm.val_dataloader()]
            val_losses[step] = float(sum(s for s, _ in sums) / sum(n for _, n in sums))
            model.train()
    return {"val_loss": val_losses, "train_seconds": time.time() - start}


def start(command: list[str], threads: int | None) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return process, time.perf_counter()


def finish(started: tuple[subprocess.Popen, float]) -> tuple[str, float]:
    process, start_time = started
    stdout = process.communicate()[0]
    wall = time.perf_counter() - start_time
    if process.returncode:
        raise RuntimeError(f"{process.args} failed with exit code {process.returncode}")
    return stdout, wall


def llmzoo_command(corpus: str, cache_dir: str, root: str, seed: int | None = None) -> list[str]:
    seeds = [] if seed is None else ["--seed_everything", str(seed), "--data.seed", str(seed)]
    return [sys.executable, "-m", "llmzoo", "fit", "--config", str(CONFIG), "--data.path", corpus,
            "--data.cache_dir", cache_dir, "--trainer.default_root_dir", root, *seeds]


def plain_command(corpus: str, cache_dir: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.shakespeare", "--plain", "--corpus", corpus, "--cache_dir", cache_dir]


def llmzoo_result(root: str, wall: float) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(root) / "lightning_logs" / "version_0"))
    events.Reload()
    val = events.Scalars("val/loss")
    first_step = events.Scalars("train/loss")[0]
    # Lightning logs a validation run inside step k with the step counter at k - 1
    return {"val_loss": {e.step + 1: e.value for e in val}, "wall_seconds": wall,
            "train_seconds": val[-1].wall_time - first_step.wall_time}


def plain_result(stdout: str, wall: float) -> dict:
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "val_loss": {int(step): loss for step, loss in result["val_loss"].items()}, "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(SHAKESPEARE), help="tinyshakespeare.txt")
    parser.add_argument("--repeats", type=int, default=1, help="timed pairs (plain, llmzoo) at the config's seed")
    parser.add_argument("--seeds", type=int, nargs="*", default=[],
                        help="more llmzoo runs (quality only) with these seeds for the model and the data")
    parser.add_argument("--simultaneous", action="store_true", help="run plain and llmzoo at once, 1 thread each")
    parser.add_argument("--plain", action="store_true", help="run only the plain PyTorch loop (prints JSON)")
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(args.corpus, args.cache_dir)))
        return
    from benchmarks.common import hardware

    mode = "simultaneous runs, 1 torch thread each" if args.simultaneous else "runs in turns"
    print(f"Shakespeare char, nanoGPT baby settings, {mode}, on {hardware()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        from llmzoo.data import (
            TextDataModule,  # the token cache both runs read, made before the timings
        )

        config = yaml.safe_load(CONFIG.read_text())
        TextDataModule(**{**config["data"]["init_args"], "path": args.corpus, "cache_dir": tmp}).prepare_data()
        results = {"plain": [], "llmzoo": []}
        threads = 1 if args.simultaneous else None
        for repeat in range(args.repeats):
            root = f"{tmp}/run{repeat}"
            plain = start(plain_command(args.corpus, tmp), threads)
            if not args.simultaneous:
                plain = finish(plain)
            ours = finish(start(llmzoo_command(args.corpus, tmp, root), threads))
            results["plain"].append(plain_result(*(finish(plain) if args.simultaneous else plain)))
            results["llmzoo"].append(llmzoo_result(root, ours[1]))
            for name in results:
                r = results[name][-1]
                print(f"  {name:7s} wall {r['wall_seconds']:6.1f} s  training {r['train_seconds']:6.1f} s  val loss "
                      + "  ".join(f"{step}: {loss:.4f}" for step, loss in sorted(r["val_loss"].items())),
                      flush=True)
        final = {config["seed_everything"]: results["llmzoo"][0]["val_loss"][2000]}
        for seed in args.seeds:
            root = f"{tmp}/seed{seed}"
            wall = finish(start(llmzoo_command(args.corpus, tmp, root, seed), None))[1]
            final[seed] = llmzoo_result(root, wall)["val_loss"][2000]
            print(f"  llmzoo seed {seed}: val loss at step 2000 {final[seed]:.4f}", flush=True)
    median = {name: {key: statistics.median(r[key] for r in runs) for key in ("wall_seconds", "train_seconds")}
              for name, runs in results.items()}
    print("llmzoo val loss at step 2000: " + ", ".join(f"{v:.4f} (seed {k})" for k, v in final.items())
          + (f"; mean {statistics.mean(final.values()):.4f}" if len(final) > 1 else "") + " (target <= 1.89)")
    for key in ("wall_seconds", "train_seconds"):
        print(f"{key.split('_')[0]} time llmzoo / plain: {median['llmzoo'][key] / median['plain'][key]:.3f} "
              f"({median['llmzoo'][key]:.1f} s / {median['plain'][key]:.1f} s; target <= 1.10)")


if __name__ == "__main__":
    main()
