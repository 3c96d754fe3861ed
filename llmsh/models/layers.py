"""Building blocks shared by the decoder families: attention masks and SDPA, activations,
RMSNorm, embeddings and projection fusion. Shapes as in :mod:`llmsh.model`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(offset: int, t: int, window: int | None, device) -> tuple[int, torch.Tensor | bool | None]:
    """Which cached keys the t queries at positions offset.. may see.

    Returns (start, mask): keys before ``start`` are invisible to every query and are sliced off
    (bounds the work under a sliding window); ``mask`` is None (all remaining keys visible),
    True (plain causal, i.e. SDPA's ``is_causal``, right only when the key and query ranges
    coincide) or a boolean (t, S-start) tensor, True = attend. A key j is visible to the query
    at position i when j <= i and, with a window W, i - j < W (transformers' sliding mask).
    """
    start = 0 if window is None else max(0, offset - window + 1)
    if t == 1:
        return start, None
    if offset == 0 and (window is None or t <= window):
        return 0, True
    q = torch.arange(offset, offset + t, device=device)[:, None]
    k = torch.arange(start, offset + t, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return start, mask


def sdpa(q, k, v, start: int, mask, scale: float | None = None) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, KV, S, D) from key ``start`` -> (B, H, T, D);
    ``mask`` as :func:`attention_mask` gives it, ``scale`` as :func:`attend`."""
    if start:
        k, v = k[:, :, start:], v[:, :, start:]
    return attend(q, k, v, mask, scale)


def attend(q, k, v, mask, scale: float | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ, masked) v for q (B, H, T, D), k/v (B, KV, S, D) -> (B, H, T, D).

    ``mask``: None (all keys), True (causal, T == S) or a boolean (T, S) / (1, S) tensor, True =
    attend. ``scale`` None is D**-0.5.
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is True:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def act_fn(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    return {"gelu": F.gelu, "relu": F.relu}[name]


def fused_linear(*parts: nn.Linear) -> nn.Linear:
    """One nn.Linear whose output rows are ``parts``' rows in order (same input, same dtype)."""
    w = torch.cat([p.weight for p in parts]) if parts[0].weight.device.type != "meta" else None
    out = sum(p.out_features for p in parts)
    fused = nn.Linear(parts[0].in_features, out, bias=parts[0].bias is not None,
                      device="meta", dtype=parts[0].weight.dtype)
    if w is not None:
        fused.weight = nn.Parameter(w, requires_grad=False)
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim), without the random init when built on the meta device (for
    loading): normal_ on meta goes through torch._refs, whose import pulls in torch._dynamo
    (about 1 s of a cold start)."""
    w = torch.empty(num, dim)
    return nn.Embedding(num, dim, _weight=w) if w.device.type == "meta" else nn.Embedding(num, dim)


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then scale by ``weight``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
