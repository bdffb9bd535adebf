"""The ``llmzoo`` command: LightningCLI with every architecture and datamodule, plus ``generate`` and ``convert``.

    llmzoo fit --config configs/quickstart.yaml
    llmzoo fit --model Llama --data TextDataModule --data.path 'corpus/*.txt' --trainer.max_steps 1000
    llmzoo fit --config configs/quickstart.yaml --ckpt_path last          # resume
    llmzoo validate --ckpt_path runs/quickstart/checkpoints/last.ckpt     # model and data from the checkpoint
    llmzoo generate --ckpt_path runs/quickstart/checkpoints/last.ckpt --prompt "def "
    llmzoo convert --ckpt_path runs/quickstart/checkpoints/last.ckpt --to_hf exported   # and --from_hf DIR --to CKPT

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
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from tqdm.auto import tqdm

from llmzoo.callbacks import (Checkpoint, StepSeed, StopOnNonFiniteLoss, ThrottledProgressBar, Throughput,
                              checkpoint_dir)
from llmzoo.data import LanguageDataModule, load_tokenizer_for_checkpoint  # with its subclasses: --data TextDataModule
from llmzoo.data.datamodules import TOKENIZER_KINDS
from llmzoo.generation import GenerationConfig, TextStream, left_pad, room_after_prompts, stream
from llmzoo.hf import (DEFAULT_MAX_SHARD_SIZE, config_from_hf, convert_checkpoint_to_hf, convert_hf_to_checkpoint,
                       from_hf, load_checkpoint_model, load_hf_state_dict, load_hf_weights, read_hf_config)
from llmzoo.models import CausalLM  # with every architecture: --model Llama
from llmzoo.checkpoints import is_sharded_checkpoint, qualified_name, read_checkpoint, sharded_checkpoint_error
from llmzoo.models.base import checkpoint_architecture
from llmzoo.strategies import consolidate_checkpoint

LIST_OPTIONS = ("--prompt", "--stop")  # repeatable: each occurrence is one item
# --model/--data settings that may change between the sessions of one run (vocab_size is linked from the data)
RUN_INDEPENDENT = {"vocab_size", "num_workers", "cache_dir", "compile", "activation_checkpointing"}


class LLMZooTrainer(L.Trainer):
    """A Lightning Trainer with one more entry point for the CLI: :meth:`generate`."""

    def generate(self, model: CausalLM, ckpt_path: str, prompt: list[str] | None = None,
                 prompt_file: str | None = None, max_new_tokens: int = 200, num_samples: int = 1,
                 do_sample: bool | None = None, temperature: float = 0.8, top_k: int | None = 50,
                 top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
                 num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
                 stop: list[str] | None = None, seed: int = 0, draft_ckpt_path: str | None = None,
                 num_draft_tokens: int = 4, datamodule: LanguageDataModule | None = None,
                 weights_only: bool | None = None) -> list[str]:
        """Continue prompts with a checkpoint or a Hugging Face directory, printing the text as it comes.

        One row (one prompt, one sample) streams to stdout token by token; several rows are decoded as one
        left-padded batch (a progress bar meanwhile) and printed in order under ``----- prompt i, sample j -----``.
        Each row stops at the tokenizer's end-of-sequence token or a stop string. Returns the continuations.

        Args:
            ckpt_path: a Lightning checkpoint (its run's tokenizer is used) or a Hugging Face model directory
                with a tokenizer.json (one llmzoo exported, or any of the five families).
            prompt: text to continue, taken literally; repeat the option for a batch. None or empty starts a
                new document (after the end-of-sequence token).
            prompt_file: a UTF-8 file of prompts, one per line (blank lines skipped), added to the batch.
            max_new_tokens: tokens to add at most; lowered, with a note, to what the model's context leaves.
            num_samples: continuations of each prompt, in the same batch.
            do_sample: sample instead of greedy decoding; default: true, false with beam search.
            temperature: softmax temperature when sampling (> 0).
            top_k: sample among the k most likely tokens (null: all).
            top_p: sample among the most likely tokens whose probabilities reach top_p, in (0, 1].
            min_p: drop tokens less likely than min_p times the most likely one, in [0, 1].
            repetition_penalty: > 1 makes tokens already in the row less likely (1: none).
            num_beams: beam search with this many beams (greedy: do_sample false).
            length_penalty: beam scores are sum log p / length ** length_penalty.
            early_stopping: beam search stops when num_beams hypotheses are done (true), by a heuristic
                (false), or at max_new_tokens only (never).
            stop: a row ends once its new text contains this string; repeat the option for several.
            seed: seed of the sampling generator.
            draft_ckpt_path: a smaller model with the same tokenizer (checkpoint or Hugging Face directory)
                for speculative decoding: greedy output equals the model's alone, sampling keeps its distribution.
            num_draft_tokens: tokens the draft proposes per step of speculative decoding.
            weights_only: unused (lets a fit config.yaml be reused).
        """
        tokenizer = datamodule.tokenizer if datamodule is not None else load_tokenizer_for_checkpoint(ckpt_path)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=num_beams == 1 if do_sample is None else do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
            num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos,
            pad_token_id=pad, stop_strings=stop, seed=seed, num_draft_tokens=num_draft_tokens)  # checks every option
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        prompts = [*(prompt or []), *read_prompts(prompt_file)] or [""]
        encoded = [ids or [eos] for ids in tokenizer.encode_batch(prompts)]
        rows = [ids for ids in encoded for _ in range(num_samples)]
        draft_model = None
        if draft_ckpt_path is not None:
            is_hf = Path(draft_ckpt_path).is_dir()
            draft_model = from_hf(draft_ckpt_path) if is_hf else load_checkpoint_model(draft_ckpt_path)
            if load_tokenizer_for_checkpoint(draft_ckpt_path) != tokenizer:
                raise ValueError(f"the draft model {draft_ckpt_path} was trained with another tokenizer: speculative "
                                 f"decoding needs a draft with the model's tokenizer")
        config.max_new_tokens = fitting_max_new_tokens(encoded, max_new_tokens, model, draft_model)
        load_weights(model, ckpt_path)
        model.to(self.strategy.root_device)
        if draft_model is not None:
            draft_model.to(model.device)
        input_ids, attention_mask = left_pad(rows, eos if pad is None else pad, model.device)
        chunks = stream(model, input_ids, config, attention_mask=attention_mask, draft_model=draft_model,
                        decode=tokenizer.decode)
        skip = {eos, pad}  # what follows the end of a row
        if len(rows) == 1:  # printed as it comes
            text = TextStream(tokenizer.decode, skip)
            print(prompts[0], end="", flush=True)
            for chunk in chunks:
                print(text.push(chunk[0].tolist()), end="", flush=True)
            print(text.flush(), flush=True)
            return [tokenizer.decode(text.ids)]
        with tqdm(total=config.max_new_tokens, desc="generating", unit="token", disable=None, leave=False) as bar:
            new = []
            for chunk in chunks:
                new.append(chunk)
                bar.update(chunk.shape[1])
        continuations = [tokenizer.decode([i for i in ids if i not in skip]) for ids in torch.cat(new, 1).tolist()]
        for row, continuation in enumerate(continuations):
            number, sample = divmod(row, num_samples)
            label = ", ".join(part for part, many in ((f"prompt {number + 1}", len(prompts) > 1),
                                                      (f"sample {sample + 1}", num_samples > 1)) if many)
            print(f"----- {label} -----\n{prompts[number]}{continuation}", flush=True)
        return continuations


def read_prompts(path: str | None) -> list[str]:
    """The prompts of a prompt file: one per line, blank lines skipped."""
    if path is None:
        return []
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompt file {path} not found: give a text file with one prompt per line")
    prompts = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts: write one prompt per line")
    return prompts


def fitting_max_new_tokens(prompts: list[list[int]], max_new_tokens: int, *models: CausalLM | None) -> int:
    """``max_new_tokens``, lowered (with a note on stderr) to what the models' context leaves after the longest
    of the tokenized ``prompts``; a prompt that leaves no room is refused."""
    context = min(m.hparams.max_position_embeddings for m in models if m is not None)
    room = room_after_prompts([len(ids) for ids in prompts], context)
    if max_new_tokens > room:
        print(f"llmzoo: note: max_new_tokens lowered from {max_new_tokens} to {room}: the longest prompt has "
              f"{context - room} tokens and the model's context is {context}", file=sys.stderr)
    return min(max_new_tokens, room)


def load_weights(model: CausalLM, path: str) -> None:
    """Copy the weights of a Lightning checkpoint or of a Hugging Face directory into ``model``."""
    if Path(path).is_dir():
        load_hf_state_dict(model, load_hf_weights(path))
    else:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"])


def convert(from_hf: str | None = None, to: str | None = None, ckpt_path: str | None = None,
            to_hf: str | None = None, dtype: str | None = None, allow_pickle: bool = False,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
            tokenizer: str | None = None, model_class: str | None = None) -> Path:
    """Convert a Hugging Face directory to a Lightning checkpoint, a checkpoint to a Hugging Face directory, or a
    sharded checkpoint to one file.

    ``--from_hf DIR --to CKPT``, ``--ckpt_path CKPT --to_hf DIR`` (see docs/interop.md) or
    ``--ckpt_path SHARDED_DIR --to CKPT`` (see docs/distributed.md).

    Args:
        from_hf: a Hugging Face model directory (config.json, safetensors weights, optionally tokenizer.json)
            to read; its tokenizer goes inside the checkpoint.
        to: the Lightning checkpoint file to write from --from_hf or from a sharded --ckpt_path (llmzoo
            fit/validate/generate --ckpt_path read it).
        ckpt_path: a Lightning checkpoint to export with --to_hf, or a sharded checkpoint (a directory) to write
            as one file with --to.
        to_hf: the Hugging Face directory to write from --ckpt_path, with the run's tokenizer.
        dtype: dtype of the written weights (float32, bfloat16, float16); default: the source's.
        allow_pickle: read pytorch_model.bin weights (with torch.load(weights_only=True)) when there are no
            safetensors; only for files you trust.
        max_shard_size: --to_hf weights are split into shards past this size (bytes, or "500MB", "2GiB").
        overwrite: replace an existing checkpoint file or Hugging Face directory.
        tokenizer: the tokenizer to export with --to_hf (a tokenizer.json, its directory or a checkpoint);
            default: the checkpoint's own.
        model_class: for --ckpt_path, the class of a checkpoint that does not record it (Llama, GPT2, ...).
    """
    if from_hf and to and not (ckpt_path or to_hf):
        path = convert_hf_to_checkpoint(from_hf, to, dtype, allow_pickle, overwrite)
    elif ckpt_path and to and not (from_hf or to_hf):
        if not is_sharded_checkpoint(ckpt_path):
            raise ValueError(f"{ckpt_path} is not a sharded checkpoint: --ckpt_path --to makes one file of a "
                             f"directory of shards; export a checkpoint file with --to_hf")
        path = consolidate_checkpoint(ckpt_path, to, overwrite)
    elif ckpt_path and to_hf and not (from_hf or to):
        path = convert_checkpoint_to_hf(ckpt_path, to_hf, load_tokenizer_for_checkpoint(tokenizer or ckpt_path),
                                        model_class, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    else:
        raise ValueError("convert needs --from_hf DIR --to CKPT (Hugging Face -> checkpoint), --ckpt_path CKPT "
                         "--to_hf DIR (checkpoint -> Hugging Face) or --ckpt_path SHARDED_DIR --to CKPT (one file)")
    print(f"wrote {path}")
    return path


def convert_parser() -> ArgumentParser:
    parser = ArgumentParser(description=convert.__doc__.splitlines()[0])
    parser.add_function_arguments(convert, as_group=False)
    return parser


class LLMZooCLI(LightningCLI):
    """LightningCLI over every architecture (``--model``) and datamodule (``--data``), in subclass mode.

    Adds: the model's ``vocab_size`` linked from the datamodule's tokenizer; a :class:`Checkpoint`
    (``--checkpoint.*``) in ``<default_root_dir>/checkpoints`` keeping ``last.ckpt``; learning rate and
    tokens/s logging; a tqdm progress bar (unless the config has one); per-step seeding (exact resumes) and
    a stop on a non-finite loss; ``generate`` and ``convert``. With a checkpoint file (``--ckpt_path``), the
    model and data classes and arguments come from the checkpoint unless given, and the data uses the
    checkpoint's tokenizer.

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

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # `convert` needs no model, data or Trainer: run by parse_arguments
            self.parser._subcommands_action.add_subcommand("convert", convert_parser(),
                                                            help=convert.__doc__.splitlines()[0])

    def add_core_arguments_to_parser(self, parser) -> None:
        """Lightning's, with ``--data`` optional: ``generate`` needs none (the others ask for it in
        :meth:`before_instantiate_classes`)."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=True)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=True, required=False)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: train in --trainer.default_root_dir even if its last.ckpt is of another run "
                                 "(other --model/--data settings)")

    def parse_arguments(self, parser, args) -> None:
        """Parse ``args`` (see :func:`with_checkpoint_classes`; ``--prompt``/``--stop`` repeat). ``convert`` runs
        here and exits (status 0), as ``--help`` does: it needs no model, data or Trainer."""
        if args is None or isinstance(args, (list, tuple)):
            args = list(sys.argv[1:] if args is None else args)
            ckpt_path = option_value(args, "--ckpt_path")
            if (ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and "://" not in ckpt_path
                    and not Path(ckpt_path).is_dir()):  # a directory: a Hugging Face model (generate, convert)
                read_checkpoint(ckpt_path)  # a clear error for a missing, truncated, corrupted or unsafe file
            args = with_checkpoint_classes(gather_lists(args, LIST_OPTIONS), {*self.subcommands(), "convert"})
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        if self.config.get("subcommand") == "convert":
            convert(**{key: value for key, value in self.config.convert.items() if key != "config"})
            sys.exit(0)
        config = self.config.get(self.config.get("subcommand") or "", Namespace())
        ckpt_path, model = config.get("ckpt_path"), config.get("model")
        if ckpt_path and is_checkpoint(ckpt_path):  # before LightningCLI reads its hyperparameters
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
        if data is None and self.subcommand not in (None, "generate"):
            raise ValueError(f"{self.subcommand} needs data: --data TextDataModule --data.path <your texts> (or a "
                             f"--config that has a data section)")
        if (ckpt_path and is_checkpoint(ckpt_path) and data is not None
                and data.init_args.get("tokenizer") in TOKENIZER_KINDS):  # never train a tokenizer for a trained model
            data.init_args.tokenizer = ckpt_path
        if self.subcommand == "fit":
            refuse_another_run(config)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = last_checkpoint(config.checkpoint.dirpath)
        if is_sharded_checkpoint(ckpt_path) and (self.subcommand == "generate"
                                                 or not isinstance(self.trainer.strategy, ModelParallelStrategy)):
            raise sharded_checkpoint_error(ckpt_path)  # only the strategy that wrote the shards reads them
        if not isinstance(self.datamodule, LanguageDataModule):
            return
        self.datamodule.check_model(self.model)  # here: a failing trainer.fit would have written logs
        if ckpt_path and is_checkpoint(ckpt_path):
            trained = read_checkpoint(ckpt_path, weights=False).get("hyper_parameters", {}).get("vocab_size")
            if trained is not None and trained != self.datamodule.vocab_size:
                raise ValueError(f"the tokenizer has {self.datamodule.vocab_size} tokens but the model of {ckpt_path} "
                                 f"has vocab_size={trained} (did the corpus or --data.tokenizer change?): use the "
                                 f"tokenizer it was trained with, --data.tokenizer {ckpt_path}")

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


def with_checkpoint_classes(args: list[str], subcommands: set[str]) -> list[str]:
    """``args`` with ``--model`` and ``--data`` taken from ``--ckpt_path``'s checkpoint when they are not given
    (given ``--model.*``/``--data.*`` options still apply on top). For ``generate``, ``--ckpt_path`` may be a
    Hugging Face directory: ``--model`` then comes from its ``config.json``."""
    position = next((i for i, arg in enumerate(args) if arg in subcommands), None)
    if position is None or args[position] == "convert":
        return args
    ckpt_path = option_value(args, "--ckpt_path")
    given = {arg.split("=")[0] for arg in args}
    if ckpt_path is None or given & {"--config", "-c"}:
        return args
    if (Path(ckpt_path) / "config.json").is_file():  # a Hugging Face directory
        if args[position] != "generate":
            raise ValueError(f"{ckpt_path} is a Hugging Face directory; {args[position]} needs a Lightning checkpoint: "
                             f"llmzoo convert --from_hf {ckpt_path} --to model.ckpt")
        if "--model" in given:
            return args
        cls, init_args = config_from_hf(read_hf_config(ckpt_path))
        model = json.dumps({"class_path": qualified_name(cls), "init_args": init_args})
        return args[:position + 1] + [f"--model={model}"] + args[position + 1:]
    if is_sharded_checkpoint(ckpt_path):  # Lightning reads no hyperparameters from it: the run's configs are needed
        raise sharded_checkpoint_error(ckpt_path)
    if not Path(ckpt_path).is_file():
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


def gather_lists(args: list[str], options: tuple[str, ...]) -> list[str]:
    """``args`` with the values of each of ``options`` (``--prompt a --prompt=b``) gathered into one JSON list
    option (``--prompt=["a", "b"]``) where it first occurs; each value is one item, taken literally."""
    gathered: dict[str, list[str]] = {}
    kept, i = [], 0
    while i < len(args):
        option, has_value, value = args[i].partition("=")
        if option in options and (has_value or i + 1 < len(args)):
            if not has_value:
                i += 1
                value = args[i]
            if option not in gathered:
                gathered[option] = []
                kept.append(option)
            gathered[option].append(value)
        else:
            kept.append(args[i])
        i += 1
    return [f"{arg}={json.dumps(gathered.pop(arg))}" if arg in gathered else arg for arg in kept]


def option_value(args: list[str], option: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def is_checkpoint(path: str) -> bool:
    """A checkpoint file or a sharded checkpoint directory."""
    return Path(path).is_file() or is_sharded_checkpoint(path)


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
    except (ArgumentError, OSError, ValueError, FloatingPointError) as error:  # FileExistsError (convert), ...
        if os.environ.get("LLMZOO_DEBUG"):
            raise
        hint = " (llmzoo --help lists the subcommands, llmzoo fit --help their options)" if isinstance(
            error, ArgumentError) else ""
        sys.exit(f"llmzoo: error: {one_line(error)}{hint}")


if __name__ == "__main__":
    main()
