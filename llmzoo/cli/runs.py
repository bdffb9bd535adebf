"""The run directory (``--trainer.default_root_dir``): which checkpoint ``--ckpt_path last`` resumes, and which
``fit`` may train there (see docs/reliability.md#the-run-directory)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from jsonargparse import Namespace

from llmzoo.checkpoints import read_checkpoint
from llmzoo.cli.arguments import import_class, option_value

# --model/--data settings that may change between the sessions of one run (vocab_size is linked from the data)
RUN_INDEPENDENT = {"vocab_size", "num_workers", "cache_dir", "compile", "activation_checkpointing"}


def refuse_another_run(config: Namespace, read: Callable[[Path], dict] = read_checkpoint) -> None:
    """Raises ``FileExistsError`` if the checkpoint directory's last checkpoint is of another run than ``config``
    (another model or data class, or other ``--model.*``/``--data.*`` settings but those of
    ``RUN_INDEPENDENT``), unless ``--overwrite``. The same settings may resume (``--ckpt_path last``) or
    start over (Lightning then numbers the new files, ``last-v1.ckpt``...); trainer settings may differ.
    ``read``: what reads that checkpoint (the CLI's reads each file once)."""
    last = last_checkpoint(config.checkpoint.dirpath)
    if last is None or config.overwrite:
        return
    checkpoint = read(last)
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


def with_last_resolved(args: list[str]) -> list[str]:
    """``generate --ckpt_path last`` as the path of the run's last checkpoint (in ``--trainer.default_root_dir``,
    ``runs`` by default): Lightning resolves ``last`` for its own loops, not for ``generate``."""
    from llmzoo.callbacks import checkpoint_dir

    if "generate" not in args[:1] or option_value(args, "--ckpt_path") != "last":
        return args
    directory = checkpoint_dir(option_value(args, "--trainer.default_root_dir") or "runs")
    last = last_checkpoint(directory)
    if last is None:
        raise FileNotFoundError(f"--ckpt_path last: no last.ckpt in {directory}: pass the run's "
                                f"--trainer.default_root_dir or the checkpoint's path")
    resolved = []
    for arg in args:
        if arg == "last" and resolved[-1:] == ["--ckpt_path"]:
            resolved[-1] = f"--ckpt_path={last}"
        else:
            resolved.append(f"--ckpt_path={last}" if arg == "--ckpt_path=last" else arg)
    return resolved


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
