"""The command line before and after jsonargparse: repeated options gathered into lists, ``--model``/``--data``
taken from ``--ckpt_path``'s checkpoint, and an error's message on one line."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from llmzoo.cli import preflight
from llmzoo.checkpoints import (checkpoint_class_path, is_sharded_checkpoint, qualified_name, read_checkpoint,
                               sharded_checkpoint_error)
from llmzoo.hf import config_from_hf, read_hf_config

LIST_OPTIONS = ("--prompt", "--stop")  # repeatable: each occurrence is one item


def with_checkpoint_classes(args: list[str], subcommands: set[str], checkpoint: dict | None = None) -> list[str]:
    """``args`` with ``--model`` and ``--data`` taken from ``--ckpt_path``'s checkpoint when they are not given
    (given ``--model.*``/``--data.*`` options still apply on top). For ``generate``, ``--ckpt_path`` may be a
    Hugging Face directory: ``--model`` then comes from its ``config.json``. ``checkpoint``: the checkpoint's
    contents when they are already read (:func:`~llmzoo.checkpoints.read_checkpoint`), else it is read here."""
    position = next((i for i, arg in enumerate(args) if arg in subcommands), None)
    if position is None or args[position] in ("convert", "evaluate"):  # they read the checkpoint themselves
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
    if checkpoint is None:
        checkpoint = read_checkpoint(ckpt_path)
    inserted = []
    for option, key in (("--model", "hyper_parameters"), ("--data", "datamodule_hyper_parameters")):
        hparams = dict(checkpoint.get(key) or {})
        # LightningCLI records the class in the hyperparameters; a plain Trainer's checkpoint has llmzoo's key only
        class_path = hparams.pop("_class_path", None) or (checkpoint_class_path(checkpoint) if option == "--model"
                                                          else None)
        if option in given or class_path is None:
            continue
        hparams.pop("_instantiator", None)
        inserted.append(f"{option}={json.dumps({'class_path': class_path, 'init_args': hparams})}"
                        if option == "--data" else f"{option}={class_path}")
    return args[:position + 1] + inserted + args[position + 1:]


NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", re.IGNORECASE)


def attach_negative_numbers(args: list[str]) -> list[str]:
    """``--option -1e-3`` as ``--option=-1e-3``: argparse takes a negative number in scientific notation for an
    option of its own (``expected one argument``)."""
    attached, i = [], 0
    while i < len(args):
        if (args[i].startswith("--") and "=" not in args[i] and i + 1 < len(args)
                and NEGATIVE_NUMBER.fullmatch(args[i + 1])):
            attached.append(f"{args[i]}={args[i + 1]}")
            i += 2
        else:
            attached.append(args[i])
            i += 1
    return attached


def given_vocab_size(args: list[str]) -> str | None:
    """A model ``vocab_size`` given on the command line or in a ``--config`` file (None: left to the link)."""
    value = option_value(args, "--model.vocab_size") or option_value(args, "--model.init_args.vocab_size")
    for config in config_files(args):
        if isinstance(model := config.get("model"), dict):
            value = (model.get("init_args") or {}).get("vocab_size", model.get("vocab_size", value))
    return value


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


def import_class(class_path: str) -> type:
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


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
    unknown = re.fullmatch(r"Expected a dot import path string: (\S+)", message)
    if unknown and keys and keys[-1] in ("model", "data"):
        return unknown_class(keys[-1], unknown[1])
    return f"--{'.'.join(keys)}: {message}" if keys else message


def unknown_class(option: str, name: str) -> str:
    """``--model Lama``: the classes ``option`` takes (those imported now, a program's own subclasses too) and the
    closest to ``name``."""
    from llmzoo.data import LanguageDataModule
    from llmzoo.models import ARCHITECTURES

    def subclasses(cls: type) -> list[type]:
        return [sub for child in cls.__subclasses__() for sub in (child, *subclasses(child))]

    names = list(ARCHITECTURES) if option == "model" else list({c.__name__ for c in subclasses(LanguageDataModule)})
    return preflight.unknown_class(option, name, names)


def config_files(args: list[str]) -> list[dict]:
    """The contents of the ``--config`` / ``-c`` files of ``args``, in order."""
    import yaml

    files = []
    for path in preflight.config_paths(args):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        files.append(config if isinstance(config, dict) else {})
    return files


def with_pretrained_class(args: list[str], subcommands: set[str]) -> list[str]:
    """``args`` with ``--model`` taken from ``--model.pretrained`` (on the command line or in a ``--config`` file):
    the pretrained model's class and architecture are inserted after the subcommand, so that configs and options
    that follow set the training settings (:func:`llmzoo.pretrained.pretrained_model_option`)."""
    from llmzoo.pretrained import pretrained_model_option

    position = next((i for i, arg in enumerate(args) if arg in subcommands), None)
    if position is None or args[position] in ("convert", "evaluate"):
        return args
    source = option_value(args, "--model.pretrained") or option_value(args, "--model.init_args.pretrained")
    for config in config_files(args):
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        source = source or (model.get("init_args") or {}).get("pretrained") or model.get("pretrained")
    if not source:
        return args
    return args[:position + 1] + [f"--model={json.dumps(pretrained_model_option(source))}"] + args[position + 1:]


FLAGS = ("--chat",)  # boolean options that may be given bare: --chat means --chat=true


def with_bare_flags(args: list[str], flags: tuple[str, ...] = FLAGS) -> list[str]:
    """``args`` with each bare flag of ``flags`` (one not followed by a value) as ``--flag=true``."""
    values = {"true", "false", "yes", "no", "1", "0", "null"}
    return [f"{arg}=true" if arg in flags and (i + 1 == len(args) or args[i + 1].lower() not in values) else arg
            for i, arg in enumerate(args)]
