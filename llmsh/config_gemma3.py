"""Gemma 3's config.json (``gemma3_text``, or the text part of a multimodal ``gemma3``) as a
:class:`llmsh.config.ModelConfig`.

Defaults for absent keys are transformers' ``Gemma3TextConfig`` ones (Google's multimodal
checkpoints leave most of ``text_config`` out). Both config generations are read: transformers
4.x writes ``rope_theta`` (full-attention layers), ``rope_local_base_freq`` (sliding layers) and
``rope_scaling`` (full-attention layers only) at the top level, and the layer pattern as
``sliding_window_pattern`` (every N-th layer global) or ``layer_types``; 5.x writes
``rope_parameters`` per layer type ({"full_attention": {...}, "sliding_attention": {...}}).

``attn_logit_softcapping`` is read by transformers' Gemma3TextConfig but not applied by its
model (Gemma 3 replaced Gemma 2's attention soft-cap by the q/k norms): it is ignored here too, and tests/test_model.py checks that a config setting it
still matches transformers. ``final_logit_softcapping`` is applied, as transformers does.
"""

from __future__ import annotations

from .config import (ModelConfig, _check_numbers, _get, _rope, check_act, rope_scaling_of)
from .errors import ConfigError

# Gemma3TextConfig's defaults (transformers 5.x), for keys a config may leave out.
_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                 max_position_embeddings=131_072, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                 sliding_window=4096, hidden_activation="gelu_pytorch_tanh", bos_token_id=2,
                 eos_token_id=1, tie_word_embeddings=True, attention_bias=False)
_GLOBAL_THETA, _LOCAL_THETA, _PATTERN = 1_000_000.0, 10_000.0, 6


def _text_part(d: dict, mt: str) -> dict:
    """The text model's keys: ``text_config`` of a ``gemma3`` config, with top-level
    tie_word_embeddings / bos / eos filling what it leaves out."""
    if mt == "gemma3_text":
        return d
    text = d.get("text_config")
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise ConfigError("config.json: gemma3 text_config must be an object")
    if text.get("model_type") not in (None, "gemma3_text"):
        raise ConfigError(f"config.json: gemma3 text_config has model_type "
                          f"{text.get('model_type')!r}, expected 'gemma3_text'")
    out = dict(text)
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "torch_dtype", "dtype"):
        if key == "tie_word_embeddings" and d.get(key) is not None:
            out[key] = d[key]                # the multimodal model ties by its own flag
        elif out.get(key) is None and d.get(key) is not None:
            out[key] = d[key]
    return out


def _local_rope(d: dict) -> tuple[float, dict | None]:
    """(theta, scaling) of the sliding-window layers."""
    params = d.get("rope_parameters")
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    if isinstance(local, dict):                                         # transformers 5.x
        theta = _get(local, "rope_theta", _get(d, "rope_local_base_freq", _LOCAL_THETA))
        return float(theta), rope_scaling_of({k: v for k, v in local.items() if k != "rope_theta"})
    return float(_get(d, "rope_local_base_freq", _LOCAL_THETA)), None  # 4.x: never scaled


def _layer_types(d: dict, n: int) -> tuple[str, ...]:
    given = d.get("layer_types")
    if given is not None:
        if not (isinstance(given, list) and len(given) == n
                and all(t in ("full_attention", "sliding_attention") for t in given)):
            raise ConfigError(f"config.json: layer_types must list 'full_attention' or "
                              f"'sliding_attention' for each of the {n} layers")
        return tuple(given)
    pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or _PATTERN
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
        raise ConfigError(f"config.json: sliding_window_pattern must be a positive integer, got {pattern!r}")
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n))


def _cap(d: dict, key: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ConfigError(f"config.json: {key} must be a positive number or null, got {v!r}")
    return float(v)


def from_gemma3(d: dict, mt: str) -> ModelConfig:
    """A ModelConfig for a ``gemma3_text`` or ``gemma3`` config dict (``mt``).

    Raises:
        ConfigError: a malformed text_config or layer pattern, a bad size (as for the other
            architectures), bidirectional attention (EmbeddingGemma), a missing sliding_window
            with sliding layers, or an unsupported rope scaling / activation.
    """
    d = dict(_DEFAULTS, **{k: v for k, v in _text_part(d, mt).items() if v is not None})
    _check_numbers(d, mt, head_dim_default=True)
    if d.get("use_bidirectional_attention"):
        raise ConfigError("config.json: use_bidirectional_attention (an embedding model) is not supported")
    n = int(d["num_hidden_layers"])
    types = _layer_types(d, n)
    window = d.get("sliding_window")
    if "sliding_attention" in types and not (isinstance(window, int) and window > 0):
        raise ConfigError(f"config.json: sliding_window must be a positive integer, got {window!r}")
    theta, scaling = _rope(d, _GLOBAL_THETA)
    local_theta, local_scaling = _local_rope(d)
    for what, t in (("full", theta), ("sliding", local_theta)):
        if not 0 < t < float("inf"):
            raise ConfigError(f"config.json: the {what}-attention layers' rope_theta must be "
                              f"a positive number, got {t!r}")
    return ModelConfig(
        model_type=mt,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        num_hidden_layers=n,
        num_attention_heads=int(d["num_attention_heads"]),
        num_key_value_heads=int(d["num_key_value_heads"]),
        intermediate_size=int(d["intermediate_size"]),
        head_dim=int(d["head_dim"]),
        max_position_embeddings=int(d["max_position_embeddings"]),
        rms_norm_eps=float(d["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        hidden_act=check_act(d["hidden_activation"]),
        tie_word_embeddings=bool(d["tie_word_embeddings"]),
        attention_bias=bool(d["attention_bias"]),
        mlp_bias=False,
        sliding_window=int(window) if "sliding_attention" in types else None,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        layer_types=types,
        torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        query_pre_attn_scalar=float(d["query_pre_attn_scalar"]),
        rope_local_theta=local_theta,
        rope_local_scaling=local_scaling,
        final_logit_softcapping=_cap(d, "final_logit_softcapping"),
    )
