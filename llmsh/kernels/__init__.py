"""Kernels of our own for weights kept in GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
Q5_K, Q6_K): a C++ extension built on first use (``build``), its plain-torch reference
(``reference``), and :class:`GGUFLinear` (``linear``). torch is imported on first attribute use.
"""

from __future__ import annotations

__all__ = ["GGUFLinear", "gguf_matmul", "gguf_blocks", "from_gguf", "backend", "kernels"]


def __getattr__(name: str):
    if name in ("GGUFLinear", "gguf_matmul", "gguf_blocks", "from_gguf"):
        from llmsh.kernels import linear

        return getattr(linear, name)
    if name in ("backend", "kernels"):
        from llmsh.kernels import build

        return getattr(build, name)
    raise AttributeError(name)
