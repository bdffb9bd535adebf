"""Quality benchmark: character-level Tiny Shakespeare with nanoGPT's "baby GPT" CPU settings, through `llmzoo fit`.

    python -m benchmarks.shakespeare                     # one run of each, about 5 minutes on 2 cores
    python -m benchmarks.shakespeare --repeats 2 --corpus path/to/tinyshakespeare.txt
    python -m benchmarks.shakespeare --quick             # 20 steps of each (a smoke run)

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

from benchmarks.common import environment, ratio_text, ratios

TITLE = "Quality: character-level Tiny Shakespeare, llmzoo fit vs a plain PyTorch loop"
TARGETS = {"val_loss": 1.89, "wall": 1.10}
QUICK = {"max_steps": 20, "val_check_interval": 10}  # --quick: the config's trainer settings replaced by these
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shakespeare-char.yaml"
SHAKESPEARE = Path(os.environ.get("LLMZOO_SHAKESPEARE", ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))


def plain_loop(corpus: str, cache_dir: str, trainer_overrides: dict | None = None) -> dict:
    """The reference: a hand-written training loop over the config's model, data and evaluation."""
    import torch

    from llmzoo import ARCHITECTURES
    from llmzoo.data import TextDataModule

    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"].update(trainer_overrides or {})
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


def llmzoo_command(corpus: str, cache_dir: str, root: str, seed: int | None = None,
                   trainer_overrides: dict | None = None) -> list[str]:
    seeds = [] if seed is None else ["--seed_everything", str(seed), "--data.seed", str(seed)]
    overrides = [arg for key, value in (trainer_overrides or {}).items() for arg in (f"--trainer.{key}", str(value))]
    return [sys.executable, "-m", "llmzoo", "fit", "--config", str(CONFIG), "--data.path", corpus,
            "--data.cache_dir", cache_dir, "--trainer.default_root_dir", root, *seeds, *overrides]


def plain_command(corpus: str, cache_dir: str, trainer_overrides: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "benchmarks.shakespeare", "--plain", "--corpus", corpus, "--cache_dir", cache_dir,
            "--trainer_overrides", json.dumps(trainer_overrides or {})]


def llmzoo_result(root: str, wall: float) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(root) / "lightning_logs" / "version_0"))
    events.Reload()
    val = events.Scalars("val/loss")
    first_step = events.Scalars("train/loss")[0]
    # Lightning logs a validation run inside step k with the step counter at k - 1
    return {"val_loss": [[e.step + 1, e.value] for e in val], "wall_seconds": wall,
            "train_seconds": val[-1].wall_time - first_step.wall_time}


def plain_result(stdout: str, wall: float) -> dict:
    result = json.loads(stdout.strip().splitlines()[-1])
    val_loss = [[int(step), loss] for step, loss in result["val_loss"].items()]
    return {**result, "val_loss": val_loss, "wall_seconds": wall}


def final_loss(run: dict) -> float:
    return run["val_loss"][-1][1]


def run(corpus: str, repeats: int = 1, seeds=(), simultaneous: bool = False,
        trainer_overrides: dict | None = None) -> dict:
    """``repeats`` timed pairs (plain loop, then ``llmzoo fit``; or both at once with one thread each), each
    a fresh process at the config's seed, then more ``llmzoo fit`` runs at ``seeds`` (quality only)."""
    from llmzoo.data import TextDataModule

    config = yaml.safe_load(CONFIG.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        # the token cache both runs read, made before the timings
        TextDataModule(**{**config["data"]["init_args"], "path": corpus, "cache_dir": tmp}).prepare_data()
        results = {"plain": [], "llmzoo": []}
        threads = 1 if simultaneous else None
        for repeat in range(repeats):
            root = f"{tmp}/run{repeat}"
            plain = start(plain_command(corpus, tmp, trainer_overrides), threads)
            if not simultaneous:
                plain = finish(plain)
            ours = finish(start(llmzoo_command(corpus, tmp, root, trainer_overrides=trainer_overrides), threads))
            results["plain"].append(plain_result(*(finish(plain) if simultaneous else plain)))
            results["llmzoo"].append(llmzoo_result(root, ours[1]))
            for name in results:
                r = results[name][-1]
                print(f"  {name:7s} wall {r['wall_seconds']:6.1f} s  training {r['train_seconds']:6.1f} s  val loss "
                      + "  ".join(f"{step}: {loss:.4f}" for step, loss in r["val_loss"]), flush=True)
        final = {config["seed_everything"]: final_loss(results["llmzoo"][0])}
        for seed in seeds:
            root = f"{tmp}/seed{seed}"
            wall = finish(start(llmzoo_command(corpus, tmp, root, seed, trainer_overrides), None))[1]
            final[seed] = final_loss(llmzoo_result(root, wall))
            print(f"  llmzoo seed {seed}: final val loss {final[seed]:.4f}", flush=True)
    walls = {name: [r["wall_seconds"] for r in runs] for name, runs in results.items()}
    spans = {name: [r["train_seconds"] for r in runs] for name, runs in results.items()}
    return {**results, "final_by_seed": [[seed, loss] for seed, loss in final.items()],
            "simultaneous": simultaneous, "wall_ratio": ratios(walls["llmzoo"], walls["plain"]),
            "train_ratio": ratios(spans["llmzoo"], spans["plain"])}


def measure(quick: bool = False, corpus: str = str(SHAKESPEARE), repeats: int = 2, seeds=(1, 2),
            simultaneous: bool = False) -> dict:
    env = environment()
    if not Path(corpus).exists():
        return {"env": env, "skipped": f"{corpus} not found (set LLMZOO_SHAKESPEARE to a copy of tinyshakespeare.txt)"}
    overrides = QUICK if quick else {}
    return {"env": env, "quick": quick, "trainer_overrides": overrides,
            **run(corpus, 1 if quick else repeats, () if quick else seeds, simultaneous, overrides)}


def setting() -> str:
    """The run's settings, read from the config."""
    config = yaml.safe_load(CONFIG.read_text())
    model, trainer, data = config["model"]["init_args"], config["trainer"], config["data"]["init_args"]
    return (f"`configs/shakespeare-char.yaml`: {config['model']['class_path'].rsplit('.', 1)[1]}, "
            f"{model['num_layers']} layers, {model['num_heads']} heads, {model['embed_dim']} wide, context "
            f"{data['seq_len']}, batch {data['batch_size']}, dropout {model['dropout']}, AdamW lr "
            f"{model['learning_rate']:g} with betas {tuple(model['betas'])}, {model['warmup_steps']} warmup steps, "
            f"cosine to {model['min_learning_rate']:g} at step {model['lr_decay_steps']}, gradient clipping "
            f"{trainer['gradient_clip_val']}, {trainer['max_steps']} steps; the first "
            f"{1 - data['val_fraction']:.0%} of the text trains, the rest validates (all of it) every "
            f"{trainer['val_check_interval']} steps")


def report(result: dict, plots: Path | None = None) -> str:
    llmzoo, plain = result["llmzoo"], result["plain"]
    mode = ("each pair at the same time, one torch thread each" if result["simultaneous"]
            else "plain first, then llmzoo, default threads")
    lines = [f"Character-level Tiny Shakespeare with nanoGPT's \"baby GPT\" settings, {setting()}"
             + (f" (here replaced by {result['trainer_overrides']})" if result["trainer_overrides"] else "") + ". "
             "The reference is the same model trained by a plain PyTorch loop (`python -m benchmarks.shakespeare "
             "--plain`) on the same batches (the same `TextDataModule` windows), with the same optimizer, schedule, "
             "clipping and validation work. Each run is a fresh process "
             f"({mode}); the ratio is of process wall times, llmzoo / plain, and of the training spans (first step "
             f"to last validation), over {len(llmzoo)} pair(s).", "",
             "| step | " + " | ".join(f"llmzoo val loss (run {i + 1})" for i in range(len(llmzoo)))
             + " | plain loop val loss (run 1) |", "|---|" + "---|" * (len(llmzoo) + 1)]
    for i, (step, loss) in enumerate(plain[0]["val_loss"]):
        lines.append(f"| {step} | " + " | ".join(f"{r['val_loss'][i][1]:.4f}" for r in llmzoo) + f" | {loss:.4f} |")
    walls = {name: statistics.median(r["wall_seconds"] for r in runs) for name, runs in (("llmzoo", llmzoo),
                                                                                       ("plain", plain))}
    finals = result["final_by_seed"]
    lines += ["", "Final val loss of llmzoo: " + ", ".join(f"{loss:.4f} (seed {seed})" for seed, loss in finals)
              + (f"; mean {statistics.mean(loss for _, loss in finals):.4f}" if len(finals) > 1 else "")
              + f" (target <= {TARGETS['val_loss']} at step 2000, nanoGPT's result in this setting). Wall time "
              f"llmzoo / plain: **{ratio_text(result['wall_ratio'])}** (median {walls['llmzoo']:.0f} s / "
              f"{walls['plain']:.0f} s; target <= {TARGETS['wall']:.2f}); training span llmzoo / plain: "
              f"{ratio_text(result['train_ratio'])}. The difference is Lightning's work around the same steps "
              "(its loop, logging, progress bar, checkpointing) and its start-up."]
    if plots is not None:
        from benchmarks.plots import curves

        steps = [step for step, _ in plain[0]["val_loss"]]
        panels = {"validation loss": {"llmzoo fit": [loss for _, loss in llmzoo[0]["val_loss"]],
                                      "plain loop": [loss for _, loss in plain[0]["val_loss"]]}}
        lines += ["", curves(plots / "shakespeare.png", steps, panels, "step", "Tiny Shakespeare (char)", log_x=False)]
    return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, str, str, bool]]:
    finals = [loss for _, loss in result["final_by_seed"]]
    loss = statistics.mean(finals)
    step = result["llmzoo"][0]["val_loss"][-1][0]
    over = f" (mean of {len(finals)} seeds, {min(finals):.4f} to {max(finals):.4f})" if len(finals) > 1 else ""
    return [(f"Shakespeare char val loss at step {step}", f"{loss:.4f}{over}", f"<= {TARGETS['val_loss']}",
             loss <= TARGETS["val_loss"]),
            ("Shakespeare wall time llmzoo / plain loop", ratio_text(result["wall_ratio"]), f"<= {TARGETS['wall']:.2f}",
             result["wall_ratio"]["median"] <= TARGETS["wall"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(SHAKESPEARE), help="tinyshakespeare.txt")
    parser.add_argument("--repeats", type=int, default=1, help="timed pairs (plain, llmzoo) at the config's seed")
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2],
                        help="more llmzoo runs (quality only) with these seeds for the model and the data")
    parser.add_argument("--simultaneous", action="store_true", help="run plain and llmzoo at once, 1 thread each")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument("--plain", action="store_true", help="run only the plain PyTorch loop (prints JSON)")
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    parser.add_argument("--trainer_overrides", type=json.loads, default={}, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(args.corpus, args.cache_dir, args.trainer_overrides)))
        return
    from benchmarks.report import show

    show("shakespeare", measure(args.quick, args.corpus, args.repeats, args.seeds, args.simultaneous))


if __name__ == "__main__":
    main()
