"""llmsh.gguf_tensors against gguf.quants on tensors quantized in the test."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from llmsh import gguf_tensors as gt
from llmsh.errors import ConvertError


def _tensor(kind: str, n: int = 8, k: int = 64, seed: int = 0, name: str = "blk.0.ffn_up.weight"):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    qt = GGMLQuantizationType[kind]
    return SimpleNamespace(name=name, tensor_type=qt, data=quantize(w, qt), shape=np.array([k, n]))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_int4_rows_reproduce_gguf_dequantize(kind):
    from gguf.quants import dequantize

    t = _tensor(kind)
    d = gt.int4_rows(t, 0, 8)
    q = np.stack([d["qweight"] & 15, d["qweight"] >> 4], -1).reshape(8, -1).astype(np.float32)
    w = ((q.reshape(8, -1, 32) - 8) * d["scales"][..., None] + d["zeros"][..., None]).reshape(8, -1)
    ref = dequantize(t.data, t.tensor_type).reshape(8, 64)
    assert np.abs(w - ref).max() <= 1e-6 * np.abs(ref).max()
    assert gt.native_kind(t, "model.layers.0.mlp.up_proj.weight") == "int4"


def test_q8_0_with_unequal_block_scales_is_widened():
    t = _tensor("Q8_0")
    assert not gt.int8_exact(t)
    assert gt.native_kind(t, "model.layers.0.mlp.up_proj.weight") == "bfloat16"


def test_names_per_architecture():
    assert gt.hf_name("gemma3", "blk.3.post_ffw_norm.weight") == "model.layers.3.post_feedforward_layernorm.weight"
    assert gt.hf_name("gemma3", "blk.3.ffn_norm.weight") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert gt.hf_name("qwen2", "blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert gt.hf_name("gpt2", "blk.1.attn_qkv.weight") == "transformer.h.1.attn.c_attn.weight"
    with pytest.raises(ConvertError, match="blk.0.nope"):
        gt.hf_name("llama", "blk.0.nope.weight")


def test_unsupported_type_names_tensor_and_type():
    from gguf import GGMLQuantizationType

    t = SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=GGMLQuantizationType.Q2_K)
    with pytest.raises(ConvertError, match=r"blk\.0\.attn_q\.weight.*Q2_K"):
        gt.check_type(t)
