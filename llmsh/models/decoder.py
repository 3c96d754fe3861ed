"""The ``Decoder``: a causal LM over any family of :mod:`llmsh.models`, with a KV cache.

It knows no family by name: the family's backbone (under its checkpoint prefix, ``model`` or
``transformer``) turns token ids into hidden states, and the decoder adds the output projection,
masks, cache bookkeeping and the scoring options. Shapes: B batch, T new tokens, C hidden size,
V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import KVCache
from ..config import ModelConfig
from . import family
from .layers import attention_mask


class Decoder(nn.Module):
    """A causal LM: token ids (B, T) -> float32 logits (B, T, V). Pure: no I/O, no tokenizer.

    Submodules: the family's backbone under its checkpoint prefix (:attr:`backbone`), and
    ``lm_head`` (its weight is the embedding's when ``tie_word_embeddings``). Matches
    transformers' ``*ForCausalLM`` of each supported architecture (tests/test_model.py).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        fam = family(config.model_type)
        self.__dict__["family"] = fam
        self.__dict__["prefix"] = fam.PREFIX
        setattr(self, fam.PREFIX, fam.Backbone(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def backbone(self) -> nn.Module:
        """The family's embeddings + blocks + final norm (``self.model`` / ``self.transformer``)."""
        return getattr(self, self.prefix)

    @property
    def embed_tokens(self) -> nn.Module:
        """The token embedding, whatever the family calls it."""
        return getattr(self.backbone, self.backbone.embed_name)

    def tie_weights(self) -> None:
        """Re-point ``lm_head.weight`` at the embedding (after loading with ``assign=True``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def fused(self) -> bool:
        """Whether :meth:`fuse_projections` has run (always False for gpt2, already fused)."""
        return bool(self.backbone.fused)

    def fuse_projections(self) -> "Decoder":
        """Fuse q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` in every layer.

        Fewer, larger matmuls per token (decode is bound by per-operation overhead on a CPU);
        results are unchanged up to float rounding of the matmul blocking. Names after fusion are
        ``model.layers.N.self_attn.qkv_proj`` / ``model.layers.N.mlp.gate_up_proj`` (the family's
        ``FUSED``); :func:`llmsh.weights.load_decoder` fuses while loading. Works on the meta
        device too (shapes only). No-op for families without ``FUSED`` or when fused.
        """
        if self.family.FUSED and not self.fused:
            self.backbone.fuse()
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
        """A KV cache on this decoder's device and dtype (position tables grown to fit it)."""
        p = self.lm_head.weight
        dtype = getattr(self, "compute_dtype", None) or p.dtype    # quantized weights are int8
        self.ensure_positions(max_seq_len)
        return KVCache.for_model(self.config, max_seq_len, batch_size, dtype=dtype, device=p.device)

    def ensure_positions(self, n: int) -> None:
        """Make position tables (RoPE) cover positions 0..n-1 (no-op where there are none)."""
        self.backbone.ensure_positions(n)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False, logits_from: int = 0) -> torch.Tensor:
        """Logits for ``tokens`` (B, T) int64 whose positions start at ``cache.offset`` (0 without).

        Returns (B, T, V) float32; (B, 1, V) with ``last_only``; (B, T - logits_from, V), the
        logits of the new tokens logits_from … T−1 only, with ``logits_from`` (scoring: the output
        projection is a fifth of the model's FLOPs and its logits most of the memory). With a
        cache, writes the new keys/values and advances ``cache.offset`` by T.

        Raises:
            ValueError: T is 0, ``logits_from`` is outside 0 … T−1, the cache would overflow, or
                a position is past a family's hard limit (gpt2's learned positions).
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
        backbone = self.backbone
        masks = {w: attention_mask(offset, t, w, tokens.device) for w in backbone.windows}
        x = backbone(tokens, offset, cache, masks)                          # (B, T, C)
        if last_only:
            x = x[:, -1:]
        elif logits_from:
            x = x[:, logits_from:]
        if cache is not None:
            cache.advance(t)
        return self.head(x)                                                 # (B, T|1, V)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits (B, T, V) for hidden states x (B, T, C) before the final norm: norm,
        ``lm_head``, then cap · tanh(logits / cap) with ``config.final_logit_softcapping`` (in
        the compute dtype, as transformers' Gemma models)."""
        logits = self.lm_head(self.backbone.norm(x))
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
