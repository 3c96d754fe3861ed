"""Our decoder-only transformer: llama / mistral / qwen2 and gpt2, with a KV cache.

Matches transformers' ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and
``GPT2LMHeadModel`` (logits within 1e-4 in float32; see tests/test_model.py). Module and
parameter names are the Hugging Face checkpoint keys, so loading is an identity mapping
(except gpt2's Conv1D weights, which :mod:`llmsh.weights` transposes into our nn.Linear
layout so that every projection is an ``nn.Linear`` that later work can fuse or quantize).

Shapes: B batch, T new tokens, S keys visible (cached + new), H query heads, KV key/value
heads, D head_dim, C hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .gpt2 import GPT2Model
from .layers import RMSNorm, act_fn, attention_mask, embedding, fused_linear, sdpa
from .rope import apply_rope, rope_inv_freq, rope_tables


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


class LlamaModel(nn.Module):
    """``model.*`` of a llama-family checkpoint: embeddings, layers, final norm."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


# ----------------------------------------------------------------------------- decoder

class Decoder(nn.Module):
    """A causal LM: token ids (B, T) -> float32 logits (B, T, V). Pure: no I/O, no tokenizer.

    Submodules: ``model`` (llama family) or ``transformer`` (gpt2), and ``lm_head`` (its weight
    is the embedding's when ``tie_word_embeddings``). RoPE cos/sin tables are non-persistent
    buffers for min(max_position_embeddings, 4096) positions, grown by :meth:`ensure_positions`
    (called by :meth:`new_cache` for the cache size, and on demand by forward); they follow
    the module's device and dtype like transformers' (computed in float32, then cast).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.is_gpt2:
            self.transformer = GPT2Model(config)
            embed = self.transformer.wte
        else:
            self.model = LlamaModel(config)
            embed = self.model.embed_tokens
            self._inv_freq = rope_inv_freq(config)           # kept float32 on CPU for regrowth
            # Capped: a 128k-position float32 table would cost ~130 MB; grown by ensure_positions.
            cos, sin = rope_tables(self._inv_freq, min(config.max_position_embeddings, 4096))
            self.register_buffer("rope_cos", cos, persistent=False)   # (P, D)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = embed.weight
        # Distinct attention windows (None = full): one mask per window per forward.
        self._windows = {None} if config.is_gpt2 else {l.self_attn.window for l in self.model.layers}

    def tie_weights(self) -> None:
        """Re-point ``lm_head.weight`` at the embedding (after loading with ``assign=True``)."""
        if self.config.tie_word_embeddings:
            embed = self.transformer.wte if self.config.is_gpt2 else self.model.embed_tokens
            self.lm_head.weight = embed.weight

    @property
    def fused(self) -> bool:
        """Whether :meth:`fuse_projections` has run (always False for gpt2, already fused)."""
        return not self.config.is_gpt2 and hasattr(self.model.layers[0].self_attn, "qkv_proj")

    def fuse_projections(self) -> "Decoder":
        """Fuse q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` in every llama layer.

        Fewer, larger matmuls per token (decode is bound by per-operation overhead on a CPU);
        results are unchanged up to float rounding of the matmul blocking. Names after fusion are
        ``model.layers.N.self_attn.qkv_proj`` / ``model.layers.N.mlp.gate_up_proj`` (see
        ``FUSED``); :func:`llmsh.weights.load_decoder` fuses while loading. Works on the meta
        device too (shapes only). No-op for gpt2 (c_attn is fused already) or when fused.
        """
        if self.config.is_gpt2 or self.fused:
            return self
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def num_parameters(self) -> int:
        """Number of model weights (tied ones once), whether stored as float parameters or as
        quantized buffers (int4: two per byte); quantization scales and RoPE tables excluded."""
        seen, n = set(), 0
        for m in self.modules():
            tensors = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
            for name, t in tensors:
                if t is None or name in ("scales", "scales_and_zeros") or name.startswith("rope_"):
                    continue
                key = (t.device, t.data_ptr()) if t.device.type != "meta" else id(t)
                if key in seen:
                    continue
                seen.add(key)
                n += t.numel() * (2 if getattr(m, "group_size", None) and name == "weight" else 1)
        return n

    def new_cache(self, max_seq_len: int, batch_size: int = 1) -> KVCache:
        """A KV cache on this decoder's device and dtype (RoPE tables grown to fit it)."""
        p = self.lm_head.weight
        dtype = getattr(self, "compute_dtype", None) or p.dtype    # quantized weights are int8
        self.ensure_positions(max_seq_len)
        return KVCache.for_model(self.config, max_seq_len, batch_size, dtype=dtype, device=p.device)

    def ensure_positions(self, n: int) -> None:
        """Make the RoPE tables cover positions 0..n-1 (no-op for gpt2 or when they do)."""
        if self.config.is_gpt2 or n <= self.rope_cos.shape[0]:
            return
        cos, sin = rope_tables(self._inv_freq, n)
        self.rope_cos = cos.to(self.rope_cos)          # keeps the buffers' device and dtype
        self.rope_sin = sin.to(self.rope_sin)

    def _rope(self, offset: int, t: int):
        if offset + t > self.rope_cos.shape[0]:
            self.ensure_positions(max(offset + t, 2 * self.rope_cos.shape[0]))
        return self.rope_cos[offset:offset + t], self.rope_sin[offset:offset + t]   # (T, D)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False, logits_from: int = 0) -> torch.Tensor:
        """Logits for ``tokens`` (B, T) int64 whose positions start at ``cache.offset`` (0 without).

        Returns (B, T, V) float32; (B, 1, V) with ``last_only``; (B, T - logits_from, V), the
        logits of the new tokens logits_from … T−1 only, with ``logits_from`` (scoring: the output
        projection is a fifth of the model's FLOPs and its logits most of the memory). With a
        cache, writes the new keys/values and advances ``cache.offset`` by T.

        Raises:
            ValueError: T is 0, ``logits_from`` is outside 0 … T−1, the cache would overflow, or (gpt2) a position is past
                ``max_position_embeddings`` (learned positions cannot be extended).
        """
        b, t = tokens.shape
        step = self.__dict__.get("decode_step")
        if step is not None and t == 1 and cache is not None:
            out = step(tokens, cache)           # llmsh.compiled: the fixed-shape decode step
            if out is not None:
                return out
        offset = cache.offset if cache is not None else 0
        if t == 0:
            raise ValueError("forward() needs at least one token")
        if not 0 <= logits_from < t:
            raise ValueError(f"logits_from must be in 0 … {t - 1}, got {logits_from}")
        if cache is not None and offset + t > cache.max_seq_len:
            raise ValueError(f"KV cache overflow: {offset} + {t} tokens > max_seq_len {cache.max_seq_len}")
        masks = {w: attention_mask(offset, t, w, tokens.device) for w in self._windows}
        if self.config.is_gpt2:
            tr = self.transformer
            if offset + t > self.config.max_position_embeddings:
                raise ValueError(f"gpt2 supports {self.config.max_position_embeddings} positions, "
                                 f"got {offset + t}")
            pos = torch.arange(offset, offset + t, device=tokens.device)
            x = tr.wte(tokens) + tr.wpe(pos)                                  # (B, T, C)
            for block in tr.h:
                x = block(x, cache, masks)
            norm = tr.ln_f
        else:
            cos, sin = self._rope(offset, t)
            x = self.model.embed_tokens(tokens)                              # (B, T, C)
            for layer in self.model.layers:
                x = layer(x, cos, sin, cache, masks)
            norm = self.model.norm
        if last_only:
            x = x[:, -1:]
        elif logits_from:
            x = x[:, logits_from:]
        if cache is not None:
            cache.advance(t)
        return self.lm_head(norm(x)).float()                                 # (B, T|1, V)
