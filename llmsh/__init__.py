"""llmsh: a command-line LLM shell over a compact decoder-only transformer written in PyTorch.

Heavy modules (torch) are imported lazily by the submodules that need them, so that
``import llmsh`` and ``llmsh --help`` stay instant.
"""

__version__ = "0.1.0"
