"""The model's shape and hyper-parameters, read from a Hugging Face ``config.json``.

One frozen dataclass for every supported architecture (llama, mistral, qwen2, qwen3, gemma3,
gpt2), using the Hugging Face field names. Both generations of the format are accepted: transformers 4.x writes
``rope_theta`` and ``rope_scaling`` (keyed by ``type`` or ``rope_type``) at the top level;
transformers 5.x writes one ``rope_parameters`` object. Unknown keys are ignored. Defaults for
absent keys are those of the matching transformers config class (e.g. ``LlamaConfig``),
because ``save_pretrained`` may leave keys out when they equal those defaults.

The chat template is not part of the config; see :mod:`llmsh.tokenizer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .models import SUPPORTED_MODEL_TYPES  # the family table (imports no torch)

# Rope scaling types we implement, with the keys each one needs.
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_ACTIVATIONS = ("silu", "swish", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, as in transformers' ``LlamaConfig`` / ``GPT2Config``.

    Fields beyond docs/design.md: ``layer_types`` gives each layer's attention kind,
    ``"full_attention"`` or ``"sliding_attention"`` (transformers' names): every layer of a
    mistral with a ``sliding_window``, and qwen2's layers ``>= max_window_layers`` when
    ``use_sliding_window`` is set (qwen3 likewise), gemma3's by its layer pattern.
    ``torch_dtype`` is the checkpoint's dtype name, if stated. The fields after ``layer_types``
    are gemma3's (None elsewhere): ``query_pre_attn_scalar`` (attention scale
    query_pre_attn_scalar**-0.5 instead of head_dim**-0.5), the RoPE base and scaling of sliding
    layers (``rope_local_theta``, 4.x ``rope_local_base_freq``), and tanh soft-capping of the
    final logits (cap * tanh(logits / cap)). Parsed in :mod:`llmsh.config_gemma3`.
    """

    model_type: str                 # a key of llmsh.models.FAMILIES
    vocab_size: int
    hidden_size: int                # gpt2: n_embd
    num_hidden_layers: int          # gpt2: n_layer
    num_attention_heads: int        # gpt2: n_head
    num_key_value_heads: int        # default num_attention_heads
    intermediate_size: int          # gpt2: n_inner or 4*hidden
    head_dim: int                   # default hidden_size // num_attention_heads
    max_position_embeddings: int    # gpt2: n_positions
    rms_norm_eps: float             # gpt2: layer_norm_epsilon
    rope_theta: float               # 4.x top-level rope_theta or 5.x rope_parameters["rope_theta"]
    rope_scaling: dict | None       # normalised: always has "rope_type" ("default" -> None)
    hidden_act: str                 # "silu" / "gelu_new"
    tie_word_embeddings: bool
    attention_bias: bool            # qwen2: q/k/v biases are True, o_proj False
    mlp_bias: bool
    sliding_window: int | None      # mistral / qwen2 (qwen2 only when use_sliding_window)
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    layer_types: tuple[str, ...] = ()
    torch_dtype: str | None = None
    query_pre_attn_scalar: float | None = None
    rope_local_theta: float | None = None      # None: sliding layers use rope_theta/rope_scaling
    rope_local_scaling: dict | None = None
    final_logit_softcapping: float | None = None

    @property
    def is_gpt2(self) -> bool:
        return self.model_type == "gpt2"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a parsed config.json dict.

        Raises:
            ConfigError: ``model_type`` is missing or unsupported, a required key is missing
                (all missing keys are named), a value has the wrong type, or the rope scaling
                type is one we do not implement.
        """
        if not isinstance(d, dict):
            raise ConfigError("config.json: expected a JSON object at the top level")
        mt = d.get("model_type")
        if mt is None:
            raise ConfigError("config.json: missing required key 'model_type'")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"config.json: unsupported model_type {mt!r} "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        try:
            if mt.startswith("gemma3"):
                from .config_gemma3 import from_gemma3

                return from_gemma3(d, mt)
            _check_numbers(d, mt, head_dim_default=mt == "qwen3")
            return _from_gpt2(d) if mt == "gpt2" else _from_llama(d, mt)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json: bad value ({e})") from None

    @classmethod
    def from_file(cls, path) -> "ModelConfig":
        """Read ``path`` (a model folder, or the config.json file itself).

        Raises:
            ConfigError: the file is missing, unreadable, not JSON, or invalid (see from_dict).
        """
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"{p}: config.json not found")
        d = read_json_object(p, ConfigError)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            msg = str(e).removeprefix("config.json: ")
            raise ConfigError(f"{p}: {msg}") from None


def read_json_object(path, error: type[Exception]) -> dict:
    """The JSON object in ``path`` (a model folder's config.json, tokenizer_config.json, …);
    ``{}`` when the file does not exist.

    Raises:
        ``error`` (an LlmshError subclass), naming the file, when it cannot be read, is not
        valid JSON, or holds something other than a JSON object.
    """
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{p}: not valid JSON (expected an object)")
    return data


def _require(d: dict, *names: tuple[str, ...]) -> list[Any]:
    """Values of the required keys; each entry lists accepted aliases. Names all missing ones."""
    missing, values = [], []
    for aliases in names:
        key = next((a for a in aliases if d.get(a) is not None), None)
        if key is None:
            missing.append(aliases[0])
            values.append(None)
        else:
            values.append(d[key])
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise ConfigError(f"config.json: missing required key{plural} "
                          + ", ".join(repr(m) for m in missing))
    return values


# Keys that must be positive integers when present (each entry: accepted aliases).
_POSITIVE_INTS = (("vocab_size",), ("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"),
                  ("num_attention_heads", "n_head"), ("num_key_value_heads",),
                  ("intermediate_size", "n_inner"), ("head_dim",),
                  ("max_position_embeddings", "n_positions"))


def _check_numbers(d: dict, mt: str, head_dim_default: bool = False) -> None:
    """Reject sizes that would only fail later inside torch (a zero head count divides by zero, a
    negative context builds an empty RoPE table): positive integers, heads divisible by KV heads,
    hidden_size divisible by heads when head_dim is implied (not when the architecture has a
    fixed default head_dim, ``head_dim_default``), positive rope_theta and epsilon.

    Raises:
        ConfigError: naming the key and its value.
    """
    for aliases in _POSITIVE_INTS:
        for key in aliases:
            v = d.get(key)
            if v is None:
                continue
            ok = not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))
            if not ok or v <= 0:
                raise ConfigError(f"config.json: {key} must be a positive integer, got {v!r}")
    heads = _get(d, "num_attention_heads", d.get("n_head"))
    kv = d.get("num_key_value_heads") if mt != "gpt2" else None
    if heads is not None and kv is not None and int(heads) % int(kv):
        raise ConfigError(f"config.json: num_attention_heads ({heads}) must be divisible by "
                          f"num_key_value_heads ({kv})")
    hidden = _get(d, "hidden_size", d.get("n_embd"))
    implied = mt == "gpt2" or (d.get("head_dim") is None and not head_dim_default)
    if heads is not None and hidden is not None and implied \
            and int(hidden) % int(heads):
        raise ConfigError(f"config.json: hidden_size ({hidden}) must be divisible by "
                          f"num_attention_heads ({heads}) when head_dim is not given")
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    for key, v in (("rope_theta", _get(params, "rope_theta", d.get("rope_theta"))),
                   ("rope_local_base_freq", d.get("rope_local_base_freq")),
                   ("rms_norm_eps", d.get("rms_norm_eps")),
                   ("layer_norm_epsilon", d.get("layer_norm_epsilon"))):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
            raise ConfigError(f"config.json: {key} must be a positive number, got {v!r}")


def _get(d: dict, key: str, default):
    v = d.get(key)
    return default if v is None else v


def _rope(d: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(rope_theta, normalised rope_scaling) from either config generation."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type parameters (transformers 5.x for mixed models): use full attention's.
        params = params.get("full_attention") or next(iter(params.values()))
    if isinstance(params, dict):                                        # transformers 5.x
        theta = _get(params, "rope_theta", _get(d, "rope_theta", default_theta))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:                                                               # transformers 4.x
        theta = _get(d, "rope_theta", default_theta)
        scaling = dict(d.get("rope_scaling") or {})
    return float(theta), rope_scaling_of(scaling)


def rope_scaling_of(scaling: dict) -> dict | None:
    """``scaling`` (keyed by ``rope_type`` or 4.x ``type``) normalised to {"rope_type": ..., ...},
    None for the default (unscaled) RoPE.

    Raises:
        ConfigError: a rope type we do not implement, or one of its keys missing.
    """
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "default":
        return None
    if rope_type not in _ROPE_KEYS:
        raise ConfigError(f"config.json: unsupported rope scaling type {rope_type!r} "
                          f"(supported: default, {', '.join(_ROPE_KEYS)})")
    missing = [k for k in _ROPE_KEYS[rope_type] if scaling.get(k) is None]
    if missing:
        raise ConfigError(f"config.json: rope scaling {rope_type!r} is missing "
                          + ", ".join(repr(m) for m in missing))
    return {"rope_type": rope_type, **scaling}


def check_act(act: str) -> str:
    if act not in _ACTIVATIONS:
        raise ConfigError(f"config.json: unsupported activation {act!r}")
    return act


def _from_llama(d: dict, mt: str) -> ModelConfig:
    vocab, hidden, layers, heads, inter, max_pos = _require(
        d, ("vocab_size",), ("hidden_size",), ("num_hidden_layers",), ("num_attention_heads",),
        ("intermediate_size",), ("max_position_embeddings",))
    theta, scaling = _rope(d)
    window = d.get("sliding_window")
    if mt == "llama" or (mt in ("qwen2", "qwen3") and not d.get("use_sliding_window", False)):
        window = None
    n = int(layers)
    if window is None:
        types = ("full_attention",) * n
    elif mt in ("qwen2", "qwen3"):
        given = d.get("layer_types")
        if isinstance(given, list) and len(given) == n:
            types = tuple(given)
        else:
            first = _get(d, "max_window_layers", 28)
            types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))
    else:  # mistral slides on every layer (transformers ignores layer_types for it)
        types = ("sliding_attention",) * n
    # transformers hard-codes biases for two: qwen2 always has q/k/v biases, mistral none.
    attn_bias = {"qwen2": True, "mistral": False}.get(mt, bool(_get(d, "attention_bias", False)))
    # Qwen3Config's head_dim defaults to 128, not hidden_size // heads.
    head_dim = _get(d, "head_dim", 128 if mt == "qwen3" else int(hidden) // int(heads))
    mlp_bias = bool(_get(d, "mlp_bias", False)) if mt == "llama" else False
    return ModelConfig(
        model_type=mt,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        num_hidden_layers=n,
        num_attention_heads=int(heads),
        num_key_value_heads=int(_get(d, "num_key_value_heads", heads)),
        intermediate_size=int(inter),
        head_dim=int(head_dim),
        max_position_embeddings=int(max_pos),
        rms_norm_eps=float(_get(d, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        hidden_act=check_act(_get(d, "hidden_act", "silu")),
        tie_word_embeddings=bool(_get(d, "tie_word_embeddings", False)),
        attention_bias=attn_bias,
        mlp_bias=mlp_bias,
        sliding_window=None if window is None else int(window),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        layer_types=types,
        torch_dtype=d.get("torch_dtype") or d.get("dtype"),
    )


def _from_gpt2(d: dict) -> ModelConfig:
    vocab, hidden, layers, heads, max_pos = _require(
        d, ("vocab_size",), ("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"),
        ("n_head", "num_attention_heads"), ("n_positions", "max_position_embeddings"))
    if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
        raise ConfigError("config.json: gpt2 options scale_attn_by_inverse_layer_idx / "
                          "reorder_and_upcast_attn are not supported")
    if d.get("scale_attn_weights", True) is False:
        raise ConfigError("config.json: gpt2 option scale_attn_weights=false is not supported")
    hidden, heads = int(hidden), int(heads)
    return ModelConfig(
        model_type="gpt2",
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_hidden_layers=int(layers),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=int(_get(d, "n_inner", 4 * hidden)),
        head_dim=hidden // heads,
        max_position_embeddings=int(max_pos),
        rms_norm_eps=float(_get(d, "layer_norm_epsilon", 1e-5)),
        rope_theta=10000.0,
        rope_scaling=None,
        hidden_act=check_act(_get(d, "activation_function", "gelu_new")),
        tie_word_embeddings=bool(_get(d, "tie_word_embeddings", True)),
        attention_bias=True,
        mlp_bias=True,
        sliding_window=None,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        layer_types=("full_attention",) * int(layers),
        torch_dtype=d.get("torch_dtype") or d.get("dtype"),
    )
