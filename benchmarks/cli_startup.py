"""Start-up of the ``llmzoo`` command: seconds from launching ``llmzoo fit`` to its first training batch, for
this tree and a reference tree (by default the committed one, ``git archive HEAD``), in turns.

    python -m benchmarks.cli_startup
    python -m benchmarks.cli_startup --base /tmp/llmzoo-base --repeats 5 --scenario resume

Scenarios: ``fresh`` (a tiny Llama from ``configs/llama.yaml``, a cached char tokenizer and token file),
``resume`` (``fit --ckpt_path`` a checkpoint of a larger Llama, ``--embed_dim`` x ``--num_layers``, with its
optimizer state, written by the reference tree: the model and data come from the checkpoint, which the CLI
reads and Lightning restores) and ``error`` (``fit --model Llamma``: launch to the end of the process, which
prints one error line).
Each run is a fresh process (what ``llmzoo`` runs: ``llmzoo.cli.main``) with a callback that reports the time
at ``on_train_batch_start`` and ends the process there. Two times: from just before the process is launched
(starting Python and importing torch and Lightning included; on a machine that keeps little in its page
cache that part varies by a second) and from the end of the imports (the CLI's own work: parsing, reading
the checkpoint, building model, data and Trainer, Lightning's restore, the first batch). Both trees use the same
installed packages, corpus and caches; each is warmed up once (tokenizer and token cache, file system cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import hardware, ratio_text, ratios

TITLE = "CLI start-up: launch to the first training batch"
ROOT = Path(__file__).resolve().parents[1]
CLOCK, IMPORTED = "LLMZOO_STARTUP_T0", "LLMZOO_STARTUP_IMPORTED"
COMMAND = f"""
import os, sys, time
import llmzoo.cli
os.environ["{IMPORTED}"] = repr(time.time())
sys.argv[0] = "llmzoo"
llmzoo.cli.main()
"""  # what `llmzoo` runs, with the moment its imports are done
PROBE = f"""
import os, sys, time
from lightning.pytorch.callbacks import Callback

class FirstBatch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.time()
        print(f"first-batch-seconds {{now - float(os.environ['{CLOCK}']):.4f}} "
              f"{{now - float(os.environ['{IMPORTED}']):.4f}}", file=sys.stderr, flush=True)
        os._exit(0)
"""
TINY = ["--model.embed_dim", "32", "--model.num_layers", "2", "--model.num_heads", "4", "--model.num_kv_heads", "2",
        "--data.seq_len", "32", "--data.batch_size", "4", "--data.tokenizer", "char",
        "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]


def llmzoo(tree: Path, work: Path, *args: str, probe: bool = True, fails: bool = False) -> tuple[float, float]:
    """Seconds from launching ``llmzoo ARGS`` with ``tree`` first on the path to its first training batch,
    and from the end of its imports to that batch (without ``probe``: seconds to its end, twice; ``fails``: it
    must end with an ``llmzoo: error:`` line)."""
    callbacks = ["--trainer.callbacks+=llmzoo_startup_probe.FirstBatch"] if probe else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(work / "probe")]), "OMP_NUM_THREADS": "1",
           CLOCK: repr(time.time())}
    env.pop("LLMZOO_DEBUG", None)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", COMMAND, *args, *callbacks], capture_output=True, text=True,
                            env=env, cwd=work, timeout=600)
    if fails:
        if result.returncode != 1 or not result.stderr.strip().splitlines()[-1].startswith("llmzoo: error:"):
            raise RuntimeError(f"llmzoo {' '.join(args)} did not fail with one line in {tree}:\n{result.stderr[-3000:]}")
    elif result.returncode != 0:
        raise RuntimeError(f"llmzoo {' '.join(args)} failed in {tree}:\n{result.stderr[-3000:]}")
    if not probe:
        return (time.perf_counter() - start,) * 2
    line = next(line for line in result.stderr.splitlines() if line.startswith("first-batch-seconds"))
    return float(line.split()[1]), float(line.split()[2])


def fit_args(tree: Path, work: Path, scenario: str, run: Path, checkpoint: Path | None) -> list[str]:
    if scenario == "error":
        return ["fit", "--model", "Llamma", "--data.path", str(work / "corpus.txt"), "--trainer.default_root_dir",
                str(run)]
    if scenario == "resume":
        return ["fit", "--ckpt_path", str(checkpoint), "--trainer.max_steps", "2", "--trainer.default_root_dir",
                str(run), "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
                "--trainer.logger", "false"]
    return ["fit", "--config", str(tree / "configs" / "llama.yaml"), "--data.path", str(work / "corpus.txt"),
            "--data.cache_dir", str(work / "cache"), *TINY, "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(run)]


def resume_checkpoint(tree: Path, work: Path, embed_dim: int, num_layers: int) -> Path:
    """A 1-step checkpoint of a Llama of ``embed_dim`` x ``num_layers`` (weights and AdamW state), written by
    ``tree`` (the reference: a newer tree may record hyperparameters an older one does not know)."""
    run = work / "trained"
    llmzoo(tree, work, "fit", "--model", "Llama", "--model.embed_dim", str(embed_dim), "--model.num_heads", "8",
           "--model.num_layers", str(num_layers), "--model.max_position_embeddings", "64",
           "--data", "TextDataModule", "--data.path", str(work / "corpus.txt"), "--data.cache_dir", str(work / "cache"),
           "--data.tokenizer", "char", "--data.seq_len", "32", "--data.batch_size", "4",
           "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.default_root_dir", str(run), probe=False)
    return run / "checkpoints" / "last.ckpt"


def committed_tree(into: Path) -> Path:
    """The committed tree (``git archive HEAD``, which changes nothing in the repository) under ``into``."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure(base: Path | None = None, scenarios: tuple[str, ...] = ("fresh", "resume"), repeats: int = 3,
            embed_dim: int = 512, num_layers: int = 8) -> dict:
    """Seconds to the first batch of each tree and scenario, in turns (reference, this tree, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "probe").mkdir()
        (work / "probe" / "llmzoo_startup_probe.py").write_text(PROBE)
        (work / "corpus.txt").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)))
        trees = {"reference": base or committed_tree(work / "reference"), "this tree": ROOT}
        checkpoint = resume_checkpoint(trees["reference"], work, embed_dim, num_layers) if "resume" in scenarios else None
        times = {scenario: {name: [] for name in trees} for scenario in scenarios}
        after_imports = {scenario: {name: [] for name in trees} for scenario in scenarios}
        for scenario in scenarios:
            for name, tree in trees.items():  # warm-up: caches, the file system's pages
                llmzoo(tree, work, *fit_args(tree, work, scenario, work / "warm" / scenario / name, checkpoint),
                       probe=scenario != "error", fails=scenario == "error")
            for turn in range(repeats):
                for name, tree in trees.items():
                    run = work / "runs" / f"{scenario}-{name}-{turn}".replace(" ", "-")
                    total, cli = llmzoo(tree, work, *fit_args(tree, work, scenario, run, checkpoint),
                                        probe=scenario != "error", fails=scenario == "error")
                    times[scenario][name].append(total)
                    after_imports[scenario][name].append(cli)
        size = checkpoint.stat().st_size / 2**20 if checkpoint else None
    return dict(hardware=hardware(), reference=str(base or "HEAD"), checkpoint_mib=size, times=times,
                after_imports=after_imports,
                ratios={scenario: ratios(t["reference"], t["this tree"]) for scenario, t in times.items()},
                after_imports_ratios={scenario: ratios(t["reference"], t["this tree"])
                                      for scenario, t in after_imports.items()})


def report(result: dict) -> str:
    lines = [TITLE, f"{result['hardware']}; reference: {result['reference']}"]
    for scenario in result["times"]:
        extra = f" (checkpoint of {result['checkpoint_mib']:.0f} MiB)" if scenario == "resume" else ""
        for what, key, ratio in ((("launch to the error line", "times", "ratios"),) if scenario == "error" else
                                 (("launch to first batch", "times", "ratios"),
                                  ("imports done to first batch", "after_imports", "after_imports_ratios"))):
            times = result[key][scenario]
            medians = ", ".join(f"{name} {statistics.median(t):.2f} s" for name, t in times.items())
            runs = "; ".join(f"{name}: {' '.join(f'{s:.2f}' for s in t)}" for name, t in times.items())
            lines.append(f"{scenario}{extra}, {what}: median {medians}; reference / this tree "
                         f"{ratio_text(result[ratio][scenario])}  [{runs}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli_startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="the reference tree (default: git archive HEAD)")
    parser.add_argument("--scenario", nargs="+", choices=["fresh", "resume", "error"],
                        default=["fresh", "resume", "error"])
    parser.add_argument("--repeats", type=int, default=3, help="turns per tree and scenario (default: 3)")
    parser.add_argument("--embed_dim", type=int, default=512, help="resume: the checkpoint's model width")
    parser.add_argument("--num_layers", type=int, default=8, help="resume: the checkpoint's model depth")
    args = parser.parse_args(argv)
    print(report(measure(args.base, tuple(args.scenario), args.repeats, args.embed_dim, args.num_layers)))


if __name__ == "__main__":
    main()
