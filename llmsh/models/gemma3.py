"""The gemma3 family: Gemma 3's text model (``gemma3_text``, and the language model of the
multimodal ``gemma3``, whose vision tower and projector are dropped on loading).

Gemma Team, "Gemma 3 Technical Report" (2025); matches transformers' ``Gemma3ForCausalLM`` and
the text path of ``Gemma3ForConditionalGeneration`` (logits within 1e-4 in float32; see
tests/test_model.py). It is the llama block with Gemma's differences, set through the llama
classes' hooks:

- RMSNorm scales by (1 + weight), computed in float32 and cast back after the scaling
  (:class:`GemmaRMSNorm`); per-head q/k norms before RoPE;
- four norms per block: the attention and MLP outputs are normed before joining the residual
  (``post_attention_layernorm``, ``post_feedforward_layernorm``), the MLP input by
  ``pre_feedforward_layernorm``;
- embeddings times sqrt(hidden_size), rounded to the compute dtype first;
- sliding-window layers (``layer_types``, from ``sliding_window_pattern`` by default) with their
  own RoPE base (``rope_local_theta``), global layers with ``rope_theta`` and its scaling;
- attention scale ``query_pre_attn_scalar``**-0.5; GELU-tanh gated MLP; tied embeddings;
  optional final-logit soft-capping (applied by :meth:`llmsh.models.Decoder.head`);
  ``attn_logit_softcapping`` is not applied, as in transformers (see :mod:`llmsh.config_gemma3`).

Shapes as in :mod:`llmsh.models.llama`; the family interface is described in :mod:`llmsh.models`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .llama import FUSED, LlamaLayer, LlamaModel

PREFIX = "model"
TRANSPOSED: tuple[str, ...] = ()
__all__ = ["FUSED", "PREFIX", "TRANSPOSED", "Backbone", "GemmaRMSNorm", "checkpoint_name"]

# Checkpoint key prefixes of the multimodal model's language model -> ours. transformers up to
# 4.51 (and Google's files, and 5.x's save_pretrained) write language_model.model.*; 4.52-4.57
# write model.language_model.*.
_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")


class GemmaRMSNorm(nn.Module):
    """transformers' Gemma3RMSNorm: x / rms(x) · (1 + weight), all in float32, then cast back
    (llama casts before scaling). The weight starts at zero: the identity scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3Layer(LlamaLayer):
    Norm = GemmaRMSNorm

    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__(c, layer, qk_norm=True)
        self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def attn_out(self, a):
        return self.post_attention_layernorm(a)

    def ffn(self, x):
        return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(LlamaModel):
    """``model.*`` of a Gemma 3 text checkpoint (see :class:`llmsh.models.llama.LlamaModel`)."""

    Layer = Gemma3Layer

    def embedding_scale(self, c: ModelConfig) -> float:
        return c.hidden_size ** 0.5


def checkpoint_name(key: str) -> str | None:
    """Our parameter name for checkpoint ``key``: the multimodal layouts' language-model keys
    renamed to ``model.*`` / ``lm_head.*``, vision tower and projector dropped (None)."""
    if key.startswith(_VISION_PREFIXES):
        return None
    for old, new in _TEXT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


Backbone = Gemma3Model
