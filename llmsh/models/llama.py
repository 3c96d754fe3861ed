"""The llama family: llama (incl. Llama 3.x RoPE scaling), mistral and qwen2 — one pre-norm
block (RMSNorm, GQA attention with RoPE, SwiGLU MLP) with per-architecture flags.

Matches transformers' ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM``
(logits within 1e-4 in float32; see tests/test_model.py). Module and parameter names are the
Hugging Face checkpoint keys (``model.*``), so loading is an identity mapping. The family
interface (``PREFIX``, ``Backbone``, ``checkpoint_name``, …) is described in
:mod:`llmsh.models`.

Shapes: B batch, T new tokens, S keys visible (cached + new), H query heads, KV key/value
heads, D head_dim, C hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..config import ModelConfig
from .layers import RMSNorm, act_fn, embedding, fused_linear, sdpa
from .rope import apply_rope, rope_inv_freq, rope_tables


PREFIX = "model"          # checkpoint keys of the backbone: model.embed_tokens, model.layers.N...
TRANSPOSED: tuple[str, ...] = ()   # no Conv1D weights
# Checkpoint tensors that fuse_projections() concatenates: fused name -> HF names, in row order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


# ----------------------------------------------------------------------------- llama family

class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.h, self.kv, self.d = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.window = c.sliding_window if c.layer_types[layer] == "sliding_attention" else None
        qkv_bias = c.attention_bias
        o_bias = c.attention_bias and c.model_type == "llama"  # qwen2: biases on q/k/v only
        self.q_proj = nn.Linear(c.hidden_size, self.h * self.d, bias=qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.kv * self.d, bias=qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.kv * self.d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, c.hidden_size, bias=o_bias)

    def fuse(self) -> None:
        """Replace q/k/v_proj by one ``qkv_proj`` (rows q, k, v): one matmul instead of three."""
        self.qkv_proj = fused_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def qkv(self, x):
        """q (B, H, T, D), k and v (B, KV, T, D) for x (B, T, C), before RoPE."""
        b, t, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split((self.h * self.d, self.kv * self.d, self.kv * self.d), -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.view(b, t, self.h, self.d).transpose(1, 2), k.view(b, t, self.kv, self.d).transpose(1, 2),
                v.view(b, t, self.kv, self.d).transpose(1, 2))

    def forward(self, x, cos, sin, cache: KVCache | None, masks: dict) -> torch.Tensor:
        b, t, _ = x.shape                                                  # x: (B, T, C)
        q, k, v = self.qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                          # (B, KV, S, D)
        y = sdpa(q, k, v, *masks[self.window])                             # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.h * self.d))


class LlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = act_fn(c.hidden_act)

    def fuse(self) -> None:
        """Replace gate/up_proj by one ``gate_up_proj`` (rows gate, then up)."""
        self.gate_up_proj = fused_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = LlamaAttention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, x, cos, sin, cache, masks):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, masks)
        return x + self.mlp(self.post_attention_layernorm(x))


def checkpoint_name(key: str) -> str | None:
    """Our parameter name for checkpoint ``key`` (None: a tensor we drop)."""
    return None if key.endswith("rotary_emb.inv_freq") else key   # old llama checkpoints


class LlamaModel(nn.Module):
    """``model.*`` of a llama-family checkpoint: embeddings, layers, final norm, and the RoPE
    cos/sin tables: non-persistent buffers for min(max_position_embeddings, 4096) positions, grown
    by :meth:`ensure_positions`; they follow the module's device and dtype like transformers'
    (computed in float32, then cast)."""

    embed_name = "embed_tokens"
    max_positions = None                 # RoPE extends to any length the cache holds

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self._inv_freq = rope_inv_freq(c)           # kept float32 on CPU for regrowth
        # Capped: a 128k-position float32 table would cost ~130 MB; grown by ensure_positions.
        cos, sin = rope_tables(self._inv_freq, min(c.max_position_embeddings, 4096))
        self.register_buffer("rope_cos", cos, persistent=False)   # (P, D)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def windows(self) -> set:
        """The distinct attention windows of the layers (None = full attention)."""
        return {layer.self_attn.window for layer in self.layers}

    @property
    def fused(self) -> bool:
        return hasattr(self.layers[0].self_attn, "qkv_proj")

    def fuse(self) -> None:
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def ensure_positions(self, n: int) -> None:
        """Make the RoPE tables cover positions 0..n-1."""
        if n <= self.rope_cos.shape[0]:
            return
        cos, sin = rope_tables(self._inv_freq, n)
        self.rope_cos = cos.to(self.rope_cos)          # keeps the buffers' device and dtype
        self.rope_sin = sin.to(self.rope_sin)

    def forward(self, tokens, offset: int, cache: KVCache | None, masks: dict) -> torch.Tensor:
        """Hidden states (B, T, C) before the final norm for tokens (B, T) at positions offset.."""
        t = tokens.shape[1]
        if offset + t > self.rope_cos.shape[0]:
            self.ensure_positions(max(offset + t, 2 * self.rope_cos.shape[0]))
        cos, sin = self.rope_cos[offset:offset + t], self.rope_sin[offset:offset + t]   # (T, D)
        x = self.embed_tokens(tokens)                              # (B, T, C)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, masks)
        return x

    def decode_hidden(self, tokens, pos, kv_pos, ks: list, vs: list, full_length: bool) -> torch.Tensor:
        """One token through the layers for :mod:`llmsh.compiled`'s fixed-shape step: hidden
        (B, 1, C) before the final norm, writing keys/values at ``pos`` of ks/vs in place. Same
        operations, in the same order, as :meth:`forward` for T = 1."""
        x = self.embed_tokens(tokens)                               # (B, 1, C)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]           # (1, D)
        n = kv_pos.shape[0]
        visible = (kv_pos <= pos)[None] if full_length else None    # (1, L): a static S
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = attn.qkv(h)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            ks[i].index_copy_(2, pos, k)
            vs[i].index_copy_(2, pos, v)
            mask = visible
            if attn.window is not None:
                near = (kv_pos > pos - attn.window)[None]          # (1, L)
                mask = near if mask is None else mask & near
            y = F.scaled_dot_product_attention(q, ks[i][:, :, :n], vs[i][:, :, :n], attn_mask=mask,
                                               enable_gqa=attn.h != attn.kv)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(x.shape[0], 1, attn.h * attn.d))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x


Backbone = LlamaModel
