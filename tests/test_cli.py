"""The ``llmzoo`` command end to end: fit and validate every architecture's preset (shrunk) as subprocesses,
resume with ``--ckpt_path last``, generate from a checkpoint, and the paper-size presets."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import TINY_CONFIGS, tiny_model

from llmzoo import ARCHITECTURES
from llmzoo.callbacks import complete
from llmzoo.cli import LLMZooCLI
from llmzoo.data import load_tokenizer_for_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ARCHS = {name: name.lower() for name in sorted(TINY_CONFIGS)}  # class -> its tiny CPU preset
PAPER = {"gpt-117m": 116_534_784, "gpt2-124m": 124_439_808, "llama-7b": 6_738_415_616,
         "mistral-7b": 7_241_732_096, "mixtral-8x7b": 46_702_792_704, "qwen2.5-0.5b": 494_032_768,
         "qwen3-0.6b": 596_049_920}
SHRINK = ["--model.embed_dim", "32", "--model.num_layers", "2", "--data.seq_len", "32", "--data.batch_size", "4",
          "--data.bpe_vocab_size", "300", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
          "--trainer.log_every_n_steps", "1", "--trainer.enable_model_summary", "false"]


def llmzoo(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # tests/ holds callbacks that tests add by import path; runs go two at a time
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "llmzoo", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every preset fitted for 3 steps on a small corpus, two runs at a time; then each checkpoint
    validated, the first (1-step) run resumed to step 3 with ``--ckpt_path last``, a greedy generation and a
    prediction."""
    tmp = tmp_path_factory.mktemp("cli")
    corpus = tmp / "corpus.txt"
    functions = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]
    corpus.write_text("\n".join(functions))
    documents = tmp / "corpus.jsonl"  # one document per function, for the stream
    documents.write_text("".join(json.dumps({"text": f}) + "\n" for f in functions))
    common = ["--data.path", corpus, "--data.cache_dir", tmp / "cache", *SHRINK]
    with ThreadPoolExecutor(2) as pool:
        check(llmzoo("fit", "--config", CONFIGS / "gpt2.yaml", *common, "--trainer.max_steps", "1",
                     "--trainer.default_root_dir", tmp / "warm"))  # trains the shared tokenizer and token cache once
        fits = {name: pool.submit(llmzoo, "fit", "--config", CONFIGS / f"{preset}.yaml", *common,
                                  "--trainer.max_steps", "3", "--trainer.default_root_dir", tmp / name)
                for name, preset in ARCHS.items()}
        fits = {name: check(future.result()) for name, future in fits.items()}
        validates = {name: pool.submit(llmzoo, "validate", "--ckpt_path", tmp / name / "checkpoints" / "last.ckpt",
                                       "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", tmp / name)
                     for name in ARCHS}
        resume = pool.submit(llmzoo, "fit", "--config", CONFIGS / "gpt2.yaml", *common, "--trainer.max_steps", "3",
                             "--trainer.default_root_dir", tmp / "warm", "--ckpt_path", "last")
        generate = pool.submit(llmzoo, "generate", "--ckpt_path", tmp / "Llama" / "checkpoints" / "last.ckpt",
                               "--prompt", "def f", "--max_new_tokens", "12", "--do_sample", "false")
        predict = pool.submit(llmzoo, "predict", "--ckpt_path", tmp / "Mixtral" / "checkpoints" / "last.ckpt",
                              "--trainer.limit_predict_batches", "2", "--trainer.default_root_dir", tmp / "predict")
        streaming = pool.submit(llmzoo, "fit", "--model", "Llama", "--model.embed_dim", "32", "--model.num_heads", "4",
                                "--model.num_layers", "1", "--model.max_position_embeddings", "64",
                                "--data", "StreamingTextDataModule", "--data.path", documents, "--data.val_path", documents,
                                "--data.tokenizer", "char", "--data.seq_len", "32", "--data.num_workers", "2",
                                "--data.cache_dir", tmp / "cache", "--trainer.max_steps", "4",
                                "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
                                "--trainer.log_every_n_steps", "1",
                                "--trainer.default_root_dir", tmp / "streaming")
        validates = {name: check(future.result()) for name, future in validates.items()}
        return dict(streaming=check(streaming.result()), tmp=tmp, fits=fits, validates=validates, resume=check(resume.result()),
                    generate=check(generate.result()), predict=predict.result())


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_fit_then_validate_every_architecture(runs, name):
    run = runs["tmp"] / name
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 and checkpoint["hyper_parameters"]["_class_path"] == f"llmzoo.{name}"
    tokenizer = load_tokenizer_for_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["hyper_parameters"]["vocab_size"] == tokenizer.vocab_size  # linked, never typed
    assert (run / "checkpoints" / "tokenizer.json").exists()
    logs = run / "lightning_logs"
    fit_log, validate_log = logs / "version_0", logs / "version_1"
    assert (fit_log / "config.yaml").exists()
    assert len(scalars(fit_log, "train/loss")) == 3 and scalars(fit_log, "train/tokens_per_sec") and scalars(fit_log, "train/tflops_per_sec")
    assert scalars(fit_log, "lr-AdamW/pg1")  # LearningRateMonitor
    # validate rebuilds model and data from the checkpoint alone and reproduces the loss of fit's last validation
    assert scalars(validate_log, "val/loss") == pytest.approx(scalars(fit_log, "val/loss")[-1:], rel=1e-5)
    assert "val/loss" in runs["validates"][name].stdout
    for noise in ("litlogger", "TPU available", "LeafSpec", "Traceback"):  # stderr: only what the run reports
        assert noise not in runs["fits"][name].stderr + runs["validates"][name].stderr, noise


def test_fit_with_options_only_and_the_streaming_datamodule(runs):
    log = runs["tmp"] / "streaming" / "lightning_logs" / "version_0"
    assert len(scalars(log, "train/loss")) == 4 and len(scalars(log, "val/loss")) == 2
    config = yaml.safe_load((log / "config.yaml").read_text())
    assert config["data"]["class_path"] == "llmzoo.data.StreamingTextDataModule"


def test_fit_resumes_with_ckpt_path_last(runs):
    resumed = runs["resume"]
    assert "Restoring states from the checkpoint path at" in resumed.stderr + resumed.stdout
    checkpoint = torch.load(runs["tmp"] / "warm" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed_batches"] == 3
    assert len(scalars(runs["tmp"] / "warm" / "lightning_logs" / "version_1", "train/loss")) == 2


def test_generate_uses_the_checkpoint_weights_and_tokenizer(runs):
    path = runs["tmp"] / "Llama" / "checkpoints" / "last.ckpt"
    model = ARCHITECTURES["Llama"].load_from_checkpoint(path)
    expected = complete(model, load_tokenizer_for_checkpoint(path), "def f", 12, do_sample=False)
    assert runs["generate"].stdout.endswith("def f" + expected + "\n")


def test_predict_runs_from_a_checkpoint(runs):
    check(runs["predict"])
    assert "Restoring states from the checkpoint path" in runs["predict"].stderr


def test_predict_step_gives_the_negative_log_likelihood_of_every_token():
    model = tiny_model("Llama").eval()
    batch = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        nll = model.predict_step(batch, 0)
        total, count, _ = model.token_nll(batch, reduction="sum")
    assert nll.shape == (3, 8) and count == 24
    assert nll.sum().item() == pytest.approx(total.item(), rel=1e-5)


def test_bad_path_is_a_one_line_error(tmp_path):
    result = llmzoo("fit", "--config", CONFIGS / "gpt2.yaml", "--data.path", tmp_path / "missing.txt",
                    "--trainer.default_root_dir", tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("llmzoo: error: data path")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("config", [*PAPER, *ARCHS.values(), "quickstart", "shakespeare-char"])
def test_every_config_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        LLMZooCLI(args=["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("llmzoo.")
    assert "vocab_size" not in printed["model"]["init_args"]  # linked from the data


def contains(printed, given) -> bool:
    """Whether every setting of the config ``given`` has its value in the ``printed`` one."""
    if isinstance(given, dict):
        return isinstance(printed, dict) and all(key in printed and contains(printed[key], value)
                                                 for key, value in given.items())
    return printed == given


@pytest.mark.parametrize("preset", sorted(path.stem for path in (CONFIGS / "trainer").glob("*.yaml")))
def test_every_trainer_preset_composes_with_an_architecture_config(preset, capsys):
    """``--config configs/llama-7b.yaml --config configs/trainer/<preset>.yaml``: the merged config holds every
    setting of both (the presets add to the architecture's model section, never replace it)."""
    configs = [CONFIGS / "llama-7b.yaml", CONFIGS / "trainer" / f"{preset}.yaml"]
    with pytest.raises(SystemExit) as exit_:
        LLMZooCLI(args=["fit", *(f"--config={path}" for path in configs), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for path in configs:
        assert contains(printed, yaml.safe_load(path.read_text())), path


def test_print_config_with_the_class_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        LLMZooCLI(args=["fit", "--model", "Mixtral", "--data", "StreamingTextDataModule", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["num_experts"] == 8
    assert printed["data"]["class_path"] == "llmzoo.data.StreamingTextDataModule"


@pytest.mark.parametrize("config", sorted(PAPER))
def test_paper_presets_instantiate_on_the_meta_device(config):
    preset = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    model_class = ARCHITECTURES[preset["model"]["class_path"].rsplit(".", 1)[1]]
    with torch.device("meta"):
        model = model_class(vocab_size=preset["data"]["init_args"]["bpe_vocab_size"], **preset["model"]["init_args"])
    assert model.num_parameters() == PAPER[config]


@pytest.mark.slow
def test_fit_with_compiled_blocks_on_cpu(tmp_path):
    """``--model.compile true`` (torch.compile of each block, needs a C++ compiler): the checkpoint keeps the eager
    names, and an eager ``validate`` of it reproduces the loss of fit's last (compiled) validation."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(300)))
    check(llmzoo("fit", "--config", CONFIGS / "llama.yaml", "--data.path", corpus, "--data.cache_dir", tmp_path,
                 *SHRINK, "--data.tokenizer", "char", "--model.compile", "true", "--trainer.max_steps", "3",
                 "--trainer.default_root_dir", tmp_path))
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert not any("_orig_mod" in key for key in torch.load(checkpoint, weights_only=True)["state_dict"])
    check(llmzoo("validate", "--ckpt_path", checkpoint, "--model.compile", "false", "--trainer.limit_val_batches", "2",
                 "--trainer.default_root_dir", tmp_path))
    fit_log, validate_log = (tmp_path / "lightning_logs" / f"version_{i}" for i in (0, 1))
    assert scalars(validate_log, "val/loss") == pytest.approx(scalars(fit_log, "val/loss")[-1:], rel=1e-4)


@pytest.mark.slow
def test_quickstart_trains_and_prints_a_sample(tmp_path):
    result = check(llmzoo("fit", "--config", CONFIGS / "quickstart.yaml", "--trainer.default_root_dir", tmp_path,
                          "--data.cache_dir", tmp_path / "cache", timeout=1800))
    sample = result.stdout.split("----- sample")[1]
    assert "def " in sample
    val_losses = scalars(tmp_path / "lightning_logs" / "version_0", "val/loss")  # at steps 250, 500, 750, 1000
    # ln(4096) = 8.3 untrained; measured 4.89 -> 4.24 (the validation split is the corpus tail: wsgiref, xml, zipfile, ...)
    assert val_losses == sorted(val_losses, reverse=True) and val_losses[-1] < 4.5, val_losses
