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


def run_llmzoo(corpus: str, cache_dir: str, root: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [sys.executable, "-m", "llmzoo", "fit", "--config", str(CONFIG), "--data.path", corpus,
               "--data.cache_dir", cache_dir, "--trainer.default_root_dir", root]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    events = EventAccumulator(str(Path(root) / "lightning_logs" / "version_0"))
    events.Reload()
    val = events.Scalars("val/loss")
    first_step = events.Scalars("train/loss")[0]
    return {"val_loss": {e.step: e.value for e in val}, "wall_seconds": wall,
            "train_seconds": val[-1].wall_time - first_step.wall_time}


def run_plain(corpus: str, cache_dir: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.shakespeare", "--plain", "--corpus", corpus, "--cache_dir", cache_dir]
    start = time.perf_counter()
    result = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(SHAKESPEARE), help="tinyshakespeare.txt")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--plain", action="store_true", help="run only the plain PyTorch loop (prints JSON)")
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(args.corpus, args.cache_dir)))
        return
    from benchmarks.common import hardware

    print(f"Shakespeare char, nanoGPT baby settings, on {hardware()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        from llmzoo.data import TextDataModule  # the token cache both runs read, made before the timings

        config = yaml.safe_load(CONFIG.read_text())
        TextDataModule(**{**config["data"]["init_args"], "path": args.corpus, "cache_dir": tmp}).prepare_data()
        results = {"plain": [], "llmzoo": []}
        for repeat in range(args.repeats):
            results["plain"].append(run_plain(args.corpus, tmp))
            results["llmzoo"].append(run_llmzoo(args.corpus, tmp, f"{tmp}/run{repeat}"))
            for name in results:
                r = results[name][-1]
                print(f"  {name:7s} wall {r['wall_seconds']:6.1f} s  training {r['train_seconds']:6.1f} s  val loss "
                      + "  ".join(f"{step}: {loss:.4f}" for step, loss in sorted(r["val_loss"].items(),
                                                                                   key=lambda item: int(item[0]))),
                      flush=True)
    median = {name: {key: statistics.median(r[key] for r in runs) for key in ("wall_seconds", "train_seconds")}
              for name, runs in results.items()}
    final = [r["val_loss"][max(r["val_loss"], key=int)] for r in results["llmzoo"]]
    print(f"llmzoo val loss at step 2000: {', '.join(f'{v:.4f}' for v in final)} (target <= 1.89)")
    for key in ("wall_seconds", "train_seconds"):
        print(f"{key.split('_')[0]} time llmzoo / plain: {median['llmzoo'][key] / median['plain'][key]:.3f} "
              f"({median['llmzoo'][key]:.1f} s / {median['plain'][key]:.1f} s; target <= 1.10)")


if __name__ == "__main__":
    main()
