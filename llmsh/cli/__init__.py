"""The command-line front end: click commands, the chat REPL, terminal output, the man page.

Nothing in the engine (``llmsh/*.py``, ``llmsh/models/``) imports this package.
"""

from .main import cli, main

__all__ = ["cli", "main"]
