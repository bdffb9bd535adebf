"""The ``llmzoo`` command: LightningCLI with every architecture and datamodule, plus ``generate``.

    llmzoo fit --config configs/quickstart.yaml
    llmzoo fit --model Llama --data TextDataModule --data.path 'corpus/*.txt' --trainer.max_steps 1000
    llmzoo fit --config configs/quickstart.yaml --ckpt_path last          # resume
    llmzoo validate --ckpt_path runs/quickstart/checkpoints/last.ckpt     # model and data from the checkpoint
    llmzoo generate --ckpt_path runs/quickstart/checkpoints/last.ckpt --prompt "def "

See docs/cli.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningCLI

from llmzoo.callbacks import Checkpoint, ThrottledProgressBar, TokensPerSecond, checkpoint_dir, complete
from llmzoo.data import LanguageDataModule  # with its subclasses: --data TextDataModule
from llmzoo.data.datamodules import TOKENIZER_KINDS
from llmzoo.models import CausalLM  # with every architecture: --model Llama

EVALUATION = ("validate", "test", "predict", "generate")  # subcommands that use a trained checkpoint


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
    tokens/s logging; a tqdm progress bar (unless the config has one); ``generate``. For
    ``validate``/``test``/``predict``/``generate`` with a checkpoint file, the model and data classes and
    arguments come from the checkpoint unless given, and the data uses the checkpoint's tokenizer.
    """

    def __init__(self, args=None, run: bool = True, **kwargs):
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
        super().__init__(CausalLM, LanguageDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         trainer_class=LLMZooTrainer, save_config_kwargs={"overwrite": True},
                         auto_configure_optimizers=False, seed_everything_default=0,
                         parser_kwargs={"default_env": True}, args=args, run=run, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "generate": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        if args is None or isinstance(args, (list, tuple)):
            args = with_checkpoint_classes(list(sys.argv[1:] if args is None else args), set(self.subcommands()))
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = checkpoint_dir(config.trainer.default_root_dir)
        ckpt_path, data = config.get("ckpt_path"), config.get("data")
        if (self.subcommand in EVALUATION and ckpt_path and Path(ckpt_path).is_file() and data is not None
                and data.init_args.get("tokenizer") in TOKENIZER_KINDS):  # never train a tokenizer for a trained model
            data.init_args.tokenizer = ckpt_path

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = self._get(self.config_init, "trainer", {})
        defaults = [TokensPerSecond()]
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
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
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


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``llmzoo`` console script and ``python -m llmzoo``. Bad input (a missing file, a
    wrong setting) ends with a one-line error; ``LLMZOO_DEBUG=1`` shows the traceback instead."""
    try:
        LLMZooCLI(args=args)
    except (FileNotFoundError, ValueError) as error:
        if os.environ.get("LLMZOO_DEBUG"):
            raise
        sys.exit(f"llmzoo: error: {error}")


if __name__ == "__main__":
    main()
