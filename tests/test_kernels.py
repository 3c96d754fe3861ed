"""The GGUF block kernels (llmsh/kernels) against their plain-torch reference and gguf.quants."""

import glob
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llmsh.kernels import build, linear, reference as R  # noqa: E402

FLOAT_RTOL = 2e-5   # float32 sums of ≤ K/16 block terms vs float64: |err| ≤ 2e-5 · Σ|terms|
REAL_GGUFS = sorted(glob.glob("/work/ggufs/*.gguf") + glob.glob(os.path.expanduser("~/.cache/llmsh/**/*.gguf"), recursive=True))


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    """The built extension, under a temporary LLMSH_HOME (the build is cached there per module)."""
    old = os.environ.get("LLMSH_HOME")
    os.environ["LLMSH_HOME"] = str(tmp_path_factory.mktemp("kernels-home"))
    build.reset()
    ops = build.kernels()
    if ops is None:
        pytest.skip(f"C++ kernels unavailable: {build._state['reason']}")
    yield ops
    ops.set_isa(0)
    build.reset()
    if old is None:
        os.environ.pop("LLMSH_HOME", None)
    else:
        os.environ["LLMSH_HOME"] = old


def available_isas(ops):
    got = [i for i, _ in enumerate(build.ISAS, 1) if ops.set_isa(i) == i]
    ops.set_isa(0)
    return got


def _set_f16(b, off, vals):
    n, nb = vals.shape
    b[..., off:off + 2] = vals.to(torch.float16).unsqueeze(-1).view(torch.uint8).reshape(n, nb, 2)


def random_blocks(name, n, k, gen, scale_vals=None):
    """Random quants with sane float16 scales (random bytes would hold inf/NaN)."""
    tid, el, nbytes = R.TYPES[name]
    nb = k // el
    b = torch.randint(0, 256, (n, nb, nbytes), dtype=torch.uint8, generator=gen)

    def vals(lo, hi):
        if scale_vals is not None:
            return torch.full((n, nb), scale_vals)
        return torch.rand(n, nb, generator=gen) * (hi - lo) + lo

    if name in ("Q4_0", "Q5_0", "Q8_0"):
        _set_f16(b, 0, vals(-0.02, 0.02))
    elif name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
        _set_f16(b, 0, vals(0.001, 0.02))
        _set_f16(b, 2, vals(-0.1, 0.1) if name in ("Q4_1", "Q5_1") else vals(0.0, 0.01))
    else:
        _set_f16(b, 208, vals(-0.01, 0.01))
    return b.reshape(n, -1).contiguous(), tid


def gguf_weight(blocks, tid, n, k):
    w = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(tid))
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).reshape(n, k))


def check_product(ops, x, blocks, tid, n, k):
    y = ops.mm(x, blocks, tid, n, k).double()
    ref, scale = R.matmul(x, blocks, tid, n, k)
    assert ((y - ref).abs() <= FLOAT_RTOL * scale + 1e-30).all(), (y - ref).abs().max()
    # Independent check of the layouts: against gguf.quants' weights in float64. The only
    # difference is the activations' rounding, |x - d·q| ≤ d/2 per element.
    w = gguf_weight(blocks, tid, n, k).double()
    block = R.type_info(tid)[1]
    _, dx, _ = R.quantize_activations(x, 256 if block == 256 else 32)
    err_bound = (w.abs() @ (dx.double().repeat_interleave(256 if block == 256 else 32, 1) / 2).t()).t()
    exact = x.double() @ w.t()
    assert ((y - exact).abs() <= err_bound * 1.001 + 1e-4 * scale + 1e-12).all()


@pytest.mark.parametrize("block", [32, 256])
def test_activation_quantization_bit_exact(ops, block):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1024, generator=gen) * torch.rand(5, 1, generator=gen) * 10
    x[0, :block] = 0                       # a zero block: d = 0, q = 0
    x[1, 3] = 1e-30
    q, d, s = ops.quantize(x, block)
    q2, d2, s2 = R.quantize_activations(x, block)
    assert torch.equal(q, q2) and torch.equal(d, d2) and torch.equal(s, s2)


@pytest.mark.parametrize("name", list(R.TYPES))
@pytest.mark.parametrize("m", [1, 3])
def test_random_blocks_every_isa(ops, name, m):
    gen = torch.Generator().manual_seed(hash(name) % 1000 + m)
    n, k = 40, 768 if R.TYPES[name][1] == 256 else 608
    blocks, tid = random_blocks(name, n, k, gen)
    x = torch.randn(m, k, generator=gen)
    for isa in available_isas(ops):
        ops.set_isa(isa)
        check_product(ops, x, blocks, tid, n, k)
    ops.set_isa(0)


@pytest.mark.parametrize("name", list(R.TYPES))
def test_integer_arithmetic_bit_exact(ops, name):
    """With power-of-two scales and activations whose block max is 127 every float step is
    exact, so the kernel must equal the reference bit for bit (an off-by-one integer sum shows)."""
    gen = torch.Generator().manual_seed(7)
    n, k = 24, 512
    blocks, tid = random_blocks(name, n, k, gen, scale_vals=0.25)
    x = torch.randint(-6, 7, (2, k), generator=gen).float()
    x[:, ::32] = 127.0                     # d_x = 1, q = x exactly
    ref, _ = R.matmul(x, blocks, tid, n, k)
    for isa in available_isas(ops):
        ops.set_isa(isa)
        assert torch.equal(ops.mm(x, blocks, tid, n, k).double(), ref), build.ISAS[isa - 1]
    ops.set_isa(0)


@pytest.mark.parametrize("name", list(R.TYPES))
def test_dequantize_matches_gguf(ops, name):
    gen = torch.Generator().manual_seed(3)
    n, k = 16, 512
    blocks, tid = random_blocks(name, n, k, gen)
    w = gguf_weight(blocks, tid, n, k)
    assert torch.equal(R.dequantize(blocks, tid, n, k), w)
    torch.testing.assert_close(ops.dequantize(blocks, tid, n, k), w, rtol=1e-6, atol=1e-7)


def real_tensors():
    """The first tensor of each kernel type in every real GGUF here (first 256 rows)."""
    out = []
    for path in REAL_GGUFS:
        r = gguf.GGUFReader(path)
        seen = set()
        for t in r.tensors:
            tid = int(t.tensor_type)
            if tid in R.BY_ID and tid not in seen and len(t.shape) == 2:
                seen.add(tid)
                out.append((Path(path).name, t))
    return out


@pytest.mark.skipif(not REAL_GGUFS, reason="no GGUF files in /work/ggufs or ~/.cache/llmsh")
def test_real_tensors(ops):
    tensors = real_tensors()
    assert tensors
    gen = torch.Generator().manual_seed(5)
    for fname, t in tensors:
        blocks, tid, n, k = linear.gguf_blocks(t)
        blocks, n = blocks[:256].contiguous(), min(n, 256)
        x = torch.randn(2, k, generator=gen)
        for isa in available_isas(ops):
            ops.set_isa(isa)
            check_product(ops, x, blocks, tid, n, k)
        ops.set_isa(0)


def test_gguf_linear_decode_and_prefill(ops):
    gen = torch.Generator().manual_seed(11)
    n, k = 48, 512
    blocks, tid = random_blocks("Q4_K", n, k, gen)
    lin = linear.GGUFLinear(k, n, tid, bias=True)
    lin.blocks.copy_(blocks)
    lin.bias.copy_(torch.randn(n, generator=gen))
    w = gguf_weight(blocks, tid, n, k)
    for shape in [(1, 1, k), (2, 20, k)]:        # decode (int8 kernels) and prefill (GEMM)
        x = torch.randn(*shape, generator=gen)
        y = lin(x)
        assert y.shape == (*shape[:-1], n) and y.dtype == x.dtype
        if x.shape[1] == 1:                       # the integer kernel, int8 activations
            expect = ops.mm(x.reshape(1, k), blocks, tid, n, k).reshape(1, 1, n) + lin.bias
            torch.testing.assert_close(y, expect, rtol=0, atol=0)
        else:                                     # dequantized weights, float32 GEMM
            torch.testing.assert_close(y, x @ w.t() + lin.bias, rtol=1e-4, atol=1e-4)
    assert lin(torch.randn(1, k, generator=gen).bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of its block size"):
        linear.GGUFLinear(100, 8, tid)


def test_isa_env_forces_avx2(ops, monkeypatch):
    monkeypatch.setenv("LLMSH_KERNELS_ISA", "avx2")
    build.reset()
    assert build.backend() == "cpp-avx2"
    monkeypatch.setenv("LLMSH_KERNELS_ISA", "nonsense")
    build.reset()
    with pytest.warns(RuntimeWarning, match="LLMSH_KERNELS_ISA"):
        assert build.backend() == "torch"
    monkeypatch.delenv("LLMSH_KERNELS_ISA")
    build.reset()
    assert build.backend().startswith("cpp-")


@pytest.mark.parametrize("how", ["env", "no-compiler"])
def test_fallback_torch_path(monkeypatch, tmp_path, how):
    if how == "env":
        monkeypatch.setenv("LLMSH_KERNELS", "torch")
    else:                                   # a fresh cache, so a build must run, and it fails
        monkeypatch.setenv("LLMSH_HOME", str(tmp_path))
        monkeypatch.setenv("CXX", "/bin/false")
        monkeypatch.setenv("CC", "/bin/false")
    build.reset()
    try:
        with pytest.warns(RuntimeWarning, match="torch path") as rec:
            assert build.kernels() is None
        assert len(rec) == 1
        gen = torch.Generator().manual_seed(2)
        blocks, tid = random_blocks("Q6_K", 8, 256, gen)
        lin = linear.GGUFLinear(256, 8, tid)
        lin.blocks.copy_(blocks)
        x = torch.randn(1, 256, generator=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("error")     # the notice is given once, not per call
            y = lin(x)
        torch.testing.assert_close(y, x @ gguf_weight(blocks, tid, 8, 256).t(), rtol=1e-5, atol=1e-5)
    finally:
        build.reset()
