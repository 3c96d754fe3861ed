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

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,) float32 on CPU, as transformers' ``ROPE_INIT_FUNCTIONS``.

    ``linear`` divides every frequency by ``factor``; ``llama3`` divides long wavelengths
    (> original_max_position_embeddings / low_freq_factor) by ``factor``, keeps short ones
    (< .../high_freq_factor) and interpolates linearly (in 1/wavelength) in between.
    """
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = config.rope_scaling
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


def sdpa(q, k, v, start: int, mask) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, KV, S, D) from key ``start`` -> (B, H, T, D)."""
    if start:
        k, v = k[:, :, start:], v[:, :, start:]
    gqa = q.shape[1] != k.shape[1]
    if mask is True:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _act(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    return {"gelu": F.gelu, "relu": F.relu}[name]


def _fused_linear(*parts: nn.Linear) -> nn.Linear:
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


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim), without the random init when built on the meta device (for
    loading): normal_ on meta goes through torch._refs, whose import pulls in torch._dynamo
    (about 1 s of a cold start)."""
    w = torch.empty(num, dim)
    return nn.Embedding(num, dim, _weight=w) if w.device.type == "meta" else nn.Embedding(num, dim)


# Checkpoint tensors that fuse_projections() concatenates: fused name -> HF names, in row order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


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
        self.qkv_proj = _fused_linear(self.q_proj, self.k_proj, self.v_proj)
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
        self.act = _act(c.hidden_act)

    def fuse(self) -> None:
        """Replace gate/up_proj by one ``gate_up_proj`` (rows gate, then up)."""
        self.gate_up_proj = _fused_linear(self.gate_proj, self.up_proj)
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
        self.embed_tokens = _embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


# ----------------------------------------------------------------------------- gpt2

class GPT2Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.h, self.d, self.c = layer, c.num_attention_heads, c.head_dim, c.hidden_size
        self.c_attn = nn.Linear(c.hidden_size, 3 * c.hidden_size)   # fused q, k, v
        self.c_proj = nn.Linear(c.hidden_size, c.hidden_size)

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
        self.act = _act(c.hidden_act)

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
        self.wte = _embedding(c.vocab_size, c.hidden_size)
        self.wpe = _embedding(c.max_position_embeddings, c.hidden_size)
        self.h = nn.ModuleList(GPT2Block(c, i) for i in range(c.num_hidden_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.rms_norm_eps)


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
