"""Rotary position embeddings (RoPE) as transformers computes them for llama-family models.

Su et al., "RoFormer" (2021), in the half-rotation layout of Hugging Face's ``rotate_half``
(the two halves of head_dim form the pairs), with the ``linear`` and ``llama3`` frequency
scalings of transformers' ``ROPE_INIT_FUNCTIONS``. D is head_dim.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def rope_inv_freq(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies (D/2,) float32 on CPU, as transformers' ``ROPE_INIT_FUNCTIONS``, for
    the full-attention layers, or with ``local`` for the sliding-window layers of a config with
    their own base (gemma3's ``rope_local_theta`` / ``rope_local_scaling``).

    ``linear`` divides every frequency by ``factor``; ``llama3`` divides long wavelengths
    (> original_max_position_embeddings / low_freq_factor) by ``factor``, keeps short ones
    (< .../high_freq_factor) and interpolates linearly (in 1/wavelength) in between.
    """
    d = config.head_dim
    theta, s = ((config.rope_local_theta, config.rope_local_scaling) if local
                else (config.rope_theta, config.rope_scaling))
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, smoothed, scaled)


def rope_tables(inv_freq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (n, D) float32 for positions 0..n-1 (half-rotation layout: freqs twice)."""
    freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=inv_freq.device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (T, D), rotating the two halves of D as transformers."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
