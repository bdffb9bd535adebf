"""The guarantees of docs/reliability.md: exact resume after SIGKILL, checkpoints written whole or not at all,
a stop on a non-finite loss, one clear line for each bad input, safe loading, and property tests.

The crash tests run ``llmzoo fit`` as real subprocesses and interrupt them with the callbacks of
tests/interrupt.py (passed with ``--trainer.callbacks+=``)."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}
ENV.pop("LLMZOO_DEBUG", None)


def command(*args) -> list[str]:
    return [sys.executable, "-m", "llmzoo", *map(str, args)]


def llmzoo(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_bitwise_equal(a, b, where: str = "") -> None:
    """Nested checkpoint contents equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus: one text file (an epoch of TextDataModule is 5 batches, so a run crosses epochs) and
    the same functions as JSON lines for the stream."""
    tmp = tmp_path_factory.mktemp("corpus")
    functions = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40)]
    (tmp / "corpus.txt").write_text("".join(functions[:12]))
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": f}) + "\n" for f in functions))
    return tmp


def fit_args(corpus: Path, root: Path, datamodule: str, *extra) -> list:
    """A tiny Llama with dropout (so the random state matters) for 8 steps, validating every 2 and
    checkpointing every 3, with 2 DataLoader workers."""
    data = (["--data", "TextDataModule", "--data.path", corpus / "corpus.txt", "--data.val_fraction", "0.2"]
            if datamodule == "text" else
            ["--data", "StreamingTextDataModule", "--data.path", corpus / "docs.jsonl", "--data.val_path",
             corpus / "docs.jsonl", "--data.shuffle_buffer", "8"])
    return ["fit", "--model", "Llama", "--model.embed_dim", "32", "--model.num_heads", "4", "--model.num_kv_heads", "2",
            "--model.num_layers", "2", "--model.max_position_embeddings", "64", "--model.dropout", "0.1",
            "--model.learning_rate", "1e-2", "--model.warmup_steps", "2", *data, "--data.tokenizer", "char",
            "--data.seq_len", "16", "--data.batch_size", "4", "--data.num_workers", "2",
            "--data.cache_dir", corpus / "cache", "--trainer.max_steps", "8", "--trainer.val_check_interval", "2",
            "--trainer.check_val_every_n_epoch", "null", "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--checkpoint.every_n_train_steps", "3", "--trainer.default_root_dir", root, *extra]


def sigkill_after_checkpoint(args: list, marker: Path) -> int:
    """Runs ``llmzoo fit`` until :class:`interrupt.PauseAtStep` reports, then SIGKILLs it; its return code."""
    process = subprocess.Popen(command(*args, "--trainer.callbacks+=interrupt.PauseAtStep",
                                       "--trainer.callbacks.step", "4", "--trainer.callbacks.marker", marker),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run never reached step 4"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    return process.wait(timeout=60)


@pytest.mark.parametrize("datamodule", ["text", "streaming"])
def test_resume_after_sigkill_is_bitwise_exact(corpus, tmp_path, datamodule):
    """SIGKILL after the checkpoint of step 3, while step 4 was being trained (it is lost), then resume
    with ``--ckpt_path last``: weights, optimizer and schedule at step 8 equal those of an uninterrupted run
    bit for bit (dropout draws, data position across epochs and workers, learning rate all resume)."""
    with ThreadPoolExecutor(2) as pool:
        straight = pool.submit(llmzoo, *fit_args(corpus, tmp_path / "straight", datamodule))
        killed = pool.submit(sigkill_after_checkpoint, fit_args(corpus, tmp_path / "killed", datamodule),
                             tmp_path / "paused")
        assert killed.result() == -signal.SIGKILL
        check(straight.result())
    assert load(tmp_path / "killed" / "checkpoints" / "last.ckpt")["global_step"] == 3
    resumed = check(llmzoo(*fit_args(corpus, tmp_path / "killed", datamodule, "--ckpt_path", "last")))
    assert "Restoring states from the checkpoint path" in resumed.stderr + resumed.stdout
    expected, actual = (load(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("straight", "killed"))
    assert actual["global_step"] == expected["global_step"] == 8
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_bitwise_equal(actual[key], expected[key], key)
    assert actual["loops"]["fit_loop"]["state_dict"] == expected["loops"]["fit_loop"]["state_dict"]  # data position
