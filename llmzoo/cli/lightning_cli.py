"""LLMZooCLI: LightningCLI over every architecture (``--model``) and datamodule (``--data``); LLMZooTrainer, its
Trainer with one more subcommand, ``generate``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, _InstantiatorFn
from lightning.pytorch.strategies import ModelParallelStrategy

from llmzoo.callbacks import Checkpoint, StepSeed, StopOnNonFiniteLoss, ThrottledProgressBar, Throughput, checkpoint_dir
from llmzoo.checkpoints import (checkpoint_class_path, is_checkpoint, is_sharded_checkpoint, read_checkpoint,
                               sharded_checkpoint_error)
from llmzoo.cli.arguments import (LIST_OPTIONS, attach_negative_numbers, gather_lists, given_vocab_size, import_class,
                                  option_value, with_bare_flags, with_checkpoint_classes, with_pretrained_class)
from llmzoo.cli.chat import HELP as CHAT_HELP, chat_parser
from llmzoo.cli.conversion import HELP as CONVERT_HELP, convert_parser
from llmzoo.cli.evaluate import HELP as EVALUATE_HELP, evaluate_parser
from llmzoo.cli.generate import generate
from llmzoo.cli.runs import last_checkpoint, refuse_another_run, with_last_resolved
from llmzoo.cli.serve import HELP as SERVE_HELP, serve_parser
from llmzoo.data import (LanguageDataModule, PreferenceDataModule,  # with its subclasses: --data TextDataModule
                         load_tokenizer_for_checkpoint)
from llmzoo.data.datamodules import TOKENIZER_KINDS
from llmzoo.models import CausalLM  # with every architecture: --model Llama
from llmzoo.models.base import NO_PREFERENCE_DATA, checkpoint_architecture
from llmzoo.models.build import empty_model, parameters_on_meta
from llmzoo.pretrained import fill_pretrained, pretrained_architecture

LIGHTNING_PATHS = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


class LLMZooTrainer(L.Trainer):
    """A Lightning Trainer with one more entry point for the CLI: :meth:`generate`."""

    generate = generate  # llmzoo.cli.generate: its parameters are the options of `llmzoo generate`


def model_on_meta(cls: type[CausalLM], **kwargs) -> CausalLM:
    """The instantiator of ``generate``'s model: its parameters on the meta device, no random init."""
    return empty_model(cls, kwargs)


class LLMZooArgumentParser(LightningArgumentParser):
    """Lightning's parser, keeping the subcommands it adds (LLMZooCLI lists ``convert`` among them)."""

    subcommands_added = None

    def add_subcommands(self, *args, **kwargs):
        self.subcommands_added = super().add_subcommands(*args, **kwargs)
        return self.subcommands_added


class LLMZooCLI(LightningCLI):
    """LightningCLI over every architecture (``--model``) and datamodule (``--data``), in subclass mode.

    Adds: the model's ``vocab_size`` linked from the datamodule's tokenizer; a :class:`Checkpoint`
    (``--checkpoint.*``) in ``<default_root_dir>/checkpoints`` keeping ``last.ckpt``; learning rate and
    tokens/s logging; a tqdm progress bar (unless the config has one); per-step seeding (exact resumes) and
    a stop on a non-finite loss; ``generate``. With a checkpoint file (``--ckpt_path``), the model and data
    classes and arguments come from the checkpoint unless given, and the data uses the checkpoint's
    tokenizer. The checkpoint is read once (:meth:`checkpoint`), when the arguments are parsed; what needs
    it is given its contents (Lightning's restore in ``fit``/``validate``/... reads the file itself).
    ``generate`` builds its model on the meta device and gives it the checkpoint's weights: nothing is
    initialised at random. ``convert`` is listed among the subcommands but runs in :func:`~llmzoo.cli.main`.

    Refuses, before it writes anything: a checkpoint that is unreadable, unsafe, of another architecture
    than ``--model`` or of another vocabulary than the tokenizer; a ``fit`` into a directory whose
    ``last.ckpt`` is of another run (other model or data settings) unless ``--overwrite true``. Parse errors
    raise ``ArgumentError`` (:func:`~llmzoo.cli.main` prints them on one line).
    """

    def __init__(self, args=None, run: bool = True, **kwargs):
        self.checkpoints: dict[str, dict] = {}  # the checkpoints read, by real path: each is read once
        self.given_vocab_size = None  # a --model.vocab_size the user typed (the tokenizer's is linked)
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
        super().__init__(CausalLM, LanguageDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         trainer_class=LLMZooTrainer, save_config_kwargs={"overwrite": True},
                         auto_configure_optimizers=False, seed_everything_default=0,
                         parser_kwargs={"default_env": True, "exit_on_error": False},
                         parser_class=LLMZooArgumentParser, args=args, run=run, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "generate": {"model", "datamodule", "checkpoint_contents"}}

    def checkpoint(self, path: str | os.PathLike | None) -> dict | None:
        """The contents of the checkpoint at ``path`` (:func:`~llmzoo.checkpoints.read_checkpoint`: tensors
        memory-mapped; of a sharded checkpoint its ``meta.pt``), read on the first call only. None for what
        is not a local checkpoint: no path, ``last``/``best``/..., a URL, a Hugging Face directory. A missing,
        truncated, corrupted or unsafe file raises the error that says so."""
        if (not path or str(path) in LIGHTNING_PATHS or "://" in str(path)
                or (Path(path).is_dir() and not is_sharded_checkpoint(path))):
            return None
        key = os.path.realpath(path)
        if key not in self.checkpoints:
            self.checkpoints[key] = read_checkpoint(path, weights=not is_sharded_checkpoint(path))
        return self.checkpoints[key]

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # listed by `llmzoo --help`; main() runs it: it needs no model, data or Trainer
            self.parser.subcommands_added.add_subcommand("convert", convert_parser(), help=CONVERT_HELP)
            self.parser.subcommands_added.add_subcommand("evaluate", evaluate_parser(), help=EVALUATE_HELP)
            self.parser.subcommands_added.add_subcommand("chat", chat_parser(), help=CHAT_HELP)
            self.parser.subcommands_added.add_subcommand("serve", serve_parser(), help=SERVE_HELP)

    def add_core_arguments_to_parser(self, parser) -> None:
        """Lightning's, with ``--data`` optional: ``generate`` needs none (the others ask for it in
        :meth:`before_instantiate_classes`)."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=True)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=True, required=False)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=self.vocab_size, apply_on="instantiate")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: train in --trainer.default_root_dir even if its last.ckpt is of another run "
                                 "(other --model/--data settings)")

    def parse_arguments(self, parser, args) -> None:
        """Parse ``args`` (see :func:`~llmzoo.cli.arguments.with_checkpoint_classes`; ``--prompt``/``--stop``
        repeat), reading the ``--ckpt_path`` checkpoint."""
        if args is None or isinstance(args, (list, tuple)):
            args = with_last_resolved(list(sys.argv[1:] if args is None else args))
            checkpoint = self.checkpoint(option_value(args, "--ckpt_path"))
            self.given_vocab_size = given_vocab_size(args)
            args = with_checkpoint_classes(gather_lists(attach_negative_numbers(with_bare_flags(args)), LIST_OPTIONS),
                                           {*self.subcommands(), "convert", "evaluate", "chat"}, checkpoint)
            args = with_pretrained_class(args, {*self.subcommands(), "convert", "evaluate", "chat"})
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        if self.config.get("subcommand") in ("convert", "evaluate"):
            raise ValueError(f"{self.config.subcommand} runs in llmzoo.cli.main, not in LLMZooCLI: "
                             f"llmzoo {self.config.subcommand} --help")
        config = self.config.get(self.config.get("subcommand") or "", Namespace())
        ckpt_path, model = config.get("ckpt_path"), config.get("model")
        pretrained = model.get("init_args", Namespace()).get("pretrained") if model is not None else None
        if pretrained:
            stored, _ = pretrained_architecture(pretrained)
            if not issubclass(import_class(model.class_path), stored):
                raise ValueError(f"--model.pretrained {pretrained} holds a {stored.__name__} model, not a "
                                 f"{model.class_path}: leave out --model (the pretrained model names its class)")
        checkpoint = self.checkpoint(ckpt_path)  # the one read above, or one a --config file names
        if checkpoint is not None:  # before its hyperparameters are merged into --model
            stored = checkpoint_architecture(checkpoint)
            if stored is not None and model is not None and import_class(model.class_path) is not stored:
                raise ValueError(f"{ckpt_path} holds a {stored.__name__} model, not a {model.class_path}: leave out "
                                 f"--model (the checkpoint names its class) or pass --model {stored.__name__}")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's merge of a checkpoint file's hyperparameters into ``--model``, from the checkpoint
        read once (LightningCLI's own reads the whole file again, tensors included)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        checkpoint = self.checkpoint(ckpt_path)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = hparams.pop("_class_path", None) or checkpoint_class_path(checkpoint)  # a plain Trainer's: ours
        if class_path is not None:
            hparams = {"class_path": class_path, "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        root = Path(config.trainer.default_root_dir or ".")
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"--trainer.default_root_dir {root} is a file: give a directory for the run "
                                     f"(runs/NAME)")
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = checkpoint_dir(config.trainer.default_root_dir)
        if config.get("weights_only") is None:
            config.weights_only = True  # explicit, whatever torch's default
        ckpt_path, data = config.get("ckpt_path"), config.get("data")
        if data is None and self.subcommand not in (None, "generate"):
            raise ValueError(f"{self.subcommand} needs data: --data TextDataModule --data.path <your texts> (or a "
                             f"--config that has a data section)")
        if (ckpt_path and is_checkpoint(ckpt_path) and data is not None
                and data.init_args.get("tokenizer") in TOKENIZER_KINDS):  # never train a tokenizer for a trained model
            data.init_args.tokenizer = ckpt_path
        pretrained = self.pretrained()
        if pretrained and data is not None and data.init_args.get("tokenizer") in (None, *TOKENIZER_KINDS):
            data.init_args.tokenizer = pretrained  # fine-tuning: the pretrained model's tokenizer
        if self.subcommand == "fit":
            refuse_another_run(config, read=self.checkpoint)

    def instantiate_classes(self) -> None:
        if self.subcommand == "generate":  # the model on the meta device: generate gives it the checkpoint's weights
            self.config_init = self.parser.instantiate(self.config, instantiators=[(model_on_meta, CausalLM, True)])
            self.datamodule = self._get(self.config_init, "data")
            self.model = self._get(self.config_init, "model")
            self.trainer = self.instantiate_trainer()
        elif self.pretrained() and not self.config[self.subcommand].get("ckpt_path"):  # a run starts from its weights
            instantiate = _InstantiatorFn(cli=self, key="model")  # Lightning's, which records the hyperparameters

            def from_pretrained(cls, *args, applied_instantiation_links: dict, **kwargs) -> CausalLM:
                with parameters_on_meta():
                    model = instantiate(cls, *args, applied_instantiation_links=applied_instantiation_links, **kwargs)
                return fill_pretrained(model, self.pretrained())

            self.config_init = self.parser.instantiate(self.config, instantiators=[(from_pretrained, CausalLM, True)])
            self.datamodule = self._get(self.config_init, "data")
            self.model = self._get(self.config_init, "model")
            self.trainer = self.instantiate_trainer()
        else:
            super().instantiate_classes()
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = last_checkpoint(config.checkpoint.dirpath)
        if is_sharded_checkpoint(ckpt_path) and (self.subcommand == "generate"
                                                 or not isinstance(self.trainer.strategy, ModelParallelStrategy)):
            raise sharded_checkpoint_error(ckpt_path)  # only the strategy that wrote the shards reads them
        if isinstance(self.datamodule, LanguageDataModule):
            self.datamodule.check_model(self.model)  # here: a failing trainer.fit would have written logs
            self.datamodule.check_run(self.trainer, self.subcommand)
            if self.model.preference_settings is not None and not isinstance(self.datamodule, PreferenceDataModule):
                raise ValueError(NO_PREFERENCE_DATA)  # here, not at the first step: nothing written yet
            checkpoint = self.checkpoint(ckpt_path)
            trained = checkpoint and (checkpoint.get("hyper_parameters") or {}).get("vocab_size")
            if trained is not None and trained != self.datamodule.vocab_size:
                raise ValueError(f"the tokenizer has {self.datamodule.vocab_size} tokens but the model of {ckpt_path} "
                                 f"has vocab_size={trained} (did the corpus or --data.tokenizer change?): use the "
                                 f"tokenizer it was trained with, --data.tokenizer {ckpt_path}")
        if self.subcommand != "generate":
            self.checkpoints.clear()  # unmapped: a run that replaces the file must not keep the old one on disk

    def pretrained(self) -> str | None:
        """``--model.pretrained``: the checkpoint or Hugging Face directory a fine-tuning run starts from."""
        model = self.config.get(self.config.get("subcommand") or "", Namespace()).get("model")
        return model.get("init_args", Namespace()).get("pretrained") if model is not None else None

    def vocab_size(self, data: LanguageDataModule | None) -> int | None:
        """The vocabulary size of ``data``'s tokenizer, linked into the model's ``vocab_size`` (without data, for
        ``generate``, the model's own). A tokenizer that is ``--ckpt_path``'s is taken from the checkpoint
        already read."""
        if data is None or self.pretrained():  # a pretrained model keeps its vocabulary (check_model checks the data's)
            return self._get(self.config, "model").init_args.get("vocab_size")
        ckpt_path = self._get(self.config, "ckpt_path")
        checkpoint = self.checkpoint(ckpt_path)
        if checkpoint is not None and str(data.hparams.get("tokenizer")) == str(ckpt_path):
            data.tokenizer = load_tokenizer_for_checkpoint(ckpt_path, checkpoint=checkpoint)  # its cached_property
        if self.given_vocab_size is not None and int(self.given_vocab_size) != data.vocab_size:
            raise ValueError(f"--model.vocab_size={self.given_vocab_size} is set by the tokenizer, which has "
                             f"{data.vocab_size} tokens: leave --model.vocab_size out (it is linked from --data)")
        return data.vocab_size

    def generate(self, **kwargs) -> list[str]:
        """``llmzoo generate``: :meth:`LLMZooTrainer.generate` with the checkpoint already read."""
        try:
            return self.trainer.generate(checkpoint_contents=self.checkpoint(kwargs["ckpt_path"]), **kwargs)
        finally:
            self.checkpoints.clear()

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = self._get(self.config_init, "trainer", {})
        given = trainer.get("callbacks") or []
        defaults = [StepSeed(), StopOnNonFiniteLoss()]
        if not any(isinstance(callback, Throughput) for callback in given):  # one given sets its own peak_flops
            defaults.append(Throughput())
        if trainer.get("logger") is not False:
            defaults.append(LearningRateMonitor(logging_interval="step"))
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            defaults.append(ThrottledProgressBar())  # the same bar whether rich is installed or not
        self.trainer_defaults["callbacks"] = defaults
        return super().instantiate_trainer(**kwargs)
