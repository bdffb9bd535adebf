"""The entry point: ``convert`` (which needs no model, data or Trainer) or LightningCLI, and bad input as one
line."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from argparse import ArgumentError

from lightning.fabric.utilities.exceptions import MisconfigurationException

from llmzoo.cli.arguments import check_config_files, one_line
from llmzoo.cli.chat import run_chat
from llmzoo.cli.conversion import run_convert
from llmzoo.cli.evaluate import run_evaluate
from llmzoo.cli.lightning_cli import LLMZooCLI


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``llmzoo`` console script and ``python -m llmzoo``. Bad input (a missing file, a
    wrong option or setting, a run directory of another run, a non-finite loss) ends with a one-line error
    and exit status 1; ``LLMZOO_DEBUG=1`` shows the traceback instead. See docs/reliability.md. ``convert`` and
    ``evaluate`` run here, before LightningCLI starts (they need no data or Trainer), and exit with status 0."""
    quiet_third_party_noise()
    try:
        check_config_files(sys.argv[1:] if args is None else args)
        if (sys.argv[1:] if args is None else args)[:1] == ["convert"]:
            run_convert(list(sys.argv[2:] if args is None else args[1:]))
            sys.exit(0)  # as --help does: the command is done
        if (sys.argv[1:] if args is None else args)[:1] == ["evaluate"]:  # no data or Trainer either
            run_evaluate(list(sys.argv[2:] if args is None else args[1:]))
            sys.exit(0)
        if (sys.argv[1:] if args is None else args)[:1] == ["chat"]:  # nor does chat
            run_chat(list(sys.argv[2:] if args is None else args[1:]))
            sys.exit(0)
        LLMZooCLI(args=args)
    except (ArgumentError, OSError, ValueError, FloatingPointError,  # FileExistsError (convert), ...
            MisconfigurationException) as error:  # Lightning's: --trainer.accelerator gpu without a GPU, ...
        if os.environ.get("LLMZOO_DEBUG"):
            raise
        hint = " (llmzoo --help lists the subcommands, llmzoo fit --help their options)" if isinstance(
            error, ArgumentError) else ""
        message = one_line(error)
        if isinstance(error, MisconfigurationException):
            message = (f"{message.rstrip('!.')}: Lightning refused the trainer settings (check --trainer.accelerator, "
                       f"--trainer.devices, --trainer.strategy)")
        sys.exit(f"llmzoo: error: {message}{hint}")


def quiet_third_party_noise() -> None:
    """Nothing on stderr that the user did not cause: Lightning's advertisement for its cloud logger, its lines about
    accelerators this machine cannot have (TPU, HPU) and a deprecation warning Lightning's own code raises with this
    torch. Lightning's other lines (the seed, GPU use, limits it applied) stay: they report the run's settings."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(not_noise)  # the same function: added once however often main() runs
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def not_noise(record: logging.LogRecord) -> bool:
    return not any(noise in record.getMessage() for noise in ("litlogger", "TPU available", "HPU available"))
