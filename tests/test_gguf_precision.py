"""A GGUF in its own precision (llmsh.gguf_precision, llmsh.weights), on tiny llama GGUFs written
here with gguf.GGUFWriter and gguf.quants.quantize.

The reference is the float32 folder of the same file (every tensor dequantized by gguf.quants):
exact int4 / int8 weights must give its logits to float32 rounding in prefill (more than
quant.SMALL_M rows: float32 GEMMs on the exactly dequantized weights), widened (bfloat16) ones
within bfloat16's rounding; the decoder's modules and the manifest must say what was kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from llmsh import gguf_precision as gp, quant  # noqa: E402
from llmsh.config import ModelConfig  # noqa: E402
from llmsh.convert import convert_gguf  # noqa: E402
from llmsh.weights import load_decoder  # noqa: E402
from test_convert import train_tokenizer, write_tiny_gguf  # noqa: E402
from tiny_models import build_tiny_hf_model  # noqa: E402

# K = 256 so that Q4_K's 256-weight super-blocks fit every row
DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


def _k_blocks(arr, qt):
    """Valid random Q4_K / Q6_K blocks for a float array's shape (gguf.quants cannot quantize to
    k-quants): random 4/6-bit values and sub-block scales, small fp16 super-block scales."""
    from gguf.quants import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(arr.size)
    raw = rng.integers(0, 256, (arr.shape[0], arr.shape[1] // block, nbytes), dtype=np.uint8)
    if qt == QT.Q4_K:       # d, dmin first
        raw[..., 0:4] = np.frombuffer(np.array([1e-4, 1e-4], dtype=np.float16).tobytes(), np.uint8)
    else:                   # Q6_K: d last
        raw[..., -2:] = np.frombuffer(np.array([1e-5], dtype=np.float16).tobytes(), np.uint8)
    return raw.reshape(arr.shape[0], -1)


def _gguf(tmp_path, tok, quant_of, *, tied=False, model=None, monkeypatch=None):
    from gguf import quants

    hf = model or build_tiny_hf_model("llama", vocab_size=tok.get_vocab_size(), tie_word_embeddings=tied, **DIMS)
    real = quants.quantize

    def quantize(arr, qt):
        return _k_blocks(arr, qt) if qt in (QT.Q4_K, QT.Q6_K) else real(arr, qt)

    quants.quantize = quantize
    try:
        return write_tiny_gguf(tmp_path / "m.gguf", hf, tok, quant=quant_of)
    finally:
        quants.quantize = real


def _both(tmp_path, path):
    nat = convert_gguf(path, tmp_path / "native", dtype="native")
    f32 = convert_gguf(path, tmp_path / "f32", dtype="float32")
    cfg = ModelConfig.from_file(f32)
    return (load_decoder(nat, cfg, device="cpu", dtype="float32"),
            load_decoder(f32, cfg, device="cpu", dtype="float32"), nat, f32, cfg)


def _logits(dec, t=24, seed=0):
    ids = torch.randint(3, 300, (1, t), generator=torch.Generator().manual_seed(seed))
    return dec(ids)[0]


def _q4_k_m_like(name):
    if ".attn_v." in name:
        return QT.Q6_K
    if ".ffn_down." in name:
        return QT.Q5_0
    if name in ("token_embd.weight", "output.weight"):
        return QT.Q8_0
    return QT.Q4_K


def test_a_mix_keeps_int4_exact_and_widens_the_rest(tmp_path, tok):
    nat_dec, f32_dec, nat, _, _ = _both(tmp_path, _gguf(tmp_path, tok, _q4_k_m_like))
    m = gp.load_manifest(nat)["tensors"]
    assert m["model.layers.0.self_attn.q_proj.weight"] == {"gguf_type": "Q4_K", "kind": "int4", "exact": True,
                                                           "shape": [256, 256]}
    assert (m["model.layers.0.self_attn.v_proj.weight"]["kind"], m["model.layers.0.self_attn.v_proj.weight"]["exact"]) \
        == ("bfloat16", False)
    assert m["model.layers.1.mlp.down_proj.weight"]["kind"] == "bfloat16"
    assert m["model.norm.weight"]["kind"] == "float32" and m["model.norm.weight"]["exact"]
    assert [gp.describe(r) for r in gp.summary(gp.load_manifest(nat))] == [
        "Q4_K → int4 (exact): 10 tensors", "F32 → float32 (exact): 5 tensors",
        "Q5_0 → bfloat16 (not exact): 2 tensors", "Q6_K → bfloat16 (not exact): 2 tensors",
        "Q8_0 → bfloat16 (not exact): 2 tensors"]
    att, mlp = nat_dec.model.layers[0].self_attn, nat_dec.model.layers[0].mlp
    # v is stored otherwise than q and k: those three stay apart; gate/up are alike and fused
    assert isinstance(att.q_proj, quant.Int4Linear) and isinstance(att.v_proj, quant.BF16Linear)
    assert not hasattr(att, "qkv_proj") and isinstance(mlp.gate_up_proj, quant.Int4Linear)
    assert isinstance(mlp.down_proj, quant.BF16Linear) and isinstance(nat_dec.lm_head, quant.BF16Linear)
    assert isinstance(nat_dec.embed_tokens, quant.BF16Embedding)
    assert nat_dec.embed_tokens.weight.dtype == torch.bfloat16 and nat_dec.model.norm.weight.dtype == torch.float32
    assert nat_dec.quantization == "native"
    a, b = _logits(nat_dec), _logits(f32_dec)
    assert (a - b).abs().max() < 2e-2 * b.abs().max()          # bfloat16 weights: ~3 significant digits
    kl = torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl < 1e-3


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q4_1, QT.Q4_K])
def test_int4_types_give_the_float32_logits(tmp_path, tok, qt):
    # every weight int4 (embedding and output kept F32): prefill is float32 GEMMs on the exact weights
    nat_dec, f32_dec, nat, _, _ = _both(tmp_path, _gguf(tmp_path, tok, lambda n: QT.F32 if n in (
        "token_embd.weight", "output.weight") else qt))
    assert {v["kind"] for k, v in gp.load_manifest(nat)["tensors"].items() if "layers" in k and k.endswith("proj.weight")} \
        == {"int4"}
    assert isinstance(nat_dec.model.layers[0].self_attn.qkv_proj, quant.Int4Linear)
    a, b = _logits(nat_dec), _logits(f32_dec)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * b.abs().max().item())
    # one row (decode) goes through torch's int4 kernel in bfloat16: close, not equal
    one_a, one_b = _logits(nat_dec, t=1), _logits(f32_dec, t=1)
    assert (one_a - one_b).abs().max() < 3e-2 * one_b.abs().max()


def _int8_friendly(tok, tied):
    """A model whose every weight row has the same largest |w| in each 32-block: its Q8_0 block
    scales are then all equal, which our int8 rows (one scale a row) hold exactly."""
    hf = build_tiny_hf_model("llama", vocab_size=tok.get_vocab_size(), tie_word_embeddings=tied, **DIMS)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2:
                g = p.view(p.shape[0], -1, 32)
                peak = g.abs().amax(dim=(1, 2), keepdim=True)
                g[..., 0] = peak[..., 0]
    return hf


def test_q8_0_with_equal_block_scales_stays_int8(tmp_path, tok):
    hf = _int8_friendly(tok, tied=True)
    nat_dec, f32_dec, nat, _, _ = _both(tmp_path, _gguf(tmp_path, tok, QT.Q8_0, model=hf))
    assert {(v["kind"], v["exact"]) for k, v in gp.load_manifest(nat)["tensors"].items()
            if k.endswith("proj.weight") or "embed" in k} == {("int8", True)}
    assert isinstance(nat_dec.embed_tokens, quant.Int8Embedding) and isinstance(nat_dec.lm_head, quant.Int8Linear)
    assert nat_dec.lm_head.weight is nat_dec.embed_tokens.weight          # tied: one table
    a, b = _logits(nat_dec), _logits(f32_dec)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * b.abs().max().item())


def test_native_folder_dequantizes_for_float_weights(tmp_path, tok):
    from llmsh.loader import build_decoder

    _, f32_dec, nat, _, cfg = _both(tmp_path, _gguf(tmp_path, tok, QT.Q4_1))
    floats = build_decoder(nat, cfg, device="cpu", dtype="float32", quantize="none")
    assert not any(isinstance(m, (quant.Int4Linear, quant.BF16Linear)) for m in floats.modules())
    w = floats.model.layers[1].mlp.gate_up_proj.weight
    ref = f32_dec.model.layers[1].mlp.gate_up_proj.weight
    torch.testing.assert_close(w, ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    # and requantizing for --quantize int8 reads the dequantized weights too
    q8 = build_decoder(nat, cfg, device="cpu", dtype="float32", quantize="int8")
    assert isinstance(q8.model.layers[0].mlp.down_proj, quant.Int8Linear)


def test_bf16_linear_prefill_is_float32_and_blocked():
    lin = quant.BF16Linear(64, 1000, bias=True, dtype=torch.float32)
    lin.weight = torch.randn(1000, 64).to(torch.bfloat16)
    lin.bias = torch.randn(1000)
    x = torch.randn(40, 64)
    torch.testing.assert_close(lin(x), x @ lin.weight.float().t() + lin.bias)
    assert lin(x[:1]).dtype == torch.float32


def test_packed_int4_unpacks_exactly():
    q = torch.randint(0, 16, (192, 64), dtype=torch.int32)
    sz = torch.randn(2, 192, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    if not quant.packed_layout_known():
        pytest.skip("this torch packs int4 otherwise (the exact prefill is then off)")
    torch.testing.assert_close(quant.unpack_packed_int4(packed, sz), quant.dequantize_int4(q, sz), rtol=1e-6, atol=1e-6)
    unit = torch.stack([torch.ones(2, 192), torch.full((2, 192), 8.0)], dim=-1)      # w = q: the values themselves
    assert torch.equal(quant.unpack_packed_int4(packed, unit), q.float())


@pytest.mark.parametrize("n", [192, 96])      # 96: not a multiple of torch's 64-row blocks
def test_pack_int4_equals_torchs_packing(n):
    qw = torch.randint(0, 256, (n, 32), dtype=torch.uint8)
    q = torch.stack([qw & 15, qw >> 4], -1).view(n, 64).int()
    scales, zeros = torch.rand(n, 2), torch.rand(n, 2)
    out = quant.pack_int4(qw, scales, zeros, torch.float32)
    assert torch.equal(out["weight"], torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
    assert torch.equal(out["scales_and_zeros"], torch.stack([scales, zeros], -1).transpose(0, 1))


def test_info_says_what_each_type_became(tmp_path, tok):
    path = _gguf(tmp_path, tok, _q4_k_m_like)
    env = dict(os.environ, LLMSH_HOME=str(tmp_path / "home"), PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "llmsh", "info", "-m", str(path)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Q4_K → int4 (exact): 10 tensors" in r.stdout and "Q6_K → bfloat16 (not exact): 2 tensors" in r.stdout
    assert "native" in r.stdout
    r = subprocess.run([sys.executable, "-m", "llmsh", "info", "-m", str(path), "--json",
                        "--dtype", "float32", "--quantize", "none"], capture_output=True, text=True, env=env, timeout=300)
    data = json.loads(r.stdout)
    assert data["quantization"] == "none" and {t["kind"] for t in data["tensors"]} == {"float32"}
    assert all(t["exact"] for t in data["tensors"])
    assert sorted(p.name.rpartition("-")[2] for p in (tmp_path / "home" / "gguf").iterdir() if p.is_dir()) \
        == ["float32", "native"]


def test_unsupported_precision_is_refused(tmp_path, tok):
    from llmsh.errors import ConvertError

    with pytest.raises(ConvertError, match="unsupported dtype 'int3'"):
        convert_gguf(_gguf(tmp_path, tok, QT.Q4_0), tmp_path / "x", dtype="int3")


def test_precision_for():
    from llmsh.loader import precision_for

    assert precision_for("cpu", None) == precision_for("cpu", "auto") == "native"
    assert precision_for("cpu", "none") == precision_for("cpu", "int4") == "float32"
    assert precision_for(torch.device("cuda"), None) == "float32"        # int4 kernels are CPU-only here
    assert precision_for("cpu", None, tensor_parallel=object()) == "float32"


def test_f16_weights_become_bfloat16_and_f32_norms_stay():
    from types import SimpleNamespace

    def tensor(qt, shape):
        return SimpleNamespace(name="blk.0.ffn_up.weight", tensor_type=qt, shape=np.array(shape[::-1]),
                               data=np.zeros(shape, np.float16 if qt == QT.F16 else np.float32))

    w = tensor(QT.F16, (8, 64))
    assert gp.kind_of(w, "model.layers.0.mlp.up_proj.weight", "native") == "bfloat16"
    assert not gp.exact(w, "bfloat16") and gp.exact(w, "float32")
    norm = tensor(QT.F32, (64,))
    assert gp.kind_of(norm, "model.layers.0.input_layernorm.weight", "native") == "float32"
