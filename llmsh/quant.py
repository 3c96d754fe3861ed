"""Weight-only quantization with PyTorch's own CPU kernels: int8 per channel, int4 per group.

int8 (``_weight_int8pack_mm``): symmetric per output row, ``w ≈ q · scale`` with q in −127…127
and scale = max|row| / 127 (gpt-fast's ``WeightOnlyInt8QuantHandler``). int4
(``_weight_int4pack_mm_for_cpu``): asymmetric per group of ``group_size`` input columns,
``w ≈ (q − 8) · scale + zero`` with q in 0…15, scale = (max − min) / 15, zero = min + 8 · scale
(gpt-fast's ``WeightOnlyInt4QuantHandler`` / torchao's ``groupwise_affine`` layout). Activations
stay in the decoder's dtype; only weights are stored quantized, so decode reads 4× (int8) or ~7×
(int4) fewer bytes. With float32 activations (the CPU default) the kernels get bfloat16 copies of
the one-token inputs (they are slow for float32), and int8 prefill dequantizes each weight for a
float32 GEMM: the kernel per phase that is fastest here. The token embedding is stored as int8 rows and, when tied, shared with
``lm_head``. Quantization happens tensor by tensor while loading (see
:func:`llmsh.weights.load_decoder`), so the float model is never materialised whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
INT4_GROUP = 32
SMALL_M = 16     # rows up to which float32 inputs go through the int8 kernel in bfloat16


def _lp(module: nn.Module, name: str) -> torch.Tensor:
    """A bfloat16 copy of a float32 buffer, made once (scales are small: N or K/g·N·2 values)."""
    cached = module.__dict__.get("_lp_" + name)
    src = getattr(module, name)
    if cached is None or cached[0] is not src:
        cached = (src, src.to(torch.bfloat16))
        module.__dict__["_lp_" + name] = cached
    return cached[1]


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q (N, K) int8, scales (N,) float32), w ≈ q * scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int8_into(w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """:func:`quantize_int8` of w (N, K) float32 into q (N, K) int8 and scales (N,), with the same
    results, overwriting w (a scratch block) instead of allocating float temporaries."""
    s = (torch.linalg.vector_norm(w, float("inf"), dim=1) / 127).clamp_(min=1e-10)
    w.div_(s[:, None]).round_()      # |w / s| <= 127 by construction: no clamp needed
    q.copy_(w)
    scales.copy_(s)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 (N, K) weight that (q, scales) stands for (reference for the kernel)."""
    return q.float() * scales.float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q (N, K) int32 in 0..15, scales_and_zeros (K/g, N, 2) float32).

    Raises ValueError when K is not a multiple of ``group_size``.
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"int4: input size {k} is not a multiple of the group size {group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scales = ((hi - lo) / 15).clamp(min=1e-6)
    zeros = lo + 8 * scales
    q = torch.round((g - lo) / scales).clamp(0, 15).to(torch.int32).reshape(n, k)
    sz = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()   # (K/g, N, 2)
    return q, sz


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, group_size: int = INT4_GROUP) -> torch.Tensor:
    """The float32 (N, K) weight that (q 0..15, scales_and_zeros) stands for."""
    n, k = q.shape
    scales, zeros = sz[..., 0].t().unsqueeze(-1), sz[..., 1].t().unsqueeze(-1)   # (N, K/g, 1)
    g = q.float().reshape(n, k // group_size, group_size)
    return ((g - 8) * scales + zeros).reshape(n, k)


class Int8Linear(nn.Module):
    """y = x @ (q * scales)^T + bias with ``torch.ops.aten._weight_int8pack_mm``.

    Buffers: weight (N, K) int8, scales (N,) in the activation dtype, bias (N,) or None.
    Input (..., K) in ``dtype``; output (..., N) in the same dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.dtype == torch.float32 and x2.shape[0] > SMALL_M:
            # Prefill / scoring: dequantize and use float32 GEMM (far faster than the kernel).
            y = F.linear(x2, torch.mul(self.weight, self.scales[:, None]))   # one float temporary
        elif x.dtype == torch.float32:
            # Decode: the kernel is fast for bfloat16 inputs only; the vectors are tiny to cast.
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, _lp(self, "scales"))
            y = y.to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Int4Linear(nn.Module):
    """y = x @ W^T + bias with ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (groups of 32).

    Buffers: weight (N, K/2) uint8 (packed by ``_convert_weight_to_int4pack_for_cpu``),
    scales_and_zeros (K/g, N, 2) in the activation dtype, bias (N,) or None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device=None,
                 group_size: int = INT4_GROUP) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // group_size, out_features, 2, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def exact_prefill(self) -> None:
        """From now on, float32 inputs of more than ``SMALL_M`` rows (prefill, scoring) get a
        float32 GEMM on the weight dequantized exactly from the packed buffer (block by block,
        :func:`unpack_packed_int4`) instead of the kernel's bfloat16 arithmetic: a GGUF's exact
        int4 weights then score as their float32 dequantization does. No-op where torch's
        packed layout is not the one we read (:func:`packed_layout_known`)."""
        if self.scales_and_zeros.dtype == torch.float32 and self.out_features % 64 == 0 and packed_layout_known():
            self.__dict__["_exact_prefill"] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, sz = x.reshape(-1, self.in_features), self.scales_and_zeros
        if self.__dict__.get("_exact_prefill") and x.dtype == torch.float32 and x2.shape[0] > SMALL_M:
            y = F.linear(x2, unpack_packed_int4(self.weight, sz, self.group_size)).reshape(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        if x.dtype == torch.float32:      # the kernel is ~7x slower with float32 inputs
            x2, sz = x2.to(torch.bfloat16), _lp(self, "scales_and_zeros")
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, sz).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows: ids (...) -> (..., C) in the scales' dtype."""

    def __init__(self, num: int, dim: int, dtype, device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num, dim
        self.register_buffer("weight", torch.empty(num, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)


class BF16Linear(nn.Module):
    """y = x @ W^T + bias for a weight kept in bfloat16 (a GGUF type our int layouts cannot hold
    exactly, widened; see :mod:`llmsh.gguf_precision`), whatever the activation dtype.

    Buffers: weight (N, K) bfloat16, bias (N,) in the activation dtype or None. Input (..., K),
    output (..., N) in the input's dtype. float32 inputs: up to ``SMALL_M`` rows (decode) the
    product is taken in bfloat16 (the CPU's bfloat16 GEMV reads half the bytes); more rows
    (prefill, scoring) widen the weight to float32, a block of rows at a time, for float32
    GEMMs, so prefill keeps float32's accuracy.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.dtype == torch.bfloat16:
            y = F.linear(x2, self.weight)
        elif x2.shape[0] > SMALL_M:      # widened a block of rows at a time: ~16 MB of float32
            step = max(1, (4 << 20) // self.in_features)
            y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype)
            for r in range(0, self.out_features, step):
                torch.matmul(x2, self.weight[r:r + step].to(x.dtype).t(), out=y[:, r:r + step])
        else:
            y = F.linear(x2.to(torch.bfloat16), self.weight).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class BF16Embedding(nn.Module):
    """An embedding table kept in bfloat16: ids (...) -> (..., C) in ``dtype`` (rows widened)."""

    def __init__(self, num: int, dim: int, dtype, device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num, dim, dtype
        self.register_buffer("weight", torch.empty(num, dim, dtype=torch.bfloat16, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.dtype)


KEEP_DTYPE = (BF16Linear, BF16Embedding)   # modules whose weights a dtype cast must not touch


def pack_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype) -> dict[str, torch.Tensor]:
    """:class:`Int4Linear` buffers from our stored int4 layout (:mod:`llmsh.gguf_precision`):
    qweight (N, K/2) uint8 (even column in the low nibble), scales and zeros (N, K/32) float32
    -> {"weight": packed for the CPU kernel, "scales_and_zeros": (K/32, N, 2) in ``dtype``}."""
    n, half = qweight.shape
    q = torch.stack([qweight & 15, qweight >> 4], dim=-1).view(n, 2 * half)     # (N, K) uint8 0…15
    if n % 64 == 0 and packed_layout_known():
        # torch's layout (see unpack_packed_int4) built in uint8: no (N, K) int32 copy to convert
        b = q.view(n // 64, 2, 32, 2 * half)
        packed = (b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).contiguous().view(n, half)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    sz = torch.empty(scales.shape[1], n, 2, dtype=dtype)
    sz[..., 0] = scales.t()
    sz[..., 1] = zeros.t()
    return {"weight": packed, "scales_and_zeros": sz}


def unpack_packed_int4(packed: torch.Tensor, sz: torch.Tensor, group_size: int = INT4_GROUP) -> torch.Tensor:
    """The float32 (N, K) weight held by torch's CPU int4 packing (N a multiple of 64) and its
    scales_and_zeros (K/g, N, 2): ``_convert_weight_to_int4pack_for_cpu`` stores each block of 64
    rows as K × 32 bytes, byte (k, d) holding row d in its low nibble and row 32 + d in its high
    one (aten/src/ATen/native/cpu/int4mm_kernel.cpp; checked by :func:`packed_layout_known`)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    p = packed.view(n // 64, k, 32).transpose(1, 2).contiguous()          # (N/64, 32, K) bytes
    q = torch.cat([p & 15, p >> 4], dim=1).view(n, k // group_size, group_size)   # rows d, then 32 + d
    scales, zeros = sz[..., 0].t().unsqueeze(-1).float(), sz[..., 1].t().unsqueeze(-1).float()   # (N, K/g, 1)
    # (q − 8)·scale + zero, as q·scale + (zero − 8·scale): one multiply-add pass over the weight
    return q.float().mul_(scales).add_(zeros - 8 * scales).view(n, k)


_LAYOUT_OK: list = []


def packed_layout_known() -> bool:
    """Whether this torch packs int4 as :func:`unpack_packed_int4` reads it (tried once)."""
    if not _LAYOUT_OK:
        q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        sz = torch.stack([torch.ones(2, 128), torch.full((2, 128), 8.0)], dim=-1)   # w = q
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            _LAYOUT_OK.append(tuple(packed.shape) == (128, 32) and torch.equal(unpack_packed_int4(packed, sz), q.float()))
        except (RuntimeError, AttributeError):
            _LAYOUT_OK.append(False)
    return _LAYOUT_OK[0]


def unpack_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float32 (N, K) weight of our stored int4 layout (see :func:`pack_int4`)."""
    n = qweight.shape[0]
    q = torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(n, -1, INT4_GROUP).float()
    return ((q - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(n, -1)


def swap_modules(decoder, mode: str, dtype) -> None:
    """Replace every nn.Linear by Int8Linear / Int4Linear and the token embedding by
    Int8Embedding, in place, with empty buffers on the meta device (filled by loading).

    int4 needs K a multiple of 32 (and even); a Linear that is not stays int8. lm_head always
    uses int8 (it shares the embedding's rows when tied). Raises ValueError for an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r} (use int8 or int4)")
    for name, mod in list(decoder.named_modules()):
        if isinstance(mod, nn.Linear):
            parent, _, attr = name.rpartition(".")
            k, n, bias = mod.in_features, mod.out_features, mod.bias is not None
            if mode == "int4" and name != "lm_head" and k % INT4_GROUP == 0:
                new = Int4Linear(k, n, bias, dtype, device="meta")
            else:
                new = Int8Linear(k, n, bias, dtype, device="meta")
            setattr(decoder.get_submodule(parent) if parent else decoder, attr, new)
    embed_owner = decoder.backbone
    attr = embed_owner.embed_name
    e = getattr(embed_owner, attr)
    setattr(embed_owner, attr, Int8Embedding(e.num_embeddings, e.embedding_dim, dtype, device="meta"))
    decoder.quantization = mode


def quantize_tensor(module: nn.Module, t: torch.Tensor, dtype) -> dict[str, torch.Tensor]:
    """The buffers of the quantized ``module`` (from :func:`swap_modules`) for its float weight t."""
    if isinstance(module, Int4Linear):
        q, sz = quantize_int4(t, module.group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return {"weight": packed, "scales_and_zeros": sz.to(dtype)}
    # Row blocks bound the float temporaries (the 49152-row embedding would need 3 copies).
    q = torch.empty(t.shape, dtype=torch.int8)
    s = torch.empty(t.shape[0], dtype=dtype)
    for r in range(0, t.shape[0], 4096):
        q[r:r + 4096], s[r:r + 4096] = quantize_int8(t[r:r + 4096])
    return {"weight": q, "scales": s}


def tie(decoder) -> None:
    """Point a tied ``lm_head`` (Int8Linear) at the Int8Embedding's rows and scales."""
    if decoder.config.tie_word_embeddings:
        e = decoder.embed_tokens
        decoder.lm_head.weight, decoder.lm_head.scales = e.weight, e.scales
