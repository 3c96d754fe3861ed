"""GGUF metadata -> a Hugging Face ``config.json`` dict, one function per architecture.

Reference: llama.cpp's reading of the same keys (``llama-model.cpp`` ``load_hparams``) and
what its ``convert_hf_to_gguf.py`` writes; the dict is what transformers' own config class of
the architecture would save, so the folder loads in both llmsh and transformers. What the GGUF
does not store, llama.cpp hard-codes, and so do we:

- ``gemma3``: every 6th layer is global, the others slide over ``attention.sliding_window``
  tokens (none: all global), the sliding layers' RoPE base is 10000 and is never scaled, the
  attention scale is ``key_length**-0.5`` (``(hidden/heads)**-0.5`` for the 62-layer 27B).
- ``llama`` with a ``rope_freqs`` tensor (Llama 3.x): the tensor holds the per-frequency
  divisors of llama3 RoPE scaling; we recover ``factor``, ``low_freq_factor``,
  ``high_freq_factor`` and ``original_max_position_embeddings`` and check that they give back
  every stored divisor (:func:`llama3_rope_scaling`), refusing the file otherwise.
- ``qwen2`` / ``qwen3``: no sliding window (llama.cpp applies none).

Entry point: :func:`hf_config`. Errors are :class:`~llmsh.errors.ConvertError`.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .errors import ConvertError

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_GEMMA3_PATTERN, _GEMMA3_LOCAL_THETA = 6, 10_000.0


def _f32(x) -> float:
    """GGUF stores float32: write its shortest repr (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


class _Meta:
    """``meta[f"{arch}.{key}"]`` with defaults, and a ConvertError naming a missing key."""

    def __init__(self, meta: dict, arch: str):
        self.meta, self.arch = meta, arch

    def __call__(self, key: str, default=None, required: bool = True):
        value = self.meta.get(f"{self.arch}.{key}", default)
        if value is None and required:
            raise ConvertError(f"GGUF metadata lacks {self.arch}.{key}")
        return value


def _has_biases(shapes: dict, prefix: str, block: str, projs: tuple) -> bool:
    """HF has one switch per block: all of its projections have biases, or none."""
    have = {p for p in projs if f"{prefix}.0.{block}.{p}.bias" in shapes}
    if have and have != set(projs):
        raise ConvertError(f"GGUF file has biases on only some {block} projections "
                           f"({', '.join(sorted(have))}); not supported")
    return bool(have)


def _vocab_size(meta: dict, get: _Meta, shapes: dict, embed: str) -> int:
    if embed in shapes:
        return int(shapes[embed][0])
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return int(get("vocab_size", len(tokens) or None))


def _common(meta: dict, get: _Meta, shapes: dict, torch_dtype: str) -> dict:
    """The keys every llama-like architecture shares (names as in transformers' LlamaConfig)."""
    hidden, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // n_head))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ConvertError(f"partial rotary embeddings (rope.dimension_count {rope_dim} != "
                           f"head_dim {head_dim}) are not supported")
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ConvertError(f"attention.value_length {value_dim} != key_length {head_dim} is not supported")
    return {
        "vocab_size": _vocab_size(meta, get, shapes, "model.embed_tokens.weight"),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": torch_dtype,
    }


def _linear_scaling(get: _Meta) -> dict | None:
    """``rope.scaling.type``: none, or linear (with ``rope.scaling.factor``); others refused."""
    scaling = get("rope.scaling.type", "none", required=False)
    if scaling in ("none", None):
        return None
    if scaling == "linear":
        factor = float(get("rope.scaling.factor"))
        return None if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    raise ConvertError(f"rope scaling {scaling!r} in GGUF file is not supported yet")


def llama3_rope_scaling(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """The llama3 ``rope_scaling`` dict whose per-frequency divisors are ``rope_freqs``.

    rope_freqs: (head_dim/2,) float32, the ``rope_freqs.weight`` tensor convert_hf_to_gguf.py
    writes for Llama 3.x (``LlamaModel.generate_extra_tensors``): frequency i is divided by it.
    Returns None when every divisor is 1. Only ``original_max_position_embeddings /
    (high_freq_factor - low_freq_factor)`` and ``low_freq_factor / (high − low)`` are fixed by
    the divisors, so ``low_freq_factor`` 1 and ``high_freq_factor`` 4 (every Llama 3.x) are
    tried first, then any pair that reproduces them. Raises ConvertError when no llama3
    parameters give back every divisor to float32 precision.
    """
    rf = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if rf.shape[0] != head_dim // 2:
        raise ConvertError(f"rope_freqs has {rf.shape[0]} entries, expected head_dim/2 = {head_dim // 2}")
    if np.allclose(rf, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(np.float32(rf.max()))
    wavelen = 2 * math.pi / theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    medium = (rf > 1 + 1e-6) & (rf < factor * (1 - 1e-6))
    smooth = (factor / rf[medium] - 1) / (factor - 1)      # 1/rf = (1 - s)/factor + s

    candidates = [(1.0, 4.0, 8192.0)]
    candidates += [(1.0, 4.0, w * (3 * s + 1)) for w, s in zip(wavelen[medium], smooth)]
    if medium.sum() >= 2:   # s = A/wavelen - B with A = old/(h - l), B = l/(h - l); take l = 1
        a, b = np.polyfit(1 / wavelen[medium], smooth, 1)
        if a > 0 and b < 0:
            candidates.append((1.0, 1.0 - 1.0 / b, -a / b))
    for low, high, old in candidates:
        if abs(old - round(old)) < 1e-3 * old:
            old = float(round(old))
        if np.allclose(_llama3_divisors(wavelen, factor, low, high, old), rf, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": int(old) if old == round(old) else old}
    raise ConvertError("rope_freqs tensor does not match llama3 rope scaling; not supported")


def _llama3_divisors(wavelen, factor, low, high, old) -> np.ndarray:
    """convert_hf_to_gguf.py's llama3 rope factors for these parameters."""
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


def _llama(meta, shapes, dtype, extra) -> dict:
    get = _Meta(meta, "llama")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           **_common(meta, get, shapes, dtype), "hidden_act": "silu",
           "attention_bias": _has_biases(shapes, "model.layers", "self_attn", _ATTN),
           "mlp_bias": _has_biases(shapes, "model.layers", "mlp", _MLP)}
    cfg["rope_scaling"] = _linear_scaling(get)
    if "rope_freqs" in extra:
        if cfg["rope_scaling"] is not None:
            raise ConvertError("GGUF file has both rope_freqs and rope.scaling.type linear; not supported")
        cfg["rope_scaling"] = llama3_rope_scaling(extra["rope_freqs"], cfg["rope_theta"], cfg["head_dim"])
    return cfg


def _qwen(arch: str):
    def build(meta, shapes, dtype, extra) -> dict:
        get = _Meta(meta, arch)
        n = int(get("block_count"))
        cfg = {"architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM"],
               "model_type": arch, **_common(meta, get, shapes, dtype), "hidden_act": "silu",
               "use_sliding_window": False, "sliding_window": None, "max_window_layers": n}
        cfg["rope_scaling"] = _linear_scaling(get)
        if arch == "qwen2":
            # transformers' Qwen2 always has q/k/v biases and none on o_proj or the MLP.
            if not all(f"model.layers.0.self_attn.{p}.bias" in shapes for p in _ATTN[:3]):
                raise ConvertError("qwen2 GGUF file lacks the q/k/v biases Qwen2 always has")
            if "model.layers.0.self_attn.o_proj.bias" in shapes:
                raise ConvertError("qwen2 GGUF file has an attn_output bias; not supported")
        else:
            cfg["attention_bias"] = _has_biases(shapes, "model.layers", "self_attn", _ATTN)
            if "model.layers.0.self_attn.q_norm.weight" not in shapes:
                raise ConvertError("qwen3 GGUF file lacks blk.0.attn_q_norm.weight")
        if _has_biases(shapes, "model.layers", "mlp", _MLP):
            raise ConvertError(f"{arch} GGUF file has MLP biases; not supported")
        return cfg
    return build


def _gemma3(meta, shapes, dtype, extra) -> dict:
    get = _Meta(meta, "gemma3")
    common = _common(meta, get, shapes, dtype)
    n, hidden, n_head = common["num_hidden_layers"], common["hidden_size"], common["num_attention_heads"]
    window = int(get("attention.sliding_window", 0, required=False) or 0)
    types = ["full_attention" if not window or (i + 1) % _GEMMA3_PATTERN == 0 else "sliding_attention"
             for i in range(n)]
    scaling = _linear_scaling(get)
    full = {"rope_type": "default", "rope_theta": common.pop("rope_theta")}
    if scaling:
        full.update(scaling)
    common.pop("rope_scaling")
    cap = get("final_logit_softcapping", None, required=False)
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **common,
        # llama.cpp: f_attention_scale = 1/sqrt(n_embd/n_head) for the 62-layer 27B, else 1/sqrt(head_dim)
        "query_pre_attn_scalar": hidden // n_head if n == 62 else common["head_dim"],
        "sliding_window": window or None,
        "layer_types": types,
        "rope_parameters": {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_THETA}},
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": _has_biases(shapes, "model.layers", "self_attn", _ATTN),
        "final_logit_softcapping": _f32(cap) if cap else None,
        "attn_logit_softcapping": None,
    }


def _gpt2(meta, shapes, dtype, extra) -> dict:
    get = _Meta(meta, "gpt2")
    hidden = int(get("embedding_length"))
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": _vocab_size(meta, get, shapes, "transformer.wte.weight"),
        "n_embd": hidden,
        "n_layer": int(get("block_count")),
        "n_head": int(get("attention.head_count")),
        "n_inner": int(get("feed_forward_length", 4 * hidden)),
        "n_positions": int(get("context_length")),
        "layer_norm_epsilon": _f32(get("attention.layer_norm_epsilon", 1e-5)),
        "activation_function": "gelu_new",
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": dtype,
    }


#: GGUF ``general.architecture`` -> builder(meta, hf shapes, torch_dtype, extra tensors) -> config dict
BUILDERS: dict[str, Callable[[dict, dict, str, dict], dict]] = {
    "llama": _llama, "qwen2": _qwen("qwen2"), "qwen3": _qwen("qwen3"), "gemma3": _gemma3, "gpt2": _gpt2,
}
SUPPORTED_ARCHS = tuple(BUILDERS)


def check_arch(meta: dict) -> str:
    """``general.architecture`` of the file; ConvertError listing the supported ones otherwise."""
    arch = meta.get("general.architecture")
    if arch not in BUILDERS:
        raise ConvertError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    return arch


def hf_config(meta: dict, shapes: dict, torch_dtype: str, extra: dict | None = None) -> dict:
    """The config.json dict for a GGUF file.

    meta: the file's metadata (key -> value); shapes: Hugging Face tensor name -> shape of the
    tensors the folder will hold (biases, ``lm_head.weight`` and q/k norms are read from it);
    torch_dtype: the dtype name written; extra: tensors that are configuration, not weights
    (``{"rope_freqs": ndarray}``). Raises ConvertError for an unsupported architecture (the
    supported ones are listed), a missing metadata key (named), or an unsupported variant.
    """
    return BUILDERS[check_arch(meta)](meta, shapes, torch_dtype, extra or {})
