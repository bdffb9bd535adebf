"""Multi-process training on CPU through Lightning (gloo): real subprocesses, since Lightning's launcher re-runs
the command for every rank. ``llmzoo fit`` with the DDP and FSDP presets on 2 processes (how the data is split
over the ranks, the checkpoints), sharded FSDP2 training and its exact resume."""

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_cli import CONFIGS, check, llmzoo, scalars
from test_reliability import error_line
from tiny import tiny_model

from llmzoo import ARCHITECTURES, CausalLM, Llama
from llmzoo.cli import main
from llmzoo.data import TextDataModule, load_tokenizer_for_checkpoint
from llmzoo.checkpoints import read_checkpoint
from llmzoo.models.base import checkpoint_architecture
from llmzoo.strategies import consolidate_checkpoint

SCRIPTS = Path(__file__).parent / "scripts"
SEQ_LEN, BATCH_SIZE, STEPS = 16, 4, 4
TWO_CPU_PROCESSES = ["--config", CONFIGS / "llama.yaml", "--model.embed_dim", "32", "--model.num_layers", "2",
                     "--data.tokenizer", "char", "--data.seq_len", SEQ_LEN, "--data.batch_size", BATCH_SIZE,
                     "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", STEPS,
                     "--trainer.val_check_interval", STEPS, "--trainer.log_every_n_steps", "1",
                     "--trainer.enable_model_summary", "false"]


def random_text(rng: np.random.Generator, length: int) -> str:
    """Random letters, spaces and newlines: windows at different offsets hold different text."""
    return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz \n"), size=length))


def windows(batches: list[torch.Tensor]) -> Counter:
    """The windows (rows) of ``batches``, counted."""
    return Counter(tuple(row) for batch in batches for row in batch.tolist())


def recorded(directory: Path) -> list[dict]:
    """The batches each rank recorded (:class:`record_batches.RecordBatches`), by rank."""
    return [torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def fit_args(tmp: Path, preset: str, root: Path | None = None) -> list:
    """``llmzoo fit`` on 2 CPU processes with configs/trainer/``preset``.yaml in ``root`` (default: ``tmp/preset``),
    each rank's batches recorded in ``root/seen``: DDP on the ``TextDataModule`` of ``tmp/corpus.txt``, FSDP on the
    ``StreamingTextDataModule`` of ``tmp/documents.jsonl`` with 2 DataLoader workers per rank."""
    root = root or tmp / preset
    data = (["--data.path", tmp / "corpus.txt"] if preset == "ddp" else
            ["--data", "StreamingTextDataModule", "--data.path", tmp / "documents.jsonl", "--data.num_workers", "2",
             "--data.shuffle_buffer", "16"])
    return ["fit", *TWO_CPU_PROCESSES, "--config", CONFIGS / "trainer" / f"{preset}.yaml", *data,
            "--data.cache_dir", tmp / "cache", "--trainer.callbacks+=record_batches.RecordBatches",
            "--trainer.callbacks.directory", root / "seen", "--trainer.default_root_dir", root]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two ``llmzoo fit`` runs of 2 CPU processes each, side by side, each rank's batches recorded
    (:class:`record_batches.RecordBatches`): ``ddp/``, configs/trainer/ddp.yaml on a ``TextDataModule`` of random
    text, then validated in one process; ``fsdp/``, configs/trainer/fsdp.yaml on a ``StreamingTextDataModule``
    of numbered documents with 2 DataLoader workers per rank."""
    tmp = tmp_path_factory.mktemp("distributed")
    rng = np.random.default_rng(0)
    (tmp / "corpus.txt").write_text(random_text(rng, 6000))
    (tmp / "documents.jsonl").write_text("".join(
        json.dumps({"text": f"{i:03d} {random_text(rng, int(rng.integers(20, 60)))}"}) + "\n" for i in range(200)))

    with ThreadPoolExecutor(2) as pool:
        ddp = pool.submit(llmzoo, *fit_args(tmp, "ddp"))
        fsdp = pool.submit(llmzoo, *fit_args(tmp, "fsdp"))
        check(ddp.result())
        validate = pool.submit(llmzoo, "validate", "--ckpt_path", tmp / "ddp" / "checkpoints" / "last.ckpt",
                               "--trainer.default_root_dir", tmp / "ddp")
        check(fsdp.result())
        (tmp / "validate.out").write_text(check(validate.result()).stdout)
    return tmp


def test_ddp_fit_on_two_cpu_processes_shards_the_data_and_its_checkpoint_validates(runs):
    """The ranks of the DDP run trained on different windows which together are the batches one process takes in
    twice the steps; their validation windows cover the split once. ``validate`` (one process) and the loaded
    checkpoint reproduce the loss that fit's validation (over both ranks) logged."""
    run, ranks = runs / "ddp", recorded(runs / "ddp" / "seen")
    train = [windows(rank["train"]) for rank in ranks]
    assert sum(train[0].values()) == sum(train[1].values()) == STEPS * BATCH_SIZE
    assert not train[0] & train[1]  # no window on both ranks (different seeded offsets; none coincide here)
    one = TextDataModule(str(runs / "corpus.txt"), tokenizer="char", seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                         cache_dir=str(runs / "cache"))  # the same data in this process: rank 0 of 1
    one.setup("fit")
    assert train[0] + train[1] == windows(list(islice(one.train_dataloader(), 2 * STEPS)))
    val = [windows(rank["val"]) for rank in ranks]
    assert val[0] and val[1] and val[0] + val[1] == windows(list(one.val_dataloader()))  # each window once

    fit_loss = scalars(run / "lightning_logs" / "version_0", "val/loss")[-1]
    assert scalars(run / "lightning_logs" / "version_1", "val/loss") == pytest.approx([fit_loss], rel=1e-5)
    assert "val/loss" in (runs / "validate.out").read_text()
    model = CausalLM.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert type(model) is Llama and model.hparams.vocab_size == one.vocab_size
    with torch.no_grad():
        sums = [model.token_nll(batch, reduction="sum")[:2] for rank in ranks for batch in rank["val"]]
    assert sum(nll for nll, _ in sums) / sum(count for _, count in sums) == pytest.approx(fit_loss, rel=1e-5)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed_batches"] == STEPS
    logs = sorted(path.relative_to(run).as_posix() for path in (run / "lightning_logs").glob("*/config.yaml"))
    assert logs == ["lightning_logs/version_0/config.yaml", "lightning_logs/version_1/config.yaml"]  # fit, validate


def test_fsdp_preset_streams_disjoint_documents_to_two_ranks_of_two_workers(runs, tmp_path):
    """The FSDP run (FSDP2, activation checkpointing) read the stream with 2 workers per rank: no document
    reached both ranks. The CLI reads its sharded checkpoint as it reads a file (the run directory rules) and
    makes one file of it with ``llmzoo convert``; ``validate`` asks for that file."""
    sharded = runs / "fsdp" / "checkpoints" / "last.ckpt"
    tokenizer = load_tokenizer_for_checkpoint(sharded)
    train = [windows(rank["train"]) for rank in recorded(runs / "fsdp" / "seen")]
    assert sum(train[0].values()) == sum(train[1].values()) == STEPS * BATCH_SIZE and not train[0] & train[1]
    numbers = [{int(n) for window in rank for n in re.findall(r"\d{3}", tokenizer.decode(list(window)))}
               for rank in train]  # the documents whose number a window holds whole
    assert numbers[0] and numbers[1] and not numbers[0] & numbers[1]

    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert checkpoint_architecture(sharded) is Llama  # not the FSDPLlama class fully_shard made of it
    with pytest.raises(SystemExit) as converted:
        main(["convert", "--ckpt_path", str(sharded), "--to", str(tmp_path / "one.ckpt")])
    assert converted.value.code == 0
    model = CausalLM.load_from_checkpoint(tmp_path / "one.ckpt")  # every weight, whole (strict loading)
    assert type(model) is Llama and model.hparams.activation_checkpointing  # set by the preset
    another = error_line(*fit_args(runs, "fsdp"), "--model.embed_dim", "64", "--trainer.devices", "1")
    assert another.startswith(f"{runs / 'fsdp'} holds another run (--model.embed_dim is 64 here, 32 in the run)")
    message = error_line("validate", "--ckpt_path", sharded)
    assert message == (f"{sharded} is a sharded checkpoint (a directory of shards): resume it with fit and the run's "
                       f"--config files (configs/trainer/fsdp.yaml among them); for anything else make one file of "
                       f"it, llmzoo convert --ckpt_path {sharded} --to model.ckpt")


@pytest.mark.parametrize("architecture", ["Llama", pytest.param("Mixtral", marks=pytest.mark.slow)])
def test_fsdp2_sharded_training_and_resume_on_two_cpu_processes(architecture, tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPTS / "fsdp2_cpu.py"), architecture, str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = " ".join(path.read_text() for path in sorted(tmp_path.glob("rank*.txt")))
    lines = re.findall(r"RANK (\d) STRAIGHT (\S+) RESUMED (\S+) STEP (\d+) TRAIN_LOSS (\S+) VAL_LOSS (\S+)", results)
    assert len(lines) == 2, results
    (_, straight0, resumed0, step0, _, val0), (_, straight1, resumed1, step1, _, val1) = sorted(lines)
    assert (straight0, resumed0, val0) == (straight1, resumed1, val1)  # every rank holds the same model
    assert straight0 == resumed0  # the resumed run ends where the uninterrupted one does (dropout and epochs too)
    assert step0 == step1 == "6"  # resumed from the sharded checkpoint at step 3, ran to 6
    assert float(val0) < 4.5  # trained: the initial loss is ln(97) = 4.57
    shards = sorted(p.name for p in (tmp_path / "first" / "last.ckpt").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank, no full copy
    # made one file, the shards give the model the ranks held
    model = ARCHITECTURES[architecture].load_from_checkpoint(
        consolidate_checkpoint(tmp_path / "first" / "last.ckpt", tmp_path / "one.ckpt"))
    assert sum(p.double().square().sum().item() for p in model.parameters()) == pytest.approx(float(resumed0), rel=1e-9)


@pytest.mark.slow
def test_fsdp_run_resumes_from_its_sharded_checkpoint_through_the_cli(runs, tmp_path):
    """The same command with ``--ckpt_path last`` goes on from the sharded ``last.ckpt`` directory."""
    check(llmzoo(*fit_args(runs, "fsdp", root=tmp_path)))
    resumed = check(llmzoo(*fit_args(runs, "fsdp", root=tmp_path), "--trainer.max_steps", 2 * STEPS,
                           "--ckpt_path", "last"))
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights=False)
    assert checkpoint["global_step"] == 2 * STEPS
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed_batches"] == 2 * STEPS


def test_a_tensor_parallel_mesh_is_refused():
    """ModelParallelStrategy's default makes the GPUs of a node a tensor-parallel group: llmzoo's models shard over
    data-parallel ranks only, and say what to use instead."""
    sizes = {"data_parallel": 1, "tensor_parallel": 2}  # the mesh of one node of 2 devices

    class Mesh:  # what Lightning hands configure_model
        mesh_dim_names = tuple(sizes)

        def __getitem__(self, name):
            return SimpleNamespace(size=lambda: sizes[name])

    model = tiny_model("Llama")
    model._device_mesh = Mesh()
    with pytest.raises(ValueError, match="tensor-parallel size of 2: use --trainer.strategy llmzoo.strategies.FSDP2"):
        model.configure_model()
