"""The ``llmzoo`` command: LightningCLI with every architecture and datamodule, plus ``generate``.

    llmzoo fit --config configs/quickstart.yaml
    llmzoo fit --model Llama --data TextDataModule --data.path 'corpus/*.txt' --trainer.max_steps 1000
    llmzoo fit --config configs/quickstart.yaml --ckpt_path last          # resume
    llmzoo validate --ckpt_path runs/quickstart/checkpoints/last.ckpt     # model and data from the checkpoint
    llmzoo generate --ckpt_path runs/quickstart/checkpoints/last.ckpt --prompt "def "

See docs/cli.md and docs/reliability.md.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from argparse import ArgumentError
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningCLI

from llmzoo.callbacks import (Checkpoint, StepSeed, StopOnNonFiniteLoss, ThrottledProgressBar, TokensPerSecond,
                              checkpoint_dir, complete)
from llmzoo.data import LanguageDataModule  # with its subclasses: --data TextDataModule
from llmzoo.data.datamodules import TOKENIZER_KINDS
from llmzoo.models import CausalLM  # with every architecture: --model Llama
from llmzoo.models.base import checkpoint_architecture, read_checkpoint

EVALUATION = ("validate", "test", "predict", "generate")  # subcommands that use a trained checkpoint
# --model/--data settings that may change between the sessions of one run (vocab_size is linked from the data)
RUN_INDEPENDENT = {"vocab_size", "num_workers", "cache_dir", "compile", "activation_checkpointing"}


class LLMZooTrainer(L.Trainer):
    """A Lightning Trainer with one more entry point for the CLI: :meth:`generate`."""

    def generate(self, model: CausalLM, ckpt_path: str, prompt: str = "", max_new_tokens: int = 200,
                 num_samples: int = 1, do_sample: bool = True, temperature: float = 0.8, top_k: int | None = 50,
                 top_p: float | None = None, seed: int = 0, datamodule: LanguageDataModule | None = None,
                 weights_only: bool | None = None) -> list[str]:
        """Continue a prompt with a trained checkpoint and print the result.

        Args:
            ckpt_path: the checkpoint (its run's tokenizer is used).
            prompt: text to continue; empty starts a new document.
            max_new_tokens: tokens to generate (at most the model's context).
            num_samples: independent continuations, generated as one batch.
            do_sample: sample (with temperature, top_k, top_p) instead of greedy decoding.
            temperature: softmax temperature when sampling.
            top_k: sample among the k most likely tokens.
            top_p: sample among the most likely tokens whose probabilities sum to top_p.
            seed: seed of the sampling generator.
            weights_only: unused (lets a fit config.yaml be reused).
        """
        from llmzoo.data import load_tokenizer_for_checkpoint

        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        model.load_state_dict(checkpoint["state_dict"])
        model.to(self.strategy.root_device)
        tokenizer = datamodule.tokenizer if datamodule is not None else load_tokenizer_for_checkpoint(ckpt_path)
        options = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       generator=torch.Generator(model.device).manual_seed(seed))
        samples = [complete(model, tokenizer, prompt, max_new_tokens, **options) for _ in range(num_samples)]
        for number, text in enumerate(samples):
            if num_samples > 1:
                print(f"----- sample {number + 1} -----")
            print(prompt + text, flush=True)
        return samples


class LLMZooCLI(LightningCLI):
    """LightningCLI over every architecture (``--model``) and datamodule (``--data``), in subclass mode.

    Adds: the model's ``vocab_size`` linked from the datamodule's tokenizer; a :class:`Checkpoint`
    (``--checkpoint.*``) in ``<default_root_dir>/checkpoints`` keeping ``last.ckpt``; learning rate and
    tokens/s logging; a tqdm progress bar (unless the config has one); per-step seeding (exact resumes) and
    a stop on a non-finite loss; ``generate``. For ``validate``/``test``/``predict``/``generate`` with a
    checkpoint file, the model and data classes and arguments come from the checkpoint unless given, and
    the data uses the checkpoint's tokenizer.

    Refuses, before it writes anything: a checkpoint that is unreadable, unsafe, of another architecture
    than ``--model`` or of another vocabulary than the tokenizer; a ``fit`` into a directory whose
    ``last.ckpt`` is of another run (other model or data settings) unless ``--overwrite true``. Parse errors
    raise ``ArgumentError`` (:func:`main` prints them on one line).
    """

    def __init__(self, args=None, run: bool = True, **kwargs):
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
        super().__init__(CausalLM, LanguageDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         trainer_class=LLMZooTrainer, save_config_kwargs={"overwrite": True},
                         auto_configure_optimizers=False, seed_everything_default=0,
                         parser_kwargs={"default_env": True, "exit_on_error": False}, args=args, run=run, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "generate": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: train in --trainer.default_root_dir even if its last.ckpt is of another run "
                                 "(other --model/--data settings)")

    def parse_arguments(self, parser, args) -> None:
        if args is None or isinstance(args, (list, tuple)):
            args = list(sys.argv[1:] if args is None else args)
            ckpt_path = option_value(args, "--ckpt_path")
            if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and "://" not in ckpt_path:
                read_checkpoint(ckpt_path)  # a clear error for a missing, truncated, corrupted or unsafe file
            args = with_checkpoint_classes(args, set(self.subcommands()))
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        config = self.config.get(self.config.get("subcommand") or "", Namespace())
        ckpt_path, model = config.get("ckpt_path"), config.get("model")
        if ckpt_path and Path(ckpt_path).is_file():  # before LightningCLI reads its hyperparameters
            stored = checkpoint_architecture(ckpt_path)
            if stored is not None and model is not None and import_class(model.class_path) is not stored:
                raise ValueError(f"{ckpt_path} holds a {stored.__name__} model, not a {model.class_path}: leave out "
                                 f"--model (the checkpoint names its class) or pass --model {stored.__name__}")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = checkpoint_dir(config.trainer.default_root_dir)
        if config.get("weights_only") is None:
            config.weights_only = True  # explicit, whatever torch.load's default
        ckpt_path, data = config.get("ckpt_path"), config.get("data")
        if (self.subcommand in EVALUATION and ckpt_path and Path(ckpt_path).is_file() and data is not None
                and data.init_args.get("tokenizer") in TOKENIZER_KINDS):  # never train a tokenizer for a trained model
            data.init_args.tokenizer = ckpt_path
        if self.subcommand == "fit":
            refuse_another_run(config)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if not isinstance(self.datamodule, LanguageDataModule):
            return
        self.datamodule.check_model(self.model)  # here: a failing trainer.fit would have written logs
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = last_checkpoint(config.checkpoint.dirpath)
        if ckpt_path and Path(ckpt_path).is_file():
            trained = read_checkpoint(ckpt_path).get("hyper_parameters", {}).get("vocab_size")
            if trained is not None and trained != self.datamodule.vocab_size:
                raise ValueError(f"the tokenizer has {self.datamodule.vocab_size} tokens but the model of {ckpt_path} "
                                 f"has vocab_size={trained} (did the corpus or --data.tokenizer change?): use the "
                                 f"tokenizer it was trained with, --data.tokenizer {ckpt_path}")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = self._get(self.config_init, "trainer", {})
        defaults = [TokensPerSecond(), StepSeed(), StopOnNonFiniteLoss()]
        if trainer.get("logger") is not False:
            defaults.append(LearningRateMonitor(logging_interval="step"))
        if trainer.get("enable_progress_bar") is not False and not any(
                isinstance(callback, ProgressBar) for callback in trainer.get("callbacks") or []):
            defaults.append(ThrottledProgressBar())  # the same bar whether rich is installed or not
        self.trainer_defaults["callbacks"] = defaults
        return super().instantiate_trainer(**kwargs)


def with_checkpoint_classes(args: list[str], subcommands: set[str]) -> list[str]:
    """``args`` with ``--model`` and ``--data`` taken from ``--ckpt_path``'s checkpoint when they are not given
    (evaluation subcommands only; given ``--model.*``/``--data.*`` options still apply on top)."""
    position = next((i for i, arg in enumerate(args) if arg in subcommands), None)
    if position is None or args[position] not in EVALUATION:
        return args
    ckpt_path = option_value(args, "--ckpt_path")
    given = {arg.split("=")[0] for arg in args}
    if ckpt_path is None or not Path(ckpt_path).is_file() or given & {"--config", "-c"}:
        return args
    checkpoint = read_checkpoint(ckpt_path)
    inserted = []
    for option, key in (("--model", "hyper_parameters"), ("--data", "datamodule_hyper_parameters")):
        hparams = dict(checkpoint.get(key) or {})
        if option in given or "_class_path" not in hparams:
            continue
        class_path = hparams.pop("_class_path")
        hparams.pop("_instantiator", None)
        inserted.append(f"{option}={json.dumps({'class_path': class_path, 'init_args': hparams})}"
                        if option == "--data" else f"{option}={class_path}")
    return args[:position + 1] + inserted + args[position + 1:]


def option_value(args: list[str], option: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def import_class(class_path: str) -> type:
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def refuse_another_run(config: Namespace) -> None:
    """Raises ``FileExistsError`` if the checkpoint directory's last checkpoint is of another run than ``config``
    (another model or data class, or other ``--model.*``/``--data.*`` settings but those of
    ``RUN_INDEPENDENT``), unless ``--overwrite``. The same settings may resume (``--ckpt_path last``) or
    start over (Lightning then numbers the new files, ``last-v1.ckpt``...); trainer settings may differ."""
    last = last_checkpoint(config.checkpoint.dirpath)
    if last is None or config.overwrite:
        return
    checkpoint = read_checkpoint(last)
    changes = [change for section, key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters"))
               for change in setting_changes(section, config.get(section), checkpoint.get(key))]
    if changes:
        raise FileExistsError(f"{config.trainer.default_root_dir} holds another run ({'; '.join(changes[:3])}"
                              f"{'; ...' if len(changes) > 3 else ''}): use another --trainer.default_root_dir, "
                              f"the run's own settings to resume it, or --overwrite true to train over it")


def last_checkpoint(dirpath: str) -> Path | None:
    """The checkpoint ``--ckpt_path last`` resumes: the newest ``last.ckpt``, ``last-v1.ckpt``... in ``dirpath``."""
    candidates = [p for p in Path(dirpath).glob("last*.ckpt") if re.fullmatch(r"last(-v\d+)?\.ckpt", p.name)]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def setting_changes(section: str, given: Namespace | None, saved: dict | None) -> list[str]:
    """``"--model.embed_dim is 64 here, 128 in the run"`` for each setting of ``given`` (a class_path and
    init_args) that differs from the checkpoint's ``saved`` hyperparameters."""
    if given is None or not saved:
        return []
    saved = json.loads(json.dumps(saved, default=str))  # tuples as lists, like the given settings below
    if "_class_path" in saved and import_class(saved["_class_path"]) is not import_class(given.class_path):
        return [f"--{section} is {given.class_path} here, {saved['_class_path']} in the run"]
    settings = json.loads(json.dumps(given.init_args.as_dict() if given.get("init_args") else {}, default=str))
    return [f"--{section}.{key} is {value} here, {saved[key]} in the run" for key, value in settings.items()
            if key in saved and saved[key] != value and key not in RUN_INDEPENDENT]


def one_line(error: BaseException) -> str:
    """``error``'s message on one line. jsonargparse nests a bad option's message in several multi-line
    ones (``Parser key "model": ... Parser key "embed_dim": Expected a <class 'int'>``); the innermost says
    what is wrong and the keys on the way where."""
    keys = []
    while True:
        if (key := re.match(r'\s*Parser key "([^"]+)":', str(error))) and key[1] not in keys[-1:]:
            keys.append(key[1])
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or " ".join(str(inner).split()) not in " ".join(str(error).split()):
            break
        error = inner
    message = re.sub(r"(?:a )?<class '(?:\w+\.)*(\w+)'>", r"\1", " ".join(str(error).split()))
    return f"--{'.'.join(keys)}: {message}" if keys else message


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``llmzoo`` console script and ``python -m llmzoo``. Bad input (a missing file, a
    wrong option or setting, a run directory of another run, a non-finite loss) ends with a one-line error
    and exit status 1; ``LLMZOO_DEBUG=1`` shows the traceback instead. See docs/reliability.md."""
    try:
        LLMZooCLI(args=args)
    except (ArgumentError, OSError, ValueError, FloatingPointError) as error:
        if os.environ.get("LLMZOO_DEBUG"):
            raise
        hint = " (llmzoo --help lists the subcommands, llmzoo fit --help their options)" if isinstance(
            error, ArgumentError) else ""
        sys.exit(f"llmzoo: error: {one_line(error)}{hint}")


if __name__ == "__main__":
    main()
