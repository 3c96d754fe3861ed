"""The llama family: llama (incl. Llama 3.x RoPE scaling), mistral, qwen2 and qwen3 — one
pre-norm block (RMSNorm, GQA attention with RoPE, SwiGLU MLP) with per-architecture flags:
qwen2's q/k/v biases, qwen3's per-head RMSNorm of q and k before RoPE (``q_norm``/``k_norm``,
Qwen3 technical report, 2025), sliding windows per layer type.

Matches transformers' ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and
``Qwen3ForCausalLM`` (logits within 1e-4 in float32; see tests/test_model.py). The classes have
hooks that :mod:`llmsh.models.gemma3` overrides (norm class, embedding scale, the norms around
the attention and MLP outputs, a second RoPE base, the attention scale). Module and parameter names are the
Hugging Face checkpoint keys (``model.*``), so loading is an identity mapping. The family
interface (``PREFIX``, ``Backbone``, ``checkpoint_name``, …) is described in
:mod:`llmsh.models`.

Shapes: B batch, T new tokens, S keys visible (cached + new), H query heads, KV key/value
heads, D head_dim, C hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import KVCache
from ..config import ModelConfig
from .layers import RMSNorm, act_fn, attend, embedding, fused_linear, sdpa
from .rope import apply_rope, rope_inv_freq, rope_tables


PREFIX = "model"          # checkpoint keys of the backbone: model.embed_tokens, model.layers.N...
TRANSPOSED: tuple[str, ...] = ()   # no Conv1D weights
# Checkpoint tensors that fuse_projections() concatenates: fused name -> HF names, in row order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
QK_NORM = ("qwen3",)      # model types with q_norm / k_norm


# ----------------------------------------------------------------------------- llama family

class LlamaAttention(nn.Module):
    """GQA attention with RoPE; ``qk_norm``: a norm of that class (over D, weights shared by the
    heads) applied to q and k before RoPE. ``rope`` names the RoPE tables of this layer (the
    backbone's ``rope_cos``/``rope_sin``, or ``rope_local_*`` for sliding layers with their own
    base); ``scale`` None is SDPA's D**-0.5."""

    def __init__(self, c: ModelConfig, layer: int, qk_norm: type | None = None) -> None:
        super().__init__()
        self.layer, self.h, self.kv, self.d = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        sliding = c.layer_types[layer] == "sliding_attention"
        self.window = c.sliding_window if sliding else None
        self.rope = "rope_local" if sliding and c.rope_local_theta is not None else "rope"
        self.scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar ** -0.5
        qkv_bias = c.attention_bias
        o_bias = c.attention_bias and c.model_type != "qwen2"  # qwen2: biases on q/k/v only
        self.q_proj = nn.Linear(c.hidden_size, self.h * self.d, bias=qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.kv * self.d, bias=qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.kv * self.d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, c.hidden_size, bias=o_bias)
        self.qk_norm = qk_norm is not None
        if qk_norm is not None:
            self.q_norm = qk_norm(self.d, c.rms_norm_eps)
            self.k_norm = qk_norm(self.d, c.rms_norm_eps)

    def fuse(self) -> None:
        """Replace q/k/v_proj by one ``qkv_proj`` (rows q, k, v): one matmul instead of three."""
        self.qkv_proj = fused_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def qkv(self, x):
        """q (B, H, T, D), k and v (B, KV, T, D) for x (B, T, C), before RoPE (q/k normed)."""
        b, t, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split((self.h * self.d, self.kv * self.d, self.kv * self.d), -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(b, t, self.h, self.d).transpose(1, 2), k.view(b, t, self.kv, self.d).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v.view(b, t, self.kv, self.d).transpose(1, 2)

    def forward(self, x, cos, sin, cache: KVCache | None, masks: dict) -> torch.Tensor:
        b, t, _ = x.shape                                                  # x: (B, T, C)
        q, k, v = self.qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                          # (B, KV, S, D)
        y = sdpa(q, k, v, *masks[self.window], self.scale)               # (B, H, T, D)
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
    """x + attn_out(attention(norm(x))), then x + ffn(x). ``Norm`` is the class of every norm in
    the layer (and of the final norm); ``qk_norm`` None: by model type (``QK_NORM``)."""

    Norm = RMSNorm

    def __init__(self, c: ModelConfig, layer: int, qk_norm: bool | None = None) -> None:
        super().__init__()
        if qk_norm is None:
            qk_norm = c.model_type in QK_NORM
        self.input_layernorm = self.Norm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = LlamaAttention(c, layer, self.Norm if qk_norm else None)
        self.post_attention_layernorm = self.Norm(c.hidden_size, c.rms_norm_eps)
        self.mlp = LlamaMLP(c)

    def attn_out(self, a):
        """What is added to the residual for the attention output a (B, T, C): a itself."""
        return a

    def ffn(self, x):
        """The feed-forward branch added to the residual x (B, T, C)."""
        return self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, rope: dict, cache, masks):
        cos, sin = rope[self.self_attn.rope]
        x = x + self.attn_out(self.self_attn(self.input_layernorm(x), cos, sin, cache, masks))
        return x + self.ffn(x)


def checkpoint_name(key: str) -> str | None:
    """Our parameter name for checkpoint ``key`` (None: a tensor we drop)."""
    return None if key.endswith("rotary_emb.inv_freq") else key   # old llama checkpoints


class LlamaModel(nn.Module):
    """``model.*`` of a llama-family checkpoint: embeddings, layers, final norm, and the RoPE
    cos/sin tables: non-persistent buffers for min(max_position_embeddings, 4096) positions, grown
    by :meth:`ensure_positions`; they follow the module's device and dtype like transformers'
    (computed in float32, then cast). A config with a separate RoPE base for sliding layers
    (``rope_local_theta``) gets a second pair, ``rope_local_cos``/``rope_local_sin``.

    ``Layer`` is the block class; :meth:`embedding_scale` (None here) multiplies the embedding
    output, rounded to the compute dtype first as transformers does (Gemma's sqrt(hidden_size)).
    """

    embed_name = "embed_tokens"
    max_positions = None                 # RoPE extends to any length the cache holds
    Layer = LlamaLayer

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(self.Layer(c, i) for i in range(c.num_hidden_layers))
        self.norm = self.Layer.Norm(c.hidden_size, c.rms_norm_eps)
        # Kept float32 on CPU for regrowth: table name -> inverse frequencies.
        self._inv_freq = {"rope": rope_inv_freq(c)}
        if c.rope_local_theta is not None:
            self._inv_freq["rope_local"] = rope_inv_freq(c, local=True)
        # Capped: a 128k-position float32 table would cost ~130 MB; grown by ensure_positions.
        for name, inv in self._inv_freq.items():
            cos, sin = rope_tables(inv, min(c.max_position_embeddings, 4096))
            self.register_buffer(name + "_cos", cos, persistent=False)   # (P, D)
            self.register_buffer(name + "_sin", sin, persistent=False)
        self._embed_scales, scale = {}, self.embedding_scale(c)
        if scale is not None:   # the scale as each compute dtype holds it (on CPU: not meta)
            s = torch.tensor(scale, dtype=torch.float32, device="cpu")
            self._embed_scales = {dt: s.to(dt).item() for dt in (torch.float32, torch.bfloat16, torch.float16)}

    def embedding_scale(self, c: ModelConfig) -> float | None:
        """Factor on the token embeddings (None: none)."""
        return None

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
        for name, inv in self._inv_freq.items():
            cos, sin = rope_tables(inv, n)
            old = getattr(self, name + "_cos")
            setattr(self, name + "_cos", cos.to(old))       # keeps the buffers' device and dtype
            setattr(self, name + "_sin", sin.to(old))

    def rope_at(self, pos) -> dict:
        """Table name -> (cos, sin) rows at ``pos`` (a slice or an index tensor): (T, D) each."""
        return {name: (getattr(self, name + "_cos")[pos], getattr(self, name + "_sin")[pos])
                for name in self._inv_freq}

    def embed(self, tokens) -> torch.Tensor:
        """Token embeddings (B, T, C), times :meth:`embedding_scale` if there is one."""
        x = self.embed_tokens(tokens)
        return x * self._embed_scales[x.dtype] if self._embed_scales else x

    def forward(self, tokens, offset: int, cache: KVCache | None, masks: dict) -> torch.Tensor:
        """Hidden states (B, T, C) before the final norm for tokens (B, T) at positions offset.."""
        t = tokens.shape[1]
        if offset + t > self.rope_cos.shape[0]:
            self.ensure_positions(max(offset + t, 2 * self.rope_cos.shape[0]))
        rope = self.rope_at(slice(offset, offset + t))                # name -> (T, D) x2
        x = self.embed(tokens)                                        # (B, T, C)
        for layer in self.layers:
            x = layer(x, rope, cache, masks)
        return x

    def decode_hidden(self, tokens, pos, kv_pos, ks: list, vs: list, full_length: bool) -> torch.Tensor:
        """One token through the layers for :mod:`llmsh.compiled`'s fixed-shape step: hidden
        (B, 1, C) before the final norm, writing keys/values at ``pos`` of ks/vs in place. Same
        operations, in the same order, as :meth:`forward` for T = 1."""
        x = self.embed(tokens)                                      # (B, 1, C)
        rope = self.rope_at(pos)                                    # name -> (1, D) x2
        n = kv_pos.shape[0]
        visible = (kv_pos <= pos)[None] if full_length else None    # (1, L): a static S
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            cos, sin = rope[attn.rope]
            h = layer.input_layernorm(x)
            q, k, v = attn.qkv(h)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            ks[i].index_copy_(2, pos, k)
            vs[i].index_copy_(2, pos, v)
            mask = visible
            if attn.window is not None:
                near = (kv_pos > pos - attn.window)[None]          # (1, L)
                mask = near if mask is None else mask & near
            y = attend(q, ks[i][:, :, :n], vs[i][:, :, :n], mask, attn.scale)
            x = x + layer.attn_out(attn.o_proj(y.transpose(1, 2).reshape(x.shape[0], 1, attn.h * attn.d)))
            x = x + layer.ffn(x)
        return x


Backbone = LlamaModel
