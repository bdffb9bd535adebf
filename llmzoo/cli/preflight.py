"""Checks of the command line that need no torch, Lightning or model code, run before they are imported (about
5 s on a small machine): a ``--config`` file that is missing or not YAML, and a ``--model`` / ``--data`` class
that does not exist, are reported in a fraction of a second. Everything else waits for the full parser.

Imports only the standard library and yaml (tests/test_structure.py keeps it so).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

# The classes ``--model`` and ``--data`` take by name: what llmzoo.models.ARCHITECTURES and the subclasses of
# llmzoo.data.LanguageDataModule hold (tests/test_reliability.py keeps the two in step).
KNOWN_CLASSES = {
    "model": ("GPT", "GPT2", "Llama", "Mistral", "Mixtral", "Qwen2", "Qwen3", "Transformer"),
    "data": ("PreferenceDataModule", "SFTDataModule", "StreamingTextDataModule", "TextDataModule"),
}


def preflight(args: list[str]) -> None:
    """Raise a one-line error for the mistakes :mod:`llmzoo.cli.preflight` can see without the full parser."""
    check_config_files(args)
    check_class_names(args)


def user_modules(args: list[str]) -> tuple[list[str], list[str]]:
    """The modules of ``llmzoo --import MODULE [--import MODULE ...] COMMAND ...`` (given before the command) and
    the arguments without them. A module a user names is imported (from the working directory or ``PYTHONPATH``)
    before the command runs, so that the command knows the model classes it defines; a checkpoint never makes
    llmzoo import anything itself."""
    modules, i = [], 0
    while i < len(args) and (args[i] == "--import" or args[i].startswith("--import=")):
        if args[i] == "--import":
            if i + 1 == len(args):
                raise ValueError("--import needs a module name: llmzoo --import my_models fit ...")
            modules.append(args[i + 1])
            i += 2
        else:
            modules.append(args[i].split("=", 1)[1])
            i += 1
    return modules, list(args[i:])


def config_paths(args: list[str]) -> list[Path]:
    """The ``--config`` / ``-c`` files of ``args``, in order."""
    paths = []
    for i, arg in enumerate(args):
        option, has_value, value = arg.partition("=")
        if option in ("--config", "-c") and (has_value or i + 1 < len(args)):
            paths.append(Path(value if has_value else args[i + 1]))
    return paths


def check_config_files(args: list[str]) -> None:
    """Each ``--config`` / ``-c`` file exists and is valid YAML, or a one-line error naming the file and the place
    (jsonargparse's own names no file: ``in "<unicode string>", line 2``)."""
    import yaml

    for path in config_paths(args):
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist: check the path (configs/ holds the presets)")
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(f"{path} is not valid YAML: {problem}{where}; fix the file") from None


def check_class_names(args: list[str]) -> None:
    """A ``--model`` / ``--data`` class given by a bare name (on the command line or as a config file's ``model:`` /
    ``class_path:``) is one of :data:`KNOWN_CLASSES`. Import paths (``my_module.MyModel``) are left to the parser,
    and so is every name when llmzoo's models are already imported (a program calling ``main()`` may have defined
    subclasses of its own)."""
    import yaml

    if "llmzoo.models" in sys.modules:
        return
    given = [(option, value) for option in KNOWN_CLASSES for value in option_values(args, f"--{option}")]
    for path in config_paths(args):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        for option in KNOWN_CLASSES:
            section = config.get(option) if isinstance(config, dict) else None
            value = section.get("class_path") if isinstance(section, dict) else section
            if isinstance(value, str):
                given.append((option, value))
    for option, name in given:
        if "." not in name and name not in KNOWN_CLASSES[option]:
            raise ValueError(unknown_class(option, name, KNOWN_CLASSES[option]))


def option_values(args: list[str], option: str) -> list[str]:
    """Every value of ``option`` in ``args`` (``--model Llama`` and ``--model=Llama``), not its sub-options."""
    values = []
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg.split("=", 1)[1])
    return values


def unknown_class(option: str, name: str, names: tuple[str, ...] | list[str]) -> str:
    """``--model Lama``: the classes ``option`` takes and the closest to ``name``."""
    names = sorted(names)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    guess = f" (did you mean {close[0]}?)" if close else ""
    example = "my_module.MyModel" if option == "model" else "my_module.MyDataModule"
    return (f"--{option} {name} is not a known class{guess}: use one of {', '.join(names)}, or the import path "
            f"of your own subclass ({example})")
