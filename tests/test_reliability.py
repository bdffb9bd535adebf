"""The guarantees of docs/reliability.md: exact resume after SIGKILL, checkpoints written whole or not at all,
a stop on a non-finite loss, one clear line for each bad input, safe loading, and property tests.

The crash tests run ``llmzoo fit`` as real subprocesses and interrupt them with the callbacks of
tests/interrupt.py (passed with ``--trainer.callbacks+=``)."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from interrupt import PoisonAtStep
from lightning.fabric.plugins import TorchCheckpointIO
from tiny import tiny_model

from llmzoo.callbacks import AtomicCheckpointIO, Checkpoint
from llmzoo.cli import LLMZooCLI, main
from llmzoo.data import TextDataModule, Tokenizer
from llmzoo.data.sources import read_pieces
from llmzoo.generation import generate

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


# ----------------------------------------------------------------------------- checkpoints written whole
def test_a_kill_while_last_ckpt_is_written_leaves_the_previous_one(corpus, tmp_path):
    """SIGKILL halfway through writing ``last.ckpt`` at step 3: the file still holds step 2 and loads, and
    the resumed run removes the torn temporary and trains on."""
    run = tmp_path / "run"
    args = fit_args(corpus, run, "text", "--checkpoint.every_n_train_steps", "1", "--trainer.max_steps", "4",
                    "--data.num_workers", "0")
    killed = llmzoo(*args, "--trainer.callbacks+=interrupt.KillDuringSave", "--trainer.callbacks.step", "3")
    assert killed.returncode == -signal.SIGKILL
    checkpoints = run / "checkpoints"
    assert [p.name for p in checkpoints.glob(".last.ckpt.*.tmp")]  # the torn half, beside the intact file
    assert load(checkpoints / "last.ckpt")["global_step"] == 2
    check(llmzoo(*args, "--ckpt_path", "last"))
    assert load(checkpoints / "last.ckpt")["global_step"] == 4
    assert not list(checkpoints.glob(".*.tmp"))


def test_checkpoints_are_renamed_from_a_temporary_beside_them(tmp_path, monkeypatch):
    """Lightning's own writer renames a temporary from the system's temp directory (a non-atomic copy when
    that is another file system); the Checkpoint callback installs one that writes beside the file."""
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Checkpoint(dirpath=tmp_path / "ckpt")])
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    trainer.fit(tiny_model("GPT2"), torch.utils.data.DataLoader(list(torch.randint(0, 97, (4, 9))), batch_size=2))
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    written = {dst.name: src for src, dst in renames if dst.suffix == ".ckpt"}
    assert set(written) == {"epoch=0-step=2.ckpt", "last.ckpt"}
    assert all(src.parent == tmp_path / "ckpt" and src.name.startswith(f".{name}.") for name, src in written.items())
    assert load(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 2
    assert oct((tmp_path / "ckpt" / "last.ckpt").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- non-finite loss
def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    result = llmzoo(*fit_args(corpus, run, "text", "--checkpoint.every_n_train_steps", "2", "--data.num_workers", "0"),
                    "--trainer.callbacks+=interrupt.PoisonAtStep", "--trainer.callbacks.step", "5")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "llmzoo: error: the training loss is nan at step 6; the step was not applied and the checkpoints of step 5")
    assert "Traceback" not in result.stderr
    last = load(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and all(t.isfinite().all() for t in last["state_dict"].values())
    assert not list((run / "checkpoints").glob("*step=6*"))


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path):
    """Weights that became inf in a step whose loss was finite are never saved."""
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[PoisonAtStep(3, float("inf"), at="end"),
                                                               Checkpoint(dirpath=tmp_path, every_n_train_steps=1)])
    with pytest.raises(FloatingPointError, match=r"the weights hold NaN or inf after step 3, so no checkpoint "
                                                 r"was written \(epoch=0-step=3.ckpt\); the previous checkpoints"):
        trainer.fit(tiny_model("GPT2"), torch.utils.data.DataLoader(list(torch.randint(0, 97, (8, 9))), batch_size=2))
    assert load(tmp_path / "last.ckpt")["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]


# ----------------------------------------------------------------------------- bad input
def error_line(*args) -> str:
    """The message ``llmzoo`` ends with for ``args`` (in this process): one line."""
    with pytest.raises(SystemExit) as exit_:
        main(list(map(str, args)))
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("llmzoo: error: ") and "\n" not in message, message
    return message.removeprefix("llmzoo: error: ")


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """The last.ckpt of a 2-step run of the tiny Llama (vocab of 28 characters), trained in this process."""
    root = tmp_path_factory.mktemp("trained")
    args = fit_args(corpus, root, "text", "--trainer.max_steps", "2", "--data.num_workers", "0")
    LLMZooCLI(args=list(map(str, args)))
    return root / "checkpoints" / "last.ckpt"


def bad_inputs(corpus: Path, trained: Path, tmp: Path) -> dict[str, tuple[list, str]]:
    """Each bad input of docs/reliability.md: (the ``llmzoo`` arguments, the start of the error line).
    Runs go to ``tmp / "run"``, which must not exist afterwards."""
    run = tmp / "run"
    (tmp / "empty.txt").write_text("")
    (tmp / "random.bin").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.uint8).numpy().tobytes())
    (tmp / "short.txt").write_text("tiny\n")
    stream = fit_args(corpus, run, "stream", "--data.num_workers", "0")
    (tmp / "bad.yaml").write_text("model:\n  class_path: llmzoo.Llama\n   init_args: [\n")
    truncated, garbage, crafted = tmp / "truncated.ckpt", tmp / "garbage.ckpt", tmp / "crafted.ckpt"
    truncated.write_bytes(trained.read_bytes()[:trained.stat().st_size // 2])
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    torch.save({"state_dict": {}, "payload": Payload(tmp / "pwned")}, crafted)
    (tmp / "broken").mkdir()
    (tmp / "big").mkdir()
    (tmp / "broken" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    big = Tokenizer.train_bpe([(corpus / "corpus.txt").read_text()] * 3, vocab_size=300)
    big.save(tmp / "big")
    vocab_size = load(trained)["hyper_parameters"]["vocab_size"]
    fit = fit_args(corpus, run, "text", "--data.num_workers", "0")
    evaluate = ["--ckpt_path", trained, "--trainer.default_root_dir", run]
    return {
        "missing corpus path": ([*fit, "--data.path", tmp / "missing.txt"],
                                f"data path '{tmp / 'missing.txt'}' does not exist: give text files, folders or globs"),
        "empty corpus": ([*fit, "--data.path", tmp / "empty.txt"], "the corpus is empty: the 1 file(s) of --data.path"),
        "binary corpus": ([*fit, "--data.path", tmp / "random.bin"],
                          f"{tmp / 'random.bin'} does not look like text: its start holds NUL bytes"),
        "corpus smaller than a window": ([*fit, "--data.path", tmp / "short.txt"],
                                         "the corpus holds 6 tokens, 5 of them for training: fewer than one window of "
                                         "--data.seq_len + 1 = 17"),
        "streaming without max_steps": ([*stream, "--trainer.max_steps", "-1"],
                                        "StreamingTextDataModule streams forever: set --trainer.max_steps"),
        "unknown config key": ([*fit, "--model.embed_dimm", "32"], "--model: Option 'embed_dimm' is not accepted"),
        "unknown trainer key": ([*fit, "--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3"),
        "wrong type": ([*fit, "--trainer.max_steps", "many"], "--trainer.max_steps: Expected int. Got value: many"),
        "embed_dim not divisible by num_heads": ([*fit, "--model.embed_dim", "30"],
                                                 "embed_dim=30 is not divisible by num_heads=4: pick a num_heads"),
        "num_heads not divisible by num_kv_heads": ([*fit, "--model.num_kv_heads", "3"],
                                                    "num_heads=4 is not divisible by num_kv_heads=3"),
        "experts_per_token > num_experts": ([*fit, "--model", "Mixtral", "--model.num_experts", "2",
                                             "--model.experts_per_token", "3"],
                                            "experts_per_token=3 must be between 1 and num_experts=2"),
        "tokenizer larger than the model's vocab_size": (["validate", *evaluate, "--data.tokenizer", tmp / "big"],
                                                         f"the tokenizer has {big.vocab_size} tokens but the model of "
                                                         f"{trained} has vocab_size={vocab_size}"),
        "seq_len above max_position_embeddings": ([*fit, "--data.seq_len", "100"],
                                                  "--data.seq_len=100 is longer than the model's "
                                                  "max_position_embeddings=64"),
        "prompt longer than the context": (["generate", *evaluate, "--prompt", "x" * 80],
                                           "the prompt has 80 tokens, but the model's context of 64 tokens"),
        "max_new_tokens <= 0": (["generate", *evaluate, "--max_new_tokens", "0"],
                                "max_new_tokens must be a positive integer, got 0"),
        "top_p outside (0, 1]": (["generate", *evaluate, "--top_p", "1.5"], "top_p must be in (0, 1], got 1.5"),
        "checkpoint of another architecture": (["validate", *evaluate, "--model", "Mixtral"],
                                               f"{trained} holds a Llama model, not a llmzoo.Mixtral: leave out"),
        "missing checkpoint": (["validate", "--ckpt_path", tmp / "missing.ckpt"],
                               f"checkpoint {tmp / 'missing.ckpt'} does not exist"),
        "truncated checkpoint": (["validate", "--ckpt_path", truncated],
                                 f"cannot read checkpoint {truncated}: the file is truncated, corrupted"),
        "corrupted checkpoint": (["fit", "--ckpt_path", garbage, *fit[1:]],
                                 f"cannot read checkpoint {garbage}: the file is truncated, corrupted"),
        "unsafe checkpoint (a pickle that runs code)": (["validate", "--ckpt_path", crafted],
                                                        f"refusing to load {crafted}: it holds objects that are not "
                                                        f"plain tensors and containers "
                                                        f"({os.system.__module__}.system)"),
        "missing tokenizer.json": ([*fit, "--data.tokenizer", tmp / "nowhere" / "tokenizer.json"],
                                   f"tokenizer {tmp / 'nowhere' / 'tokenizer.json'} does not exist: pass the "
                                   f"tokenizer.json or checkpoint the model was trained with"),
        "corrupted tokenizer.json": ([*fit, "--data.tokenizer", tmp / "broken" / "tokenizer.json"],
                                     f"{tmp / 'broken' / 'tokenizer.json'}: not a valid tokenizer.json"),
        "num_layers 0": ([*fit, "--model.num_layers", "0"],
                         "num_layers=0 is out of range: it must be >= 1 (set --model.num_layers)"),
        "num_heads 0": ([*fit, "--model.num_heads", "0"], "num_heads=0 is out of range: it must be >= 1"),
        "negative learning rate": ([*fit, "--model.learning_rate", "-0.001"],
                                   "learning_rate=-0.001 is out of range: it must be > 0 (set --model.learning_rate)"),
        "negative learning rate, scientific notation": ([*fit, "--model.learning_rate", "-1e-3"],
                                                        "learning_rate=-0.001 is out of range: it must be > 0"),
        "misspelt architecture": ([*fit, "--model", "Lama"],
                                  "--model Lama is not a known class (did you mean Llama?): use one of GPT, GPT2, "
                                  "Llama,"),
        "invalid YAML config": (["fit", "--config", tmp / "bad.yaml"],
                                f"{tmp / 'bad.yaml'} is not valid YAML: mapping values are not allowed here at line 3"),
        "missing config file": (["fit", "--config", tmp / "nowhere.yaml"],
                                f"config file {tmp / 'nowhere.yaml'} does not exist"),
        "default_root_dir is a file": ([*fit, "--trainer.default_root_dir", tmp / "empty.txt"],
                                       f"--trainer.default_root_dir {tmp / 'empty.txt'} is a file: give a directory"),
        "vocab_size typed, not linked": ([*fit, "--model.vocab_size", "10"],
                                         "--model.vocab_size=10 is set by the tokenizer, which has"),
        "output directory of another run": ([*fit_args(corpus, trained.parents[1], "text", "--model.num_layers", "3")],
                                            f"{trained.parents[1]} holds another run (--model.num_layers is 3 here, 2 "
                                            f"in the run): use another --trainer.default_root_dir"),
    }


class Payload:
    """Unpickling it would run a shell command that creates ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)




def test_every_bad_input_is_one_line_naming_problem_and_fix_and_writes_nothing(corpus, trained, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in trained.parents[1].rglob("*")}
    cases = bad_inputs(corpus, trained, tmp_path)
    for name, (args, expected) in cases.items():
        message = error_line(*args)
        assert message.startswith(expected), f"{name}: {message}"
        assert not (tmp_path / "run").exists(), f"{name} wrote {list((tmp_path / 'run').rglob('*'))}"
    assert not (tmp_path / "pwned").exists()  # the crafted pickle never ran
    assert {p: p.stat().st_mtime_ns for p in trained.parents[1].rglob("*")} == before  # the other run untouched
    assert len(cases) == 33


def test_every_entry_point_taking_a_file_refuses_a_crafted_pickle_with_the_one_message(corpus, trained, tmp_path):
    """Every way a user hands llmzoo a file that could be a pickle (CLI flags and Python functions) goes through
    ``llmzoo.checkpoints.read_checkpoint``: the same refusal, naming what the pickle would call, and the pickle's
    code never runs (its marker file never appears)."""
    from llmzoo import CausalLM, Llama
    from llmzoo.checkpoints import read_checkpoint
    from llmzoo.data import load_tokenizer_for_checkpoint
    from llmzoo.hf import convert_checkpoint_to_hf, from_hf, load_checkpoint_model, to_hf

    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": Payload(tmp_path / "pwned")}, crafted)
    hf = tmp_path / "hf"  # a Hugging Face directory whose pickled weights are the crafted file
    to_hf(Llama(vocab_size=28, embed_dim=32, num_heads=4, num_layers=1, max_position_embeddings=64), hf)
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(crafted.read_bytes())
    sharded = tmp_path / "sharded"  # a sharded checkpoint directory whose meta.pt is the crafted file
    sharded.mkdir()
    (sharded / "meta.pt").write_bytes(crafted.read_bytes())
    refusal = f"refusing to load {{}}: it holds objects that are not plain tensors and containers ({os.system.__module__}.system)"
    fit = fit_args(corpus, tmp_path / "run", "text", "--data.num_workers", "0")
    generate_args = ["generate", "--ckpt_path", trained, "--max_new_tokens", "2"]
    cli = {
        "fit --ckpt_path": ([*fit, "--ckpt_path", crafted], crafted),
        "validate --ckpt_path": (["validate", "--ckpt_path", crafted], crafted),
        "generate --ckpt_path": (["generate", "--ckpt_path", crafted], crafted),
        "fit --data.tokenizer": ([*fit, "--data.tokenizer", crafted], crafted),
        "generate --draft_ckpt_path": ([*generate_args, "--draft_ckpt_path", crafted], crafted),
        "convert --ckpt_path --to_hf": (["convert", "--ckpt_path", crafted, "--to_hf", tmp_path / "out"], crafted),
        "convert --tokenizer": (["convert", "--ckpt_path", trained, "--to_hf", tmp_path / "out", "--tokenizer",
                                 crafted], crafted),
        "convert --from_hf --allow_pickle": (["convert", "--from_hf", hf, "--to", tmp_path / "out.ckpt",
                                              "--allow_pickle", "true"], hf / "pytorch_model.bin"),
        "convert sharded --ckpt_path --to": (["convert", "--ckpt_path", sharded, "--to", tmp_path / "out.ckpt"],
                                             sharded / "meta.pt"),
    }
    for name, (args, path) in cli.items():
        assert error_line(*args) == refusal.format(path) + "; only load checkpoints you trust", name
    python = {
        "read_checkpoint": (lambda: read_checkpoint(crafted), crafted),
        "load_checkpoint_model": (lambda: load_checkpoint_model(crafted), crafted),
        "CausalLM.load_from_checkpoint": (lambda: CausalLM.load_from_checkpoint(crafted), crafted),
        "Llama.load_from_checkpoint": (lambda: Llama.load_from_checkpoint(crafted), crafted),
        "load_tokenizer_for_checkpoint": (lambda: load_tokenizer_for_checkpoint(crafted), crafted),
        "convert_checkpoint_to_hf": (lambda: convert_checkpoint_to_hf(crafted, tmp_path / "out"), crafted),
        "from_hf(allow_pickle=True)": (lambda: from_hf(hf, allow_pickle=True), hf / "pytorch_model.bin"),
    }
    for name, (call, path) in python.items():
        with pytest.raises(ValueError) as refused:
            call()
        assert str(refused.value).startswith(refusal.format(path)), (name, str(refused.value))
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()


PREFLIGHT = """
import sys
from llmzoo.cli import main
for args in sys.argv[1:]:
    try:
        main(args.split())
    except SystemExit as stop:
        print(stop)
print("imported:", sorted(name for name in ("torch", "lightning", "jsonargparse", "llmzoo.models") if name in sys.modules))
"""


def test_a_mistyped_class_or_config_is_reported_before_torch_is_imported(tmp_path):
    """``llmzoo fit --model Llamma`` answers in a fraction of a second: the preflight checks run before torch,
    Lightning and jsonargparse are imported (benchmarks/cli_startup.py --scenario error times it)."""
    (tmp_path / "lama.yaml").write_text("model:\n  class_path: Lama\n")
    (tmp_path / "bad.yaml").write_text("model: [\n")
    cases = {f"fit --model Llamma --data.path {tmp_path}": "--model Llamma is not a known class (did you mean Llama?)",
             "fit --data=TextDataModul": "--data TextDataModul is not a known class (did you mean TextDataModule?)",
             f"validate --config {tmp_path / 'lama.yaml'}": "--model Lama is not a known class (did you mean Llama?)",
             f"fit --config {tmp_path / 'bad.yaml'}": f"{tmp_path / 'bad.yaml'} is not valid YAML",
             f"fit -c {tmp_path / 'none.yaml'}": f"config file {tmp_path / 'none.yaml'} does not exist"}
    result = subprocess.run([sys.executable, "-c", PREFLIGHT, *cases], capture_output=True, text=True, env=ENV,
                            timeout=120, cwd=ROOT)
    *messages, imported = result.stdout.strip().splitlines()
    assert len(messages) == len(cases) and imported == "imported: []", result.stdout + result.stderr
    for message, expected in zip(messages, cases.values()):
        assert message.startswith(f"llmzoo: error: {expected}"), message
    assert not list(tmp_path.glob("lightning_logs")) and not (ROOT / "lightning_logs").exists()


def test_the_preflight_list_of_classes_is_the_registry():
    from llmzoo.cli.preflight import KNOWN_CLASSES
    from llmzoo.data import LanguageDataModule
    from llmzoo.models import ARCHITECTURES

    def subclasses(cls: type) -> set[type]:
        return set().union(*({child} | subclasses(child) for child in cls.__subclasses__()))

    assert set(KNOWN_CLASSES["model"]) == set(ARCHITECTURES)
    public = {c.__name__ for c in subclasses(LanguageDataModule) if c.__module__.startswith("llmzoo.")}
    assert set(KNOWN_CLASSES["data"]) == public


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_lightning_refusing_the_trainer_settings_is_one_line(corpus, tmp_path):
    message = error_line(*fit_args(corpus, tmp_path / "run", "text", "--trainer.accelerator", "gpu"))
    assert message == ("No supported gpu backend found: Lightning refused the trainer settings (check "
                       "--trainer.accelerator, --trainer.devices, --trainer.strategy)")
    assert not (tmp_path / "run").exists()


def test_errors_exit_with_status_1_and_no_traceback_unless_llmzoo_debug(tmp_path):
    args = ["fit", "--model", "GPT2", "--trainer.max_steps", "many", "--trainer.default_root_dir", tmp_path / "run"]
    with ThreadPoolExecutor(2) as pool:
        quiet = pool.submit(llmzoo, *args)
        debug = pool.submit(subprocess.run, command(*args), capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**ENV, "LLMZOO_DEBUG": "1"})
    quiet, debug = quiet.result(), debug.result()
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1] == (
        "llmzoo: error: --trainer.max_steps: Expected int. Got value: many (llmzoo --help lists the subcommands, "
        "llmzoo fit --help their options)")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_directory_is_resumed_or_restarted_by_the_same_run_and_used_by_another_only_when_asked(corpus, tmp_path):
    def fit(*extra, last: str = "last.ckpt"):
        LLMZooCLI(args=list(map(str, fit_args(corpus, tmp_path, "text", "--trainer.max_steps", "1",
                                              "--data.num_workers", "0", *extra))))
        return load(tmp_path / "checkpoints" / last)

    assert fit()["global_step"] == 1
    assert fit("--trainer.max_steps", "2", "--ckpt_path", "last")["global_step"] == 2  # resumed
    assert fit("--data.num_workers", "2", last="last-v1.ckpt")["global_step"] == 1  # started over beside it
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2  # nothing overwritten
    message = error_line(*fit_args(corpus, tmp_path, "text", "--model.embed_dim", "64"))
    assert message.startswith(f"{tmp_path} holds another run (--model.embed_dim is 64 here, 32 in the run)")
    assert message.endswith("or --overwrite true to train over it")
    replaced = fit("--model.embed_dim", "64", "--overwrite", "true", last="last-v2.ckpt")
    assert replaced["hyper_parameters"]["embed_dim"] == 64


def test_non_utf8_bytes_are_replaced_and_counted_in_a_warning(tmp_path):
    raw = "caf\u00e9 ".encode() + b"\xff\xfe ok \xc3(" + b" and plain text after it\n"  # 3 invalid: ff, fe, c3
    (tmp_path / "latin.txt").write_bytes(raw * 50)
    (tmp_path / "latin2.txt").write_bytes(raw * 50)
    with gzip.open(tmp_path / "docs.jsonl.gz", "wb") as f:
        f.write(b'{"text": "a\xffb"}\n')
    with pytest.warns(UserWarning, match=r"latin.txt: 150 bytes are not UTF-8 and were read as U\+FFFD; re-encode"):
        text = "".join(piece for piece, _ in read_pieces(tmp_path / "latin.txt"))
    assert text == "caf\u00e9 \ufffd\ufffd ok \ufffd( and plain text after it\n" * 50
    with pytest.warns(UserWarning, match="docs.jsonl.gz: 1 bytes are not UTF-8"):
        assert list(read_pieces(tmp_path / "docs.jsonl.gz")) == [("a\ufffdb", True)]
    dm = TextDataModule(str(tmp_path / "latin2.txt"), tokenizer="char", seq_len=8, batch_size=2,
                        cache_dir=str(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.prepare_data()  # trains the tokenizer, then tokenizes (the file read twice): no crash, one warning
    assert [str(w.message).split(": ", 1)[1][:30] for w in caught if "UTF-8" in str(w.message)] == [
        "150 bytes are not UTF-8 and we"]
    assert dm.tokenizer.decode(dm.tokenizer.encode("\ufffd")) == "\ufffd"


def test_a_file_that_is_not_text_is_refused_unless_allowed(tmp_path):
    noise = torch.randint(0, 256, (100_000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (tmp_path / "noise.bin").write_bytes(noise.numpy().tobytes())
    (tmp_path / "utf16.txt").write_bytes("UTF-16 text, as Windows tools write it\n".encode("utf-16") * 10)
    (tmp_path / "nonul.bin").write_bytes(bytes(b for b in noise.tolist() if b))  # mostly invalid, no NUL
    for name, why in (("noise.bin", "holds NUL bytes"), ("utf16.txt", "holds NUL bytes"),
                      ("nonul.bin", r"is 43% bytes that are not UTF-8")):
        dm = TextDataModule(str(tmp_path / name), tokenizer="char", cache_dir=str(tmp_path / "cache"))
        with pytest.raises(ValueError, match=rf"{name} does not look like text: its start {why}.*--data.allow_binary"):
            dm.vocab_size
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("tokenizer-*"))
    allowed = TextDataModule(str(tmp_path / "noise.bin"), tokenizer="char", cache_dir=str(tmp_path / "cache"),
                             allow_binary=True)
    with pytest.warns(UserWarning, match="bytes are not UTF-8"):
        assert allowed.vocab_size > 100


def test_the_datamodule_refuses_a_model_that_cannot_read_it(tmp_path, corpus):
    """Outside the CLI too: a tokenizer larger than the model's vocabulary, windows longer than its context."""
    dm = TextDataModule(str(corpus / "corpus.txt"), tokenizer="bpe", bpe_vocab_size=300, seq_len=16,
                        cache_dir=str(tmp_path))
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=rf"the tokenizer has {dm.vocab_size} tokens, more than the model's "
                                         r"vocab_size=97: use the tokenizer the model was trained with"):
        trainer.fit(tiny_model("GPT2"), dm)
    with pytest.raises(ValueError, match="--data.seq_len=128 is longer than the model's max_position_embeddings=64"):
        TextDataModule(str(corpus / "corpus.txt"), tokenizer="char", seq_len=128,
                       cache_dir=str(tmp_path)).check_model(tiny_model("GPT2"))


# ----------------------------------------------------------------------------- safe loading
def test_every_torch_load_in_llmzoo_is_weights_only():
    """Checkpoints and state dicts are read in one place, ``llmzoo.checkpoints.read_checkpoint``, with
    ``weights_only=True`` (the crafted-pickle refusals are in test_every_bad_input_... above,
    tests/test_models.py and tests/test_hf.py)."""
    calls = [(path.name, line.strip()) for path in (ROOT / "llmzoo").rglob("*.py")
             for line in path.read_text().splitlines() if "torch.load(" in line]
    assert [name for name, _ in calls] == ["checkpoints.py"], calls
    assert all("weights_only=True" in line for _, line in calls), calls


# ----------------------------------------------------------------------------- property tests
ALPHABET = "abcdefghij \n\t→é日🎉"


@pytest.fixture(scope="module")
def char_tokenizer():
    return Tokenizer.train_chars([ALPHABET])


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=ALPHABET), st.text())
def test_char_tokenizer_round_trips_its_alphabet_and_drops_only_unknown_characters(char_tokenizer, known, anything):
    """(The byte-level BPE round-trips any text: tests/test_tokenizer.py::test_bpe_round_trips_any_text.)"""
    assert char_tokenizer.decode(char_tokenizer.encode(known)) == known
    ids = char_tokenizer.encode(anything)
    assert all(0 <= i < char_tokenizer.vocab_size for i in ids)
    assert char_tokenizer.decode(ids) == "".join(c for c in anything if c in ALPHABET)


@pytest.fixture(scope="module")
def sampling_model():
    return tiny_model("Mistral").eval()  # a sliding window, GQA: the most paths


@settings(max_examples=40, deadline=None)
@given(prompt=st.lists(st.lists(st.integers(0, 96), min_size=1, max_size=6), min_size=1, max_size=3),
       max_new_tokens=st.integers(1, 12), temperature=st.floats(0.01, 100.0),
       top_k=st.none() | st.integers(1, 200), top_p=st.none() | st.floats(1e-6, 1.0),
       min_p=st.none() | st.floats(0.0, 1.0), repetition_penalty=st.floats(0.1, 10.0), seed=st.integers(0, 2**31))
def test_sampling_within_the_documented_ranges_never_crashes_or_leaves_the_vocabulary(
        sampling_model, prompt, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed):

    width = max(map(len, prompt))
    input_ids = torch.tensor([[0] * (width - len(row)) + row for row in prompt])  # left-padded batch
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in prompt])
    with torch.no_grad():
        output = generate(sampling_model, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed, eos_token_id=1)
    assert output.shape[0] == len(prompt) and width < output.shape[1] <= width + max_new_tokens
    assert torch.equal(output[:, :width], input_ids)
    assert output.dtype == torch.long and 0 <= output.min() and output.max() < 97


USER_MODULE = '''
from llmzoo import Llama
from llmzoo.layers import MLP


class GeluLlama(Llama):
    """Llama with a GELU MLP instead of SwiGLU: trains and reloads, but has no Hugging Face twin."""

    def make_mlp(self, layer):
        return MLP(self.hparams.embed_dim, 4 * self.hparams.embed_dim)


class RenamedLlama(Llama):
    """Llama's layers under another name: exports as llama."""
'''


def test_a_user_subclass_is_imported_with_llmzoo_import_and_exports_only_where_its_layers_map(tmp_path):
    from llmzoo.hf import lightning_checkpoint, to_hf
    from llmzoo.checkpoints import save_checkpoint

    (tmp_path / "my_models.py").write_text(USER_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import my_models
    finally:
        sys.path.remove(str(tmp_path))
    sizes = dict(vocab_size=32, embed_dim=32, num_heads=4, num_layers=1, max_position_embeddings=32)
    gelu, renamed = my_models.GeluLlama(**sizes), my_models.RenamedLlama(**sizes)
    with pytest.raises(ValueError, match=r"^GeluLlama cannot be exported as a Hugging Face llama model: its "
                                         r"blocks.0.mlp is a MLP where Llama has a SwiGLU"):
        to_hf(gelu, tmp_path / "gelu")
    assert not (tmp_path / "gelu").exists()
    assert json.loads((to_hf(renamed, tmp_path / "renamed") / "config.json").read_text())["model_type"] == "llama"
    tokenizer = Tokenizer.train_chars(["abcdefgh\n"])
    save_checkpoint({**lightning_checkpoint(gelu), "tokenizer": tokenizer.state_dict()}, tmp_path / "gelu.ckpt")

    def convert(*first):
        result = subprocess.run([sys.executable, "-m", "llmzoo", *first, "convert", "--ckpt_path", "gelu.ckpt",
                                 "--to_hf", "out"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                                env={**ENV, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 1, result.stderr
        return result.stderr.strip().splitlines()[-1]

    unknown = convert()
    assert unknown.startswith("llmzoo: error: ") and "my_models.GeluLlama" in unknown, unknown
    assert unknown.endswith("(on the command line: llmzoo --import MODULE ...)"), unknown
    assert convert("--import", "my_models").startswith(  # imported: the class is known, its export refused
        "llmzoo: error: GeluLlama cannot be exported as a Hugging Face llama model: its blocks.0.mlp is a MLP")
    assert not (tmp_path / "out").exists()
