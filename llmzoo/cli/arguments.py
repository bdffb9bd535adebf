"""The command line before and after jsonargparse: repeated options gathered into lists, ``--model``/``--data``
taken from ``--ckpt_path``'s checkpoint, and an error's message on one line."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from llmzoo.checkpoints import is_sharded_checkpoint, qualified_name, read_checkpoint, sharded_checkpoint_error
from llmzoo.hf import config_from_hf, read_hf_config

LIST_OPTIONS = ("--prompt", "--stop")  # repeatable: each occurrence is one item


def with_checkpoint_classes(args: list[str], subcommands: set[str], checkpoint: dict | None = None) -> list[str]:
    """``args`` with ``--model`` and ``--data`` taken from ``--ckpt_path``'s checkpoint when they are not given
    (given ``--model.*``/``--data.*`` options still apply on top). For ``generate``, ``--ckpt_path`` may be a
    Hugging Face directory: ``--model`` then comes from its ``config.json``. ``checkpoint``: the checkpoint's
    contents when they are already read (:func:`~llmzoo.checkpoints.read_checkpoint`), else it is read here."""
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
    if checkpoint is None:
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
    return f"--{'.'.join(keys)}: {message}" if keys else message
