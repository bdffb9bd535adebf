"""The ``llmzoo`` command: LightningCLI with every architecture and datamodule, plus ``generate`` and ``convert``.

    llmzoo fit --config configs/quickstart.yaml
    llmzoo fit --model Llama --data TextDataModule --data.path 'corpus/*.txt' --trainer.max_steps 1000
    llmzoo fit --config configs/quickstart.yaml --ckpt_path last          # resume
    llmzoo validate --ckpt_path runs/quickstart/checkpoints/last.ckpt     # model and data from the checkpoint
    llmzoo generate --ckpt_path runs/quickstart/checkpoints/last.ckpt --prompt "def "
    llmzoo convert --ckpt_path runs/quickstart/checkpoints/last.ckpt --to_hf exported   # and --from_hf DIR --to CKPT
    llmzoo evaluate --ckpt_path runs/quickstart/checkpoints/last.ckpt --files held_out.txt --tasks my_task

- :mod:`~llmzoo.cli.command`: :func:`main`, ``convert`` or LightningCLI, and bad input as one line;
- :mod:`~llmzoo.cli.lightning_cli`: :class:`LLMZooCLI` and :class:`LLMZooTrainer`;
- :mod:`~llmzoo.cli.generate` and :mod:`~llmzoo.cli.conversion`: the two subcommands of llmzoo's own;
- :mod:`~llmzoo.cli.evaluate`: ``llmzoo evaluate`` (lm-evaluation-harness tasks, perplexity and bits per byte of
  files), run like ``convert`` before LightningCLI;
- :mod:`~llmzoo.cli.chat`: ``llmzoo chat`` (a conversation with a fine-tuned model) and what ``generate --chat``
  shares with it;
- :mod:`~llmzoo.cli.arguments`: the command line before and after jsonargparse;
- :mod:`~llmzoo.cli.runs`: the rules of a run directory;
- :mod:`~llmzoo.cli.preflight`: the checks that run before torch and Lightning are imported.

The names below are imported when first used, so that ``llmzoo`` reports a mistyped class or config file before
it imports torch. See docs/cli.md and docs/reliability.md.
"""

import importlib

from llmzoo.cli.command import main

_HOMES = {
    "is_checkpoint": "llmzoo.checkpoints",
    **dict.fromkeys(("LIST_OPTIONS", "gather_lists", "import_class", "one_line", "option_value",
                     "with_checkpoint_classes"), "llmzoo.cli.arguments"),
    **dict.fromkeys(("convert", "convert_parser"), "llmzoo.cli.conversion"),
    **dict.fromkeys(("fitting_max_new_tokens", "read_prompts"), "llmzoo.cli.generate"),
    **dict.fromkeys(("LLMZooCLI", "LLMZooTrainer"), "llmzoo.cli.lightning_cli"),
    **dict.fromkeys(("RUN_INDEPENDENT", "last_checkpoint", "refuse_another_run", "setting_changes"),
                    "llmzoo.cli.runs"),
}

__all__ = ["main", *_HOMES]


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'llmzoo.cli' has no attribute {name!r}")
