"""ModelConfig: both config.json generations, defaults, and errors that name the culprit."""

import json

import pytest

from llmsh.config import ModelConfig
from llmsh.errors import ConfigError, LlmshError

LLAMA = dict(model_type="llama", vocab_size=320, hidden_size=64, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


def _hf_rope(d):
    """(rope_theta, rope scaling) as transformers (5.x) reads the same dict."""
    from transformers import AutoConfig

    params = dict(AutoConfig.for_model(**d).rope_parameters)
    theta = params.pop("rope_theta")
    params.pop("type", None)
    return theta, (None if params["rope_type"] == "default" else params)


@pytest.mark.parametrize("scaling", [
    None,
    {"type": "default"},
    {"type": "linear", "factor": 2.0},
    {"rope_type": "linear", "factor": 4.0},
    {"type": "llama3", **LLAMA3},
    {"rope_type": "llama3", **LLAMA3},
])
def test_transformers4_rope_format_matches_transformers(scaling):
    d = dict(LLAMA, rope_theta=50000.0, rope_scaling=scaling)
    c = ModelConfig.from_dict(d)
    theta, hf_scaling = _hf_rope(d)
    assert c.rope_theta == theta == 50000.0
    assert c.rope_scaling == hf_scaling
    if hf_scaling is not None:
        assert c.rope_scaling["rope_type"] in ("linear", "llama3")


def test_transformers5_rope_format_equals_4x_format():
    v4 = dict(LLAMA, rope_theta=500000.0, rope_scaling={"type": "llama3", **LLAMA3})
    v5 = dict(LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3})
    assert ModelConfig.from_dict(v4) == ModelConfig.from_dict(v5)
    plain5 = ModelConfig.from_dict(dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert plain5.rope_theta == 1e6 and plain5.rope_scaling is None
    assert ModelConfig.from_dict(LLAMA).rope_theta == 10000.0


def test_saved_by_transformers(tmp_path):
    from tiny_models import make_tiny_model

    path, hf = make_tiny_model("llama3_rope", tmp_path)
    c = ModelConfig.from_file(path)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert (c.num_key_value_heads, c.head_dim, c.tie_word_embeddings) == (2, 16, False)
    assert ModelConfig.from_file(path / "config.json") == c


def test_defaults_and_head_dim():
    c = ModelConfig.from_dict(LLAMA)
    assert c.num_key_value_heads == 4 and c.head_dim == 16
    assert c.sliding_window is None and c.hidden_act == "silu" and not c.tie_word_embeddings
    assert ModelConfig.from_dict(dict(LLAMA, head_dim=32, num_key_value_heads=1)).head_dim == 32
    assert ModelConfig.from_dict(dict(LLAMA, head_dim=None)).head_dim == 16


def test_unknown_keys_ignored_and_no_chat_template_needed():
    c = ModelConfig.from_dict(dict(LLAMA, some_future_key={"x": 1}, chat_template="{{ x }}",
                                   architectures=["LlamaForCausalLM"]))
    assert c == ModelConfig.from_dict(LLAMA)


def test_missing_key_is_named():
    d = dict(LLAMA)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict(d)
    del d["vocab_size"]
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    assert "hidden_size" in str(e.value) and "vocab_size" in str(e.value)
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_dict({k: v for k, v in LLAMA.items() if k != "model_type"})
    gpt2 = dict(model_type="gpt2", vocab_size=300, n_embd=64, n_layer=2, n_positions=128)
    with pytest.raises(ConfigError, match="n_head"):
        ModelConfig.from_dict(gpt2)


def test_unsupported_model_type_is_named():
    with pytest.raises(ConfigError, match="falcon") as e:
        ModelConfig.from_dict(dict(LLAMA, model_type="falcon"))
    assert isinstance(e.value, LlmshError) and "\n" not in str(e.value)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_dict(dict(LLAMA, rope_scaling={"type": "yarn", "factor": 4.0}))
    with pytest.raises(ConfigError, match="low_freq_factor"):
        ModelConfig.from_dict(dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64}))


def test_gpt2_fields():
    c = ModelConfig.from_dict(dict(model_type="gpt2", vocab_size=300, n_embd=64, n_layer=2, n_head=4,
                                   n_positions=128, n_inner=None, layer_norm_epsilon=1e-5,
                                   activation_function="gelu_new"))
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (64, 2, 4)
    assert (c.intermediate_size, c.head_dim, c.max_position_embeddings) == (256, 16, 128)
    assert c.tie_word_embeddings and c.hidden_act == "gelu_new" and c.rms_norm_eps == 1e-5


def test_sliding_window_rules():
    m = ModelConfig.from_dict(dict(LLAMA, model_type="mistral", sliding_window=8))
    assert m.sliding_window == 8 and m.layer_types == ("sliding_attention",) * 2
    assert ModelConfig.from_dict(dict(LLAMA, model_type="mistral", sliding_window=None)).sliding_window is None
    q = dict(LLAMA, model_type="qwen2", sliding_window=8, num_hidden_layers=3, max_window_layers=1)
    assert ModelConfig.from_dict(q).sliding_window is None  # only with use_sliding_window
    qs = ModelConfig.from_dict(dict(q, use_sliding_window=True))
    assert qs.sliding_window == 8
    assert qs.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    assert ModelConfig.from_dict(q).attention_bias  # qwen2 always has q/k/v biases
    assert ModelConfig.from_dict(dict(LLAMA, sliding_window=8)).sliding_window is None


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA, model_type="mamba")))
    with pytest.raises(ConfigError, match="mamba") as e:
        ModelConfig.from_file(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("num_attention_heads", 0), ("max_position_embeddings", -5), ("vocab_size", 0),
    ("hidden_size", -64), ("num_hidden_layers", 0), ("intermediate_size", 0),
    ("num_key_value_heads", 0), ("head_dim", 0), ("hidden_size", 64.5), ("num_hidden_layers", True),
    ("rope_theta", 0), ("rope_theta", -1.0), ("rms_norm_eps", 0), ("rms_norm_eps", -1e-6),
])
def test_bad_numbers_are_named(key, value):
    with pytest.raises(ConfigError, match=key) as e:
        ModelConfig.from_dict(dict(LLAMA, **{key: value}))
    assert repr(value) in str(e.value)


def test_bad_numbers_gpt2_and_from_file(tmp_path):
    gpt2 = dict(model_type="gpt2", vocab_size=50, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    ModelConfig.from_dict(gpt2)
    with pytest.raises(ConfigError, match="n_head"):
        ModelConfig.from_dict(dict(gpt2, n_head=0))
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig.from_dict(dict(gpt2, n_head=3))
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA, num_attention_heads=0)))
    with pytest.raises(ConfigError, match="num_attention_heads must be a positive integer, got 0"):
        ModelConfig.from_file(tmp_path)


def test_head_divisibility():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig.from_dict(dict(LLAMA, num_key_value_heads=3))
    with pytest.raises(ConfigError, match="hidden_size .* divisible"):
        ModelConfig.from_dict(dict(LLAMA, num_attention_heads=3, num_key_value_heads=1))
    # An explicit head_dim lifts the hidden_size rule (as Qwen3 / Gemma configs do).
    c = ModelConfig.from_dict(dict(LLAMA, num_attention_heads=3, num_key_value_heads=1, head_dim=16))
    assert c.head_dim == 16
    assert ModelConfig.from_dict(dict(LLAMA, hidden_size=64.0)).hidden_size == 64
