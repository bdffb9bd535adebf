"""The entry point: ``convert`` (which needs no model, data or Trainer) or LightningCLI, and bad input as one
line."""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError

from llmzoo.cli.arguments import one_line
from llmzoo.cli.conversion import run_convert
from llmzoo.cli.lightning_cli import LLMZooCLI


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``llmzoo`` console script and ``python -m llmzoo``. Bad input (a missing file, a
    wrong option or setting, a run directory of another run, a non-finite loss) ends with a one-line error
    and exit status 1; ``LLMZOO_DEBUG=1`` shows the traceback instead. See docs/reliability.md. ``convert`` runs
    here, before LightningCLI starts (it needs no model, data or Trainer), and exits with status 0."""
    try:
        if (sys.argv[1:] if args is None else args)[:1] == ["convert"]:
            run_convert(list(sys.argv[2:] if args is None else args[1:]))
            sys.exit(0)  # as --help does: the command is done
        LLMZooCLI(args=args)
    except (ArgumentError, OSError, ValueError, FloatingPointError) as error:  # FileExistsError (convert), ...
        if os.environ.get("LLMZOO_DEBUG"):
            raise
        hint = " (llmzoo --help lists the subcommands, llmzoo fit --help their options)" if isinstance(
            error, ArgumentError) else ""
        sys.exit(f"llmzoo: error: {one_line(error)}{hint}")
