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
- :mod:`~llmzoo.cli.runs`: the rules of a run directory.

See docs/cli.md and docs/reliability.md.
"""

from llmzoo.checkpoints import is_checkpoint
from llmzoo.cli.arguments import (LIST_OPTIONS, gather_lists, import_class, one_line, option_value,
                                  with_checkpoint_classes)
from llmzoo.cli.command import main
from llmzoo.cli.conversion import convert, convert_parser
from llmzoo.cli.generate import fitting_max_new_tokens, read_prompts
from llmzoo.cli.lightning_cli import LLMZooCLI, LLMZooTrainer
from llmzoo.cli.runs import RUN_INDEPENDENT, last_checkpoint, refuse_another_run, setting_changes

__all__ = ["LIST_OPTIONS", "LLMZooCLI", "LLMZooTrainer", "RUN_INDEPENDENT", "convert", "convert_parser",
           "fitting_max_new_tokens", "gather_lists", "import_class", "is_checkpoint", "last_checkpoint", "main",
           "one_line", "option_value", "read_prompts", "refuse_another_run", "setting_changes",
           "with_checkpoint_classes"]
