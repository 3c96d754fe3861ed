"""The decoder families and the table from a config's ``model_type`` to its family, as mlx-lm's
``models/`` does. Adding an architecture is one module here and one row in ``FAMILIES``.

A family module provides:
    PREFIX: str                     the backbone's checkpoint prefix ("model", "transformer")
    Backbone(config): nn.Module     embeddings, blocks and final norm, with
        embed_name: str             attribute of the token embedding (tied to lm_head)
        norm: nn.Module             the final norm (the decoder applies it, then lm_head, then
                                    config.final_logit_softcapping if set)
        windows: set                distinct attention windows of its layers (None = full)
        max_positions: int | None   a hard limit on positions (learned tables), or None
        fused / fuse()              q/k/v and gate/up fusion (see ``FUSED``)
        ensure_positions(n)         grow position tables to n (no-op without tables)
        forward(tokens, offset, cache, masks) -> (B, T, C) hidden states before the final norm
        decode_hidden(...)          optional: the one-token step that :mod:`llmsh.compiled` compiles
    FUSED: dict                     fused name -> checkpoint names, in row order
    TRANSPOSED: tuple[str, ...]     weight-name suffixes stored transposed (GPT-2's Conv1D)
    checkpoint_name(key) -> str | None   our parameter name for a checkpoint key (None: dropped)

Families may build on each other's classes: gemma3's backbone is the llama one with its hooks
(``LlamaModel.embedding_scale``, ``LlamaLayer.Norm`` / ``attn_out`` / ``ffn``) overridden.

This package's ``__init__`` imports no torch: :mod:`llmsh.config` reads the table from here.
"""

from __future__ import annotations

import importlib

# model_type (config.json) -> family module in this package.
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",          # the text part of the multimodal model (vision weights dropped)
    "gpt2": "gpt2",
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def family(model_type: str):
    """The family module for ``model_type``.

    Raises:
        KeyError: ``model_type`` is not in ``FAMILIES`` (configs are checked before this).
    """
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}")


def __getattr__(name: str):
    if name == "Decoder":              # lazy: keeps this package's import free of torch
        from .decoder import Decoder

        return Decoder
    raise AttributeError(name)
