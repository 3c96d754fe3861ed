"""``python -m llmsh``: the same as the ``llmsh`` command."""

from llmsh.cli import main

if __name__ == "__main__":
    main()
