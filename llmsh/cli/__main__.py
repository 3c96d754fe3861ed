"""``python -m llmsh.cli``: the same as the ``llmsh`` command."""

from .main import main

main()
