"""Tiny GGUF files of every supported architecture, written from a transformers model with
gguf.GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes them.

The tensor names and layout changes are spelled out here, independently of llmsh.gguf_tensors
(which inverts them): llama's q/k rows permuted into interleaved rotary pairs
(``LlamaModel.permute``), Gemma's norms stored plus one (``Gemma3Model.norm_shift``), GPT-2's
Conv1D weights transposed to (out, in); qwen2/qwen3 unchanged. 2-D weights may be quantized
with gguf.quants.quantize (one type per tensor, cycling through ``quant``); 1-D tensors stay F32.

:func:`round_trip_reference` gives the transformers model whose weights are the ones the file
holds after quantization (dequantized with gguf), which is what a correct conversion runs.
"""

from __future__ import annotations

import json

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as QT

_LLAMA_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
_GEMMA_LAYER = {**_LLAMA_LAYER, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_GPT2_LAYER = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
               "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
        "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "gpt2": "gpt2"}
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def gguf_name(model_type: str, key: str) -> str | None:
    """HF key -> GGUF tensor name (None: a buffer the converter drops)."""
    if key.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    stem, suffix = key.rsplit(".", 1)
    parts = stem.split(".")
    if parts[0] in ("model", "transformer") and parts[1] in ("layers", "h"):
        table = {"gemma3_text": _GEMMA_LAYER, "gpt2": _GPT2_LAYER}.get(model_type, _LLAMA_LAYER)
        return f"blk.{parts[2]}.{table['.'.join(parts[3:])]}.{suffix}"
    return f"{_TOP[stem]}.{suffix}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF halves -> interleaved rotary pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(theta: float, head_dim: int, factor: float, low: float, high: float, old: int):
    """convert_hf_to_gguf.py's rope_freqs tensor for llama3 RoPE scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * np.pi / (1.0 / theta ** (i / head_dim))
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            s = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def gguf_arrays(hf_model) -> dict[str, np.ndarray]:
    """{GGUF name: float32 array in GGUF layout} for ``hf_model`` (tied lm_head left out)."""
    cfg, mt = hf_model.config, hf_model.config.model_type
    out = {}
    for key, t in hf_model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(mt, key)
        if name is None:
            continue
        a = t.detach().float().numpy()
        if mt == "llama" and ".attn_q." in name:
            a = permute(a, cfg.num_attention_heads)
        elif mt == "llama" and ".attn_k." in name:
            a = permute(a, cfg.num_key_value_heads)
        elif mt == "gemma3_text" and name.endswith("norm.weight"):
            a = a + np.float32(1)
        elif mt == "gpt2" and key.endswith(CONV1D):
            a = a.T
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def quant_plan(arrays: dict, quant) -> dict[str, QT]:
    """Each tensor's GGUF type: 1-D F32; 2-D cycling through ``quant`` (a type or a list)."""
    types = list(quant) if isinstance(quant, (list, tuple)) else [quant]
    plan, i = {}, 0
    for name in sorted(arrays):
        if arrays[name].ndim == 2:
            plan[name] = types[i % len(types)]
            i += 1
        else:
            plan[name] = QT.F32
    return plan


def _stored(a: np.ndarray, qt: QT) -> np.ndarray:
    """What the file holds for ``a`` as type ``qt``: the quantized blocks, or F32 / F16 values."""
    if qt == QT.F32:
        return a
    if qt == QT.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qt)


def write_gguf(path, hf_model, tok, *, quant=QT.F32, pre="smollm", extra_meta=None, extra=None,
               specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
    """Write ``hf_model`` (any supported transformers architecture) and the byte-level BPE
    ``tok`` as a GGUF file at ``path``; returns path. extra: {gguf_name: ndarray} added as is."""
    cfg, mt = hf_model.config, hf_model.config.model_type
    arch = GGUF_ARCH[mt]
    w = gguf.GGUFWriter(str(path), arch)
    if mt == "gpt2":
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        rp = cfg.rope_parameters
        full = rp["full_attention"] if mt == "gemma3_text" else rp
        w.add_rope_freq_base(float(full["rope_theta"]))
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(full["factor"]))
        if mt != "gemma3_text":
            w.add_rope_dimension_count(head_dim)
        else:
            w.add_sliding_window(cfg.sliding_window)
    for key, value in (extra_meta or {}).items():
        w.add_key_value(key, value[0], value[1])
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    arrays = gguf_arrays(hf_model)
    types = quant_plan(arrays, quant)
    arrays.update(extra or {})
    for name, a in arrays.items():
        qt = types.get(name, QT.F32)
        if qt in (QT.F32, QT.F16) or a.dtype != np.float32:
            w.add_tensor(name, _stored(a, qt) if a.dtype == np.float32 else a)
        else:
            w.add_tensor(name, _stored(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def round_trip_reference(hf_model, quant):
    """``hf_model`` with each weight replaced by what the GGUF file of :func:`write_gguf`
    (same ``quant``) holds, dequantized by gguf: the model a correct conversion reproduces.

    Quantization is per row of the GGUF layout, so llama's row permutation commutes with it and
    GPT-2's Conv1D weights are quantized transposed, as in the file."""
    from gguf.quants import dequantize

    mt = hf_model.config.model_type
    arrays = gguf_arrays(hf_model)
    types = quant_plan(arrays, quant)
    sd = hf_model.state_dict()
    new = {}
    for key, t in sd.items():
        name = gguf_name(mt, key)
        if name is None or name not in types or types[name] == QT.F32:
            continue
        a = t.detach().float().numpy()
        a = a.T if mt == "gpt2" and key.endswith(CONV1D) else a
        back = dequantize(_stored(np.ascontiguousarray(a), types[name]), types[name]).reshape(a.shape)
        back = back.T if mt == "gpt2" and key.endswith(CONV1D) else back
        new[key] = torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))
    ref = type(hf_model)(hf_model.config).eval()
    tied = hf_model.config.tie_word_embeddings
    # tied: lm_head.weight is the embedding's Parameter; loading the old one would overwrite it
    ref.load_state_dict({k: v for k, v in {**sd, **new}.items() if not (tied and k == "lm_head.weight")},
                        strict=not tied)
    if hf_model.config.tie_word_embeddings:
        ref.tie_weights()
    return ref
