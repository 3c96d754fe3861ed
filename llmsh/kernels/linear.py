"""GGUFLinear: a linear layer whose weight stays in the GGUF file's own blocks.

Decode (up to ``GEMV_MAX_M`` rows) runs the C++ integer kernels (activations quantized to int8
blocks, llama.cpp's arithmetic); prefill and scoring dequantize the blocks, a bounded number of
output rows at a time, for a float32 GEMM, so prefill is never slower than float32 today
(integer dot products are compute-bound at large M; the crossover M = 8 is an estimate, not yet
measured). Without the C++ kernels every call takes the second path,
with the torch reference's dequantization.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from llmsh.kernels import reference
from llmsh.kernels.build import kernels

GEMV_MAX_M = 8                   # rows up to which the integer kernels are used (estimate)
DEQUANT_CHUNK_BYTES = 64 << 20   # float32 weight rows dequantized at once for the GEMM path


def gguf_matmul(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    """y (M, N) float32 = x (M, K) @ W^T for W (N, K) held as GGUF blocks (N, row_bytes) uint8.

    Raises ValueError for an unsupported type or a K that is not a multiple of its block."""
    reference.row_bytes(ggml_type, k)
    ops = kernels()
    x = x.float().contiguous()
    if ops is not None and x.shape[0] <= GEMV_MAX_M:
        return ops.mm(x, blocks, int(ggml_type), n, k)
    deq = ops.dequantize if ops is not None else reference.dequantize
    rows = max(1, DEQUANT_CHUNK_BYTES // (4 * k))
    if rows >= n:
        return x @ deq(blocks, int(ggml_type), n, k).t()
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    for r in range(0, n, rows):
        e = min(n, r + rows)
        out[:, r:e] = x @ deq(blocks[r:e].contiguous(), int(ggml_type), e - r, k).t()
    return out


class GGUFLinear(nn.Module):
    """y (..., N) = x (..., K) @ W^T + bias, W (N, K) kept as GGUF blocks of ``ggml_type``.

    Buffers: blocks (N, row_bytes) uint8 (one row of blocks per output row, as the file holds
    them), bias (N,) float32 or None. The output has x's dtype. Raises ValueError when the type
    has no kernel or K is not a multiple of its block size (32, or 256 for the K-quants).
    """

    def __init__(self, in_features: int, out_features: int, ggml_type: int, bias: bool = False,
                 device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.ggml_type = in_features, out_features, int(ggml_type)
        nbytes = reference.row_bytes(ggml_type, in_features)
        self.register_buffer("blocks", torch.empty(out_features, nbytes, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gguf_matmul(x.reshape(-1, self.in_features), self.blocks, self.ggml_type,
                        self.out_features, self.in_features)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        name = reference.type_info(self.ggml_type)[0]
        return f"in_features={self.in_features}, out_features={self.out_features}, {name}, bias={self.bias is not None}"


def gguf_blocks(tensor) -> tuple[torch.Tensor, int, int, int]:
    """(blocks (N, row_bytes) uint8, ggml_type, N, K) of a ``gguf.GGUFReader`` tensor, copied
    out of the file's memory map. A 2-D GGUF tensor's shape is (K, N) in ggml order.

    Raises ValueError for a type without a kernel or a shape that does not fit its blocks."""
    ggml_type = int(tensor.tensor_type)
    k = int(tensor.shape[0])
    n = int(np.prod([int(s) for s in tensor.shape[1:]])) if len(tensor.shape) > 1 else 1
    nbytes = reference.row_bytes(ggml_type, k)
    data = np.asarray(tensor.data)
    if data.size != n * nbytes:
        raise ValueError(f"{tensor.name}: {data.size} bytes of blocks, expected {n * nbytes}")
    return torch.from_numpy(data.reshape(n, nbytes).copy()), ggml_type, n, k


def from_gguf(tensor, bias: torch.Tensor | None = None) -> GGUFLinear:
    """A GGUFLinear holding a ``gguf.GGUFReader`` tensor's blocks (and an optional float bias)."""
    blocks, ggml_type, n, k = gguf_blocks(tensor)
    lin = GGUFLinear(k, n, ggml_type, bias=bias is not None)
    lin.blocks = blocks
    if bias is not None:
        lin.bias = bias.float().reshape(n).clone()
    return lin
