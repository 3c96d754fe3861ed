"""Plain-torch reference of the block kernels: the same arithmetic, written for clarity.

GGUF block layouts are ggml's (``ggml-common.h``: block_q4_0 … block_q6_K; the K-quants' 6-bit
scale packing is ``get_scale_min_k4`` of ``ggml-quants.c``). The products follow llama.cpp's
ggml-cpu ``vec_dot_*``: each activation row is quantized to int8 blocks of 32 (for the 32-element
types, like Q8_0) or 256 (the K-quants, like Q8_K) with one float32 scale d = max|x| / 127
per block (llama.cpp stores Q8_0's d as float16; we keep float32) and q = round-half-even(x · 127
/ max|x|); integer dot products per (sub-)block are exact; each block's integer sum is scaled by
the float32 product d_w · d_x; Q4_1/Q5_1's m and Q4_K/Q5_K's dmin · m_j terms use the
activation block sums. The kernels must match this bit for bit in the integer parts; the float
sums here are float64 (exact for the tests' ranges), the kernels' float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# name -> (ggml type id, elements per block, bytes per block)
TYPES = {
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210),
}
BY_ID = {v[0]: (name, v[1], v[2]) for name, v in TYPES.items()}


def type_info(ggml_type: int) -> tuple[str, int, int]:
    """(name, elements per block, bytes per block); ValueError for a type without a kernel."""
    try:
        return BY_ID[int(ggml_type)]
    except KeyError:
        raise ValueError(f"no GGUF block kernel for ggml type {int(ggml_type)}") from None


def row_bytes(ggml_type: int, k: int) -> int:
    """Bytes of one output row of K inputs; ValueError when K is not a multiple of the block."""
    name, elems, nbytes = type_info(ggml_type)
    if k % elems:
        raise ValueError(f"{name}: input size {k} is not a multiple of its block size {elems}")
    return k // elems * nbytes


def quantize_activations(x: torch.Tensor, block: int):
    """x (M, K) -> (q (M, K) int8, d (M, K/block) float32, s16 (M, K/16) int32 sums of q)."""
    m, k = x.shape
    xb = x.float().reshape(m, k // block, block)
    amax = xb.abs().amax(-1)
    c127 = torch.full_like(amax, 127.0)     # tensor / tensor: IEEE division, as the C++ does
    d = amax / c127
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None]).clamp_(-127, 127).to(torch.int8).reshape(m, k)
    return q, d, q.reshape(m, k // 16, 16).sum(-1, dtype=torch.int32)


@dataclass
class Unpacked:
    """A weight (N, K) as the kernels see it: w = d · isc · iq (+ m, or − dmin · im).

    iq (N, K) int32: the quants with their offset applied (Q4_0 −8, Q5_0 −16, Q6_K −32);
    isc (N, K/group) int32: sub-block scales (ones for the 32-element types); d (N, K/block)
    float32; m (N, K/32) float32 for Q4_1/Q5_1; dmin (N, K/256) and im (N, K/32) for Q4_K/Q5_K.
    """
    iq: torch.Tensor
    group: int
    isc: torch.Tensor
    block: int
    d: torch.Tensor
    m: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    im: torch.Tensor | None = None


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    return b[..., off:off + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:      # (..., 16) -> (..., 32): low, then high
    return torch.cat([qs & 15, qs >> 4], -1)


def _bits(qh: torch.Tensor) -> torch.Tensor:         # (..., 4) bytes -> (..., 32) bits, LSB first
    return ((qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).flatten(-2)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:   # (..., 12) -> 2 × (..., 8)
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return sc, mn


def unpack(blocks: torch.Tensor, ggml_type: int, n: int, k: int) -> Unpacked:
    """The integer quants and scales of blocks (N, row_bytes) uint8 of ``ggml_type``."""
    name, elems, nbytes = type_info(ggml_type)
    nb = k // elems
    b = blocks.reshape(n, nb, nbytes).to(torch.int32)
    raw = blocks.reshape(n, nb, nbytes)
    ones32 = torch.ones(n, k // 32, dtype=torch.int32)
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        has_m, five = name in ("Q4_1", "Q5_1"), name.startswith("Q5")
        qoff = (4 if has_m else 2) + (4 if five else 0)
        u = _nibbles(b[..., qoff:qoff + 16])
        if five:
            u = u | (_bits(b[..., qoff - 4:qoff]) << 4)
        offset = 0 if has_m else (16 if five else 8)
        return Unpacked((u - offset).reshape(n, k), 32, ones32, 32, _f16(raw, 0),
                        m=_f16(raw, 2) if has_m else None)
    if name == "Q8_0":
        iq = raw[..., 2:34].contiguous().view(torch.int8).to(torch.int32)
        return Unpacked(iq.reshape(n, k), 32, ones32, 32, _f16(raw, 0))
    if name in ("Q4_K", "Q5_K"):
        sc, mn = _scale_min_k4(b[..., 4:16])
        qs = b[..., (48 if name == "Q5_K" else 16):][..., :128].reshape(n, nb, 4, 32)
        u = torch.stack([qs & 15, qs >> 4], 3)                       # (n, nb, chunk, lo/hi, 32)
        if name == "Q5_K":
            hb = (b[..., 16:48].unsqueeze(-2) >> torch.arange(8, dtype=torch.int32)[:, None]) & 1
            u = u | (hb.reshape(n, nb, 4, 2, 32) << 4)               # bit 2c: low, 2c+1: high
        return Unpacked(u.reshape(n, k), 32, sc.reshape(n, k // 32), 256, _f16(raw, 0),
                        dmin=_f16(raw, 2), im=mn.reshape(n, k // 32))
    # Q6_K: ql[128], qh[64], scales[16] int8, d
    ql, qh = b[..., 0:128], b[..., 128:192]
    halves = []
    for h in range(2):
        lo, hi, bits = ql[..., 64 * h:64 * h + 32], ql[..., 64 * h + 32:64 * h + 64], qh[..., 32 * h:32 * h + 32]
        halves += [(lo & 15) | ((bits & 3) << 4), (hi & 15) | (((bits >> 2) & 3) << 4),
                   (lo >> 4) | (((bits >> 4) & 3) << 4), (hi >> 4) | (((bits >> 6) & 3) << 4)]
    iq = torch.cat(halves, -1) - 32
    sc = raw[..., 192:208].contiguous().view(torch.int8).to(torch.int32)
    return Unpacked(iq.reshape(n, k), 16, sc.reshape(n, k // 16), 256, _f16(raw, 208))


def dequantize(blocks: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    """The float32 weight (N, K) that the blocks stand for (gguf.quants' values)."""
    u = unpack(blocks, ggml_type, n, k)
    ds = u.d.repeat_interleave(u.block // u.group, 1) * u.isc          # (N, K/group) float32
    w = (ds.repeat_interleave(u.group, 1) * u.iq).reshape(n, k)
    if u.m is not None:
        w = w + u.m.repeat_interleave(32, 1)
    if u.dmin is not None:
        w = w - (u.dmin.repeat_interleave(8, 1) * u.im).repeat_interleave(32, 1)
    return w


def matmul(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, n: int, k: int):
    """x (M, K) float -> (y (M, N) float64, scale (M, N) float64: Σ |sub-block terms|, the
    magnitude that the kernels' float32 sums round).

    The kernels' result in exact integer arithmetic and float64 sums of float32 block terms."""
    u = unpack(blocks, ggml_type, n, k)
    q, dx, s16 = quantize_activations(x, u.block)
    mrows, g = q.shape[0], u.group
    p = torch.einsum("mjt,njt->mnj", q.double().reshape(mrows, k // g, g), u.iq.double().reshape(n, k // g, g))
    p = (p * u.isc.double()).reshape(mrows, n, k // u.block, u.block // g)
    dd = (u.d[None] * dx[:, None]).double()                                # d_w · d_x in float32
    terms = [dd * p.sum(-1)]                                               # exact integer sums
    scale = (dd * p.abs().sum(-1)).abs().sum(-1)          # per sub-block: what float32 rounds
    s32 = s16.reshape(mrows, k // 32, 2).sum(-1)
    if u.m is not None:
        terms.append((u.m[None] * (dx.repeat_interleave(u.block // 32, 1) * s32)[:, None]).double())
    if u.dmin is not None:
        msum = (u.im.double()[None] * s32.double()[:, None]).reshape(mrows, n, k // 256, 8).sum(-1)
        terms.append(-(u.dmin[None] * dx[:, None]).double() * msum)
    return sum(t.sum(-1) for t in terms), scale + sum(t.abs().sum(-1) for t in terms[1:])
