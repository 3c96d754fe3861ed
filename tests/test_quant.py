"""Weight-only quantization (llmsh.quant): torch's int8/int4 CPU kernels against a reference
dequantized matmul, and quantized tiny models against float decoders holding the dequantized
weights (the reference for what a quantized model should compute) and against transformers."""

import pytest
import torch

from llmsh import quant
from llmsh.config import ModelConfig
from llmsh.weights import load_decoder
from tiny_models import make_tiny_model, random_tokens


def test_int4_is_exact_on_a_q4_1_grid():
    # llama.cpp's Q4_1 stores blocks of 32 as min + d * q, q in 0..15 with both ends used; our
    # groups of 32 must recover such weights exactly (the default model's layers are Q4_1).
    g = torch.Generator().manual_seed(2)
    d = torch.rand(48, 4, 1, generator=g) * 0.01 + 1e-3
    m = torch.randn(48, 4, 1, generator=g) * 0.05
    q = torch.randint(0, 16, (48, 4, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    w = (m + d * q).reshape(48, 128)
    qq, sz = quant.quantize_int4(w)
    assert torch.allclose(quant.dequantize_int4(qq, sz), w, rtol=0, atol=1e-6)


def test_int8_kernel_matches_dequantized_matmul():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g), torch.randn(5, 64, generator=g)
    q, s = quant.quantize_int8(w)
    assert (quant.dequantize_int8(q, s) - w).abs().max() <= s.max() / 2 + 1e-6   # rounding bound
    lin = quant.Int8Linear(64, 96, bias=False, dtype=torch.float32)
    lin.weight, lin.scales = q, s
    ref = x @ quant.dequantize_int8(q, s).t()
    # 5 rows: the kernel, fed bfloat16 inputs (8 significant bits); 40 rows: float32 GEMM.
    assert (lin(x) - ref).abs().max() <= 0.02 * ref.abs().max()
    x40 = torch.randn(40, 64, generator=g)
    assert (lin(x40) - x40 @ quant.dequantize_int8(q, s).t()).abs().max() <= 1e-4


def test_int4_kernel_matches_dequantized_matmul():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 128, generator=g), torch.randn(3, 128, generator=g)
    q, sz = quant.quantize_int4(w)
    assert q.min() >= 0 and q.max() <= 15
    deq = quant.dequantize_int4(q, sz)
    step = sz[..., 0].max()
    assert (deq - w).abs().max() <= step / 2 + 1e-5
    lin = quant.Int4Linear(128, 64, bias=False, dtype=torch.float32)
    mods = quant.quantize_tensor(lin, w, torch.float32)
    lin.weight, lin.scales_and_zeros = mods["weight"], mods["scales_and_zeros"]
    ref = x @ deq.t()
    assert (lin(x) - ref).abs().max() <= 0.02 * ref.abs().max()   # bfloat16 inputs to the kernel


def _dequantized_float_decoder(path, config, qdec):
    """A float32 decoder whose weights are exactly the quantized decoder's dequantized ones."""
    dec = load_decoder(path, config, device="cpu", dtype="float32")
    fmods = dict(dec.named_modules())
    with torch.no_grad():
        for name, m in qdec.named_modules():
            if isinstance(m, (quant.Int8Linear, quant.Int8Embedding)):
                fmods[name].weight.copy_(quant.dequantize_int8(m.weight, m.scales.float()))
            elif isinstance(m, quant.Int4Linear):
                w = fmods[name].weight
                q, _ = quant.quantize_int4(w, m.group_size)   # same inputs -> same integers
                fmods[name].weight.copy_(quant.dequantize_int4(q, m.scales_and_zeros.float()))
    return dec


@pytest.mark.parametrize("mode", quant.MODES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_quantized_model_matches_dequantized_reference(tmp_path, arch, mode):
    path, hf = make_tiny_model(arch, tmp_path)
    config = ModelConfig.from_file(path)
    tokens = random_tokens(config.vocab_size, 16, batch=2)
    qdec = load_decoder(path, config, device="cpu", dtype="float32", quantize=mode)
    ref = _dequantized_float_decoder(path, config, qdec)
    with torch.no_grad():
        out, want, hf_out = qdec(tokens), ref(tokens), hf(tokens).logits
    # The kernels compute the dequantized model (int4: up to bfloat16 rounding of its inputs).
    assert (out - want).abs().max() <= (2e-3 if mode == "int8" else 0.06)
    err = (out - hf_out).abs().max()                   # and that model is near the float one
    assert err <= (0.25 if mode == "int8" else 2.0) and err > 0


def test_quantized_bfloat16_decode_uses_the_cache(tmp_path):
    path, hf = make_tiny_model("llama", tmp_path)
    config = ModelConfig.from_file(path)
    dec = load_decoder(path, config, device="cpu", dtype="bfloat16", quantize="int8")
    assert dec.compute_dtype == torch.bfloat16 and dec.quantization == "int8"
    tokens = random_tokens(config.vocab_size, 12)
    cache = dec.new_cache(16)
    assert cache.k[0].dtype == torch.bfloat16
    with torch.no_grad():
        full = dec(tokens)
        steps = torch.cat([dec(tokens[:, i:i + 1], cache) for i in range(12)], dim=1)
    assert (full - steps).abs().max() <= 0.1


def test_quantize_refusals(tmp_path):
    from llmsh.errors import WeightsError

    path, _ = make_tiny_model("llama", tmp_path)
    config = ModelConfig.from_file(path)
    with pytest.raises(WeightsError, match="int3"):
        load_decoder(path, config, device="cpu", quantize="int3")


def test_quantize_int8_into_matches_quantize_int8():
    w = torch.randn(37, 64) * torch.rand(37, 1) * 3
    w[5] = 0                                            # an all-zero row keeps a tiny scale
    q_ref, s_ref = quant.quantize_int8(w)
    q, s = torch.empty(37, 64, dtype=torch.int8), torch.empty(37)
    quant.quantize_int8_into(w.clone(), q, s)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
