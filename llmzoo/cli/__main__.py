"""``python -m llmzoo.cli``: the same as the ``llmzoo`` command."""

from llmzoo.cli import main

main()
