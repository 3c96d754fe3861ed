"""The gpt2 family (learned positions, LayerNorm, GELU MLP, fused c_attn), as transformers'
``GPT2LMHeadModel``. Conv1D weights (``TRANSPOSED``) are stored transposed into nn.Linear
layout by :mod:`llmsh.weights`, so every projection is an ``nn.Linear``. Shapes as in
:mod:`llmsh.models.llama`; the family interface is described in :mod:`llmsh.models`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import act_fn, embedding, sdpa

PREFIX = "transformer"
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
FUSED: dict = {}


class GPT2Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        # self.c: the width of q, k and v (hidden_size, or a tensor-parallel rank's share).
        self.layer, self.h, self.d = layer, c.num_attention_heads, c.head_dim
        self.c = self.h * self.d
        self.c_attn = nn.Linear(c.hidden_size, 3 * self.c)   # fused q, k, v
        self.c_proj = nn.Linear(self.c, c.hidden_size)

    def forward(self, x, cache, masks):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, self.h, self.d).transpose(1, 2)         # (B, H, T, D) each
                   for z in self.c_attn(x).split(self.c, dim=-1))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = sdpa(q, k, v, *masks[None])
        return self.c_proj(y.transpose(1, 2).reshape(b, t, self.c))


class GPT2MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.hidden_size, c.intermediate_size)
        self.c_proj = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = act_fn(c.hidden_act)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.attn = GPT2Attention(c, layer)
        self.ln_2 = nn.LayerNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = GPT2MLP(c)

    def forward(self, x, cache, masks):
        x = x + self.attn(self.ln_1(x), cache, masks)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """``transformer.*`` of a gpt2 checkpoint: token and position embeddings, blocks, ln_f."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.wte = embedding(c.vocab_size, c.hidden_size)
        self.wpe = embedding(c.max_position_embeddings, c.hidden_size)
        self.h = nn.ModuleList(GPT2Block(c, i) for i in range(c.num_hidden_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.rms_norm_eps)

    embed_name = "wte"
    windows = frozenset({None})
    fused = False                      # c_attn is fused in the checkpoint already

    @property
    def max_positions(self) -> int:
        """Learned positions cannot be extended past the table."""
        return self.wpe.num_embeddings

    def fuse(self) -> None:
        pass

    def ensure_positions(self, n: int) -> None:
        pass

    def forward(self, tokens, offset: int, cache, masks: dict):
        """Hidden states (B, T, C) before ``ln_f`` for tokens (B, T) at positions offset..

        Raises:
            ValueError: a position is past ``max_position_embeddings``.
        """
        t = tokens.shape[1]
        if offset + t > self.max_positions:
            raise ValueError(f"gpt2 supports {self.max_positions} positions, got {offset + t}")
        pos = torch.arange(offset, offset + t, device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)                                  # (B, T, C)
        for block in self.h:
            x = block(x, cache, masks)
        return x

    @property
    def norm(self):
        return self.ln_f


def checkpoint_name(key: str) -> str | None:
    """Our parameter name for checkpoint ``key`` (None: a tensor we drop): the ``transformer.``
    prefix added where the original gpt2 files lack it, old causal-mask buffers dropped."""
    if key.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    if not key.startswith(("transformer.", "lm_head.")):
        key = "transformer." + key
    return key


Backbone = GPT2Model
