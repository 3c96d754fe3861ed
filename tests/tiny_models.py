"""Tiny random transformers models of every supported architecture, saved as real folders.

Shared by the model, weights, generation and loader tests. Each model is built by
transformers with a fixed seed, its parameters are re-drawn with a larger spread than
transformers' init (so biases are non-zero, norms are not all ones and logits are far from
uniform, which makes an implementation mistake visible well above the 1e-4 tolerance), and
it is written with ``save_pretrained(..., safe_serialization=True)``.

Usage::

    path, hf_model = make_tiny_model("mistral", tmp_path)          # one model.safetensors
    path, hf_model = make_tiny_model("llama", tmp_path, shard=True)  # sharded + index.json
    path, hf_model = make_tiny_model("llama", tmp_path, num_hidden_layers=3)  # config override

``hf_model`` is the transformers model in float32 eval mode (eager attention), the reference
our Decoder must match. transformers is a test-only dependency.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Base shape shared by the llama family: 4 query heads over 2 KV heads (GQA), head_dim 16.
_LLAMA_BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

_GEMMA3_BASE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
    rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=8, sliding_window_pattern=2,
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
)

# name -> (model_type, config kwargs). Names are what tests parametrize over.
SPECS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_LLAMA_BASE, tie_word_embeddings=False)),
    # head_dim given and different from hidden/heads; all biases on; tied lm_head.
    "llama_bias_tied": (
        "llama",
        dict(_LLAMA_BASE, head_dim=24, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
             num_hidden_layers=3),
    ),
    # llama3 scaling: wavelengths between 16 and 64 positions are smoothed (head_dim 16, theta
    # 5e5 puts one at 32.5), longer ones divided by factor.
    "llama3_rope": (
        "llama",
        dict(_LLAMA_BASE, rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=64),
             rope_theta=500000.0),
    ),
    "llama_linear_rope": (
        "llama", dict(_LLAMA_BASE, rope_scaling=dict(rope_type="linear", factor=2.0), rope_theta=10000.0)
    ),
    # sliding_window 8: positions more than 7 back are masked, visible within a 40-token test.
    "mistral": ("mistral", dict(_LLAMA_BASE, sliding_window=8, num_hidden_layers=3, eos_token_id=2)),
    "qwen2": ("qwen2", dict(_LLAMA_BASE, tie_word_embeddings=True, bos_token_id=None)),
    # Qwen2 slides only on layers >= max_window_layers.
    "qwen2_sliding": (
        "qwen2",
        dict(_LLAMA_BASE, use_sliding_window=True, sliding_window=8, max_window_layers=1,
             num_hidden_layers=3, tie_word_embeddings=False),
    ),
    # head_dim 24 != hidden/heads; q_norm / k_norm.
    "qwen3": ("qwen3", dict(_LLAMA_BASE, head_dim=24, tie_word_embeddings=False)),
    # Sliding on layers >= max_window_layers, with all four attention biases, tied.
    "qwen3_sliding": (
        "qwen3",
        dict(_LLAMA_BASE, use_sliding_window=True, sliding_window=8, max_window_layers=1,
             num_hidden_layers=3, attention_bias=True, tie_word_embeddings=True),
    ),
    # Every second layer global (sliding_window_pattern 2), 8-token windows, head_dim 32 and an
    # attention scale from query_pre_attn_scalar 24 (neither hidden/heads = 16), a local RoPE base
    # different from the global one, linear scaling on the global layers only.
    "gemma3": ("gemma3_text", dict(_GEMMA3_BASE)),
    # Gemma 2's soft-caps (Gemma 3 sets none): transformers' Gemma 3 caps the logits and ignores
    # attn_logit_softcapping; we must do the same.
    "gemma3_softcap": ("gemma3_text", dict(_GEMMA3_BASE, num_hidden_layers=2,
                                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gpt2": (
        "gpt2",
        dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=None,
             bos_token_id=0, eos_token_id=0, tie_word_embeddings=True),
    ),
}

ARCHS: list[str] = list(SPECS)


def _hf_classes(model_type: str):
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
    }[model_type]


def _perturb(model: torch.nn.Module, std: float) -> None:
    """Re-draw every parameter: norm scales around 1 (Gemma's (1 + weight): weights around 0),
    everything else N(0, std), biases included."""
    one = 0.0 if "gemma" in model.config.model_type else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("weight"):
                    p.normal_(one, 0.2)
                else:
                    p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, std)


def build_tiny_hf_model(arch: str, *, seed: int = 0, std: float = 0.1, **overrides):
    """Build the transformers model for ``arch`` (a key of SPECS) in float32 eval mode."""
    model_type, kwargs = SPECS[arch]
    config_cls, model_cls = _hf_classes(model_type)
    kwargs = dict(kwargs, **overrides)
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32).eval()
    _perturb(model, std)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def make_tiny_model(arch: str, tmp_path, *, shard: bool = False, seed: int = 0, std: float = 0.1,
                    **overrides) -> tuple[Path, torch.nn.Module]:
    """Save a tiny random ``arch`` model under ``tmp_path/arch`` and return (folder, hf_model).

    ``shard=True`` writes ``model-0000N-of-0000M.safetensors`` plus
    ``model.safetensors.index.json``. ``overrides`` are transformers config kwargs.
    The folder holds config.json, the safetensors file(s) and generation_config.json
    (no tokenizer: tests feed token ids directly).
    """
    model = build_tiny_hf_model(arch, seed=seed, std=std, **overrides)
    path = Path(tmp_path) / (arch + ("_sharded" if shard else ""))
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": "40KB"} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path, model


def random_tokens(vocab_size: int, length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """(batch, length) int64 token ids drawn with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def our_decoder(hf_model, path):
    """Our Decoder with the transformers model's weights (float32, CPU)."""
    from llmsh.config import ModelConfig
    from llmsh.models import Decoder

    cfg = ModelConfig.from_file(path)
    dec = Decoder(cfg)
    sd = dict(hf_model.state_dict())
    if cfg.model_type == "gpt2":  # HF stores gpt2's projections as Conv1D (in, out)
        sd = {k: v.t() if k.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")) else v
              for k, v in sd.items()}
    dec.load_state_dict(sd, strict=False)
    dec.tie_weights()
    return dec.eval()
