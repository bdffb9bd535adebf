"""The entry point: ``convert`` (which needs no model, data or Trainer) or LightningCLI, and bad input as one
line."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from argparse import ArgumentError

from llmzoo.cli.preflight import preflight, user_modules


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``llmzoo`` console script and ``python -m llmzoo``. Bad input (a missing file, a
    wrong option or setting, a run directory of another run, a non-finite loss) ends with a one-line error
    and exit status 1; ``LLMZOO_DEBUG=1`` shows the traceback instead. See docs/reliability.md. ``convert`` and
    ``evaluate`` run here, before LightningCLI starts (they need no data or Trainer), and exit with status 0.
    The checks of :mod:`llmzoo.cli.preflight` run before torch and Lightning are imported."""
    try:
        modules, args = user_modules(sys.argv[1:] if args is None else list(args))
        import_user_modules(modules)  # first: their classes are names preflight must accept
        preflight(args)
        run(args)
    except (ArgumentError, OSError, ValueError, FloatingPointError,  # FileExistsError (convert), ...
            *refused_by_libraries()) as error:  # Lightning's: --trainer.accelerator gpu without a GPU, ...
        if os.environ.get("LLMZOO_DEBUG"):
            raise
        sys.exit(f"llmzoo: error: {message_of(error)}")


def refused_by_libraries() -> tuple[type[BaseException], ...]:
    """The exception classes of Lightning a user's settings cause, where Lightning is imported already."""
    if "lightning" not in sys.modules:
        return ()
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (MisconfigurationException,)


def message_of(error: BaseException) -> str:
    hint = " (llmzoo --help lists the subcommands, llmzoo fit --help their options)" if isinstance(
        error, ArgumentError) else ""
    if "llmzoo.cli.arguments" in sys.modules:  # jsonargparse's nested messages: the parser has run
        from llmzoo.cli.arguments import one_line

        message = one_line(error)
    else:  # a preflight check's
        message = " ".join(str(error).split())
    if type(error).__name__ == "MisconfigurationException":
        message = (f"{message.rstrip('!.')}: Lightning refused the trainer settings (check --trainer.accelerator, "
                   f"--trainer.devices, --trainer.strategy)")
    return f"{message}{hint}"


def import_user_modules(modules: list[str]) -> None:
    """Import the modules of ``llmzoo --import MODULE``, from the working directory or ``PYTHONPATH``."""
    import importlib

    if modules and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            raise ValueError(f"--import {module}: no module {error.name!r} here or on PYTHONPATH; run llmzoo from "
                             f"the folder that holds {module.split('.')[0]}.py, or add it to PYTHONPATH") from None


def run(args: list[str]) -> None:
    """The command itself: llmzoo's own commands (no data or Trainer) here, Lightning's in LightningCLI."""
    from llmzoo.cli.chat import run_chat
    from llmzoo.cli.conversion import run_convert
    from llmzoo.cli.evaluate import run_evaluate
    from llmzoo.cli.lightning_cli import LLMZooCLI
    from llmzoo.cli.serve import run_serve

    quiet_third_party_noise()
    argv = args
    own = {"convert": run_convert, "evaluate": run_evaluate, "chat": run_chat, "serve": run_serve}
    if argv[:1] and argv[0] in own:
        own[argv[0]](argv[1:])
        sys.exit(0)  # as --help does: the command is done
    LLMZooCLI(args=args)


def quiet_third_party_noise() -> None:
    """Nothing on stderr that the user did not cause: Lightning's advertisement for its cloud logger, its lines about
    accelerators this machine cannot have (TPU, HPU) and a deprecation warning Lightning's own code raises with this
    torch. Lightning's other lines (the seed, GPU use, limits it applied) stay: they report the run's settings."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(not_noise)  # the same function: added once however often main() runs
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def not_noise(record: logging.LogRecord) -> bool:
    return not any(noise in record.getMessage() for noise in ("litlogger", "TPU available", "HPU available"))
