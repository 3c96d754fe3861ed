"""GGUF tensors -> Hugging Face tensors: names, layout, dequantization and the GGUF's own precision.

Reference: llama.cpp's ``convert_hf_to_gguf.py``, whose per-architecture changes we undo —
``LlamaModel`` permutes the q/k rows of the ``llama`` architecture only (qwen2, qwen3 and gemma3
are written unpermuted); ``Gemma*Model`` stores every RMSNorm weight plus one (Gemma's norms
scale by ``1 + weight``, llama.cpp's by ``weight``); ``GPT2Model`` transposes GPT-2's Conv1D
weights into (out, in). Dequantization is the ``gguf`` package's (``gguf.quants.dequantize``).

The GGUF's own precision (:func:`native_kind`): the types whose blocks are groups of 32 weights
with one scale and one offset (Q4_0, Q4_1, Q4_K) map exactly onto our int4 layout
(:mod:`llmsh.quant`: ``w = (q - 8) · scale + zero``, q in 0…15); Q8_0 maps onto our int8 layout
(one scale per row, q in −127…127) when each row's block scales are integer multiples of one
scale that keep |q| ≤ 127; everything else is widened to bfloat16 (F16 weights too; F32
weights and all norms/biases stay float32).
"""

from __future__ import annotations

import numpy as np

from .errors import ConvertError

# The quantization types we read (tensor_type.name); others are refused, naming the tensor.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")          # 32-weight groups, one scale and one offset each
FLOAT_TYPES = ("F32", "F16", "BF16")
GROUP = 32

_LLAMA_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_QK_NORM_LAYER = {**_LLAMA_LAYER, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA_LAYER = {**_QK_NORM_LAYER, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GPT2_LAYER = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
               "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
             "output_norm": "transformer.ln_f", "output": "lm_head"}
# GGUF architecture -> (layer prefix, per-layer names, top-level names)
ARCH_TENSORS = {
    "llama": ("model.layers", _LLAMA_LAYER, _LLAMA_TOP),
    "qwen2": ("model.layers", _LLAMA_LAYER, _LLAMA_TOP),
    "qwen3": ("model.layers", _QK_NORM_LAYER, _LLAMA_TOP),
    "gemma3": ("model.layers", _GEMMA_LAYER, _LLAMA_TOP),
    "gpt2": ("transformer.h", _GPT2_LAYER, _GPT2_TOP),
}
_GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def hf_name(arch: str, gguf_name: str) -> str:
    """The Hugging Face key of GGUF tensor ``gguf_name`` of architecture ``arch``.

    Raises ConvertError for a tensor the architecture does not have (named)."""
    prefix, layer, top = ARCH_TENSORS[arch]
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer:
        return f"{prefix}.{parts[1]}.{layer[parts[2]]}.{suffix}"
    if stem in top:
        return f"{top[stem]}.{suffix}"
    raise ConvertError(f"unsupported tensor {gguf_name!r} in a GGUF file of architecture {arch!r}")


def check_type(t) -> None:
    """Raise ConvertError naming tensor ``t`` (a gguf ReaderTensor) if its type is not supported."""
    if t.tensor_type.name not in SUPPORTED_TYPES:
        raise ConvertError(f"tensor {t.name} has quantization type {t.tensor_type.name}, which llmsh "
                           f"does not read (supported: {', '.join(SUPPORTED_TYPES)})")


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (``LlamaModel.permute`` in convert_hf_to_gguf.py).

    llama.cpp stores each head's rotary pairs interleaved (GPT-J style); Hugging Face keeps them
    as two halves. w: (n_head * head_dim, ...) -> same shape, rows reordered per head.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def shape_of(t) -> tuple[int, ...]:
    """The numpy (row-major) shape of GGUF tensor ``t``: its ne[] reversed."""
    return tuple(int(d) for d in reversed(t.shape))


def fix_layout(arch: str, hf: str, w: np.ndarray, cfg: dict) -> np.ndarray:
    """Undo the converter's changes to one tensor (see the module docstring) in the (out, in)
    layout: llama q/k rows un-permuted (weights and biases), Gemma norms minus one."""
    if arch == "llama" and ".q_proj." in hf:
        return unpermute_rope(w, cfg["num_attention_heads"])
    if arch == "llama" and ".k_proj." in hf:
        return unpermute_rope(w, cfg["num_key_value_heads"])
    if arch == "gemma3" and hf.endswith("norm.weight"):
        return w - np.float32(1)
    return w


def row_blocks(t, budget: int = 1 << 20):
    """(r0, r1) row ranges of GGUF tensor ``t`` of about ``budget`` weights each (one range for
    a vector): conversion works a block at a time so memory stays a few MB above the file."""
    shape = shape_of(t)
    if len(shape) < 2:
        yield 0, shape[0] if shape else 1
        return
    step = max(1, budget // max(1, int(np.prod(shape[1:]))))
    for r in range(0, shape[0], step):
        yield r, min(r + step, shape[0])


def _rows(t, r0: int, r1: int) -> np.ndarray:
    """Raw rows r0…r1 of ``t`` (quantized: bytes per row; float types: values)."""
    data = np.asarray(t.data)
    return data.reshape(shape_of(t)[0], -1)[r0:r1] if data.ndim > 1 or len(shape_of(t)) > 1 else data


def float_rows(arch: str, hf: str, t, cfg: dict, r0: int, r1: int) -> np.ndarray:
    """Rows r0…r1 of tensor ``t`` (Hugging Face name ``hf``) dequantized to float32 in the (out,
    in) layout, with the converter's changes undone (:func:`fix_layout`). Rows of llama's q/k
    are permuted within heads: ask for those whole."""
    from gguf.quants import dequantize

    check_type(t)
    shape = shape_of(t)
    raw = _rows(t, r0, r1) if len(shape) > 1 else np.asarray(t.data)
    try:   # one flat row: dequantize() loops in Python over the rows of a 2-D input
        w = dequantize(np.ascontiguousarray(raw).reshape(-1), t.tensor_type)
    except NotImplementedError:
        raise ConvertError(f"cannot dequantize tensor {t.name} of type {t.tensor_type.name} "
                           "(unsupported by the installed gguf package)") from None
    w = w.reshape((r1 - r0, *shape[1:]) if len(shape) > 1 else shape).astype(np.float32, copy=False)
    return np.ascontiguousarray(fix_layout(arch, hf, w, cfg))


def needs_whole(arch: str, hf: str) -> bool:
    """Whether ``hf`` must be converted in one block (llama q/k row permutation, GPT-2 Conv1D)."""
    return (arch == "llama" and (".q_proj." in hf or ".k_proj." in hf)) or \
        (arch == "gpt2" and hf.endswith(_GPT2_CONV1D))


def conv1d_transposed(arch: str, hf: str) -> bool:
    """Whether the Hugging Face checkpoint stores ``hf`` transposed, (in, out) (GPT-2's Conv1D)."""
    return arch == "gpt2" and hf.endswith(_GPT2_CONV1D)


def _affine_groups(t, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(q uint8 (R, K) in 0…15, scale and offset (R, K/32) float32, w (R, K/32, 32) float32) of
    rows r0…r1 of a Q4_0 / Q4_1 / Q4_K tensor, found through ``gguf.quants.dequantize`` alone:
    blocks with every 4-bit value set to 0 dequantize to each group's offset, set to 1 to
    offset + scale."""
    from gguf.quants import GGML_QUANT_SIZES, dequantize

    k = shape_of(t)[1]
    block, nbytes = GGML_QUANT_SIZES[t.tensor_type]
    raw = _rows(t, r0, r1).reshape(-1, nbytes)
    head = nbytes - block // 2                      # the 4-bit values are each block's tail
    probe = raw.copy()
    probe[:, head:] = 0
    # dequantize() loops in Python over the rows of a 2-D input: give it one flat row
    offset = dequantize(probe.reshape(-1), t.tensor_type).reshape(r1 - r0, k // GROUP, GROUP)[..., 0]
    probe[:, head:] = 0x11
    scale = dequantize(probe.reshape(-1), t.tensor_type).reshape(r1 - r0, k // GROUP, GROUP)[..., 0] - offset
    del probe
    w = dequantize(raw.reshape(-1), t.tensor_type).reshape(r1 - r0, k // GROUP, GROUP)
    safe = np.where(scale == 0, 1, scale)[..., None]
    q = np.clip(np.rint((w - offset[..., None]) / safe), 0, 15).astype(np.uint8).reshape(r1 - r0, k)
    return q, scale.astype(np.float32), offset.astype(np.float32), w


def int4_rows(t, r0: int, r1: int) -> dict[str, np.ndarray]:
    """Rows r0…r1 of a Q4_0/Q4_1/Q4_K weight (N, K) in our int4 layout, exactly: ``qweight``
    (R, K/2) uint8 (two values a byte, even column in the low nibble), ``scales`` and ``zeros``
    (R, K/32) float32 with w = (q − 8)·scale + zero. Raises ConvertError if that does not
    reproduce gguf's dequantization to float32 rounding (it always should)."""
    q, scale, offset, ref = _affine_groups(t, r0, r1)
    zero = offset + 8 * scale
    w = (q.reshape(ref.shape).astype(np.float32) - 8) * scale[..., None] + zero[..., None]
    tol = 4 * np.finfo(np.float32).eps * (np.abs(scale) * 8 + np.abs(zero))[..., None]
    if not (np.abs(w - ref) <= tol).all():
        raise ConvertError(f"tensor {t.name} ({t.tensor_type.name}) does not map onto int4 groups")
    return {"qweight": (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8), "scales": scale, "zeros": zero}


def _q8_0_scales(t, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    """(block scales (R, K/32) float64, raw blocks (R, K/32, 34) uint8) of rows of a Q8_0 tensor."""
    from gguf.quants import GGML_QUANT_SIZES

    _, nbytes = GGML_QUANT_SIZES[t.tensor_type]
    raw = _rows(t, r0, r1).reshape(r1 - r0, -1, nbytes)
    return raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float64), raw


def _row_base(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each row's smallest positive block scale (R, 1), block scale / it (R, K/32))."""
    nz = np.where(d > 0, d, np.inf)
    base = nz.min(axis=1, keepdims=True)
    base = np.where(np.isfinite(base), base, 1.0)
    return base, d / base


def int8_exact(t) -> bool:
    """Whether a Q8_0 tensor fits our int8 layout (one scale per row, |q| ≤ 127) exactly: each
    block scale an integer multiple m of the row's smallest, with |q · m| ≤ 127."""
    for r0, r1 in row_blocks(t):
        d, raw = _q8_0_scales(t, r0, r1)
        _, mult = _row_base(d)
        if not np.array_equal(mult, np.rint(mult)):
            return False
        peak = np.abs(raw[..., 2:].view(np.int8).astype(np.int16)).max(axis=-1)
        if (peak * mult).max(initial=0) > 127:
            return False
    return True


def int8_rows(t, r0: int, r1: int) -> dict[str, np.ndarray]:
    """Rows r0…r1 of a Q8_0 weight for which :func:`int8_exact` holds: ``qweight`` (R, K) int8
    and ``scales`` (R,) float32, w = q · scale."""
    d, raw = _q8_0_scales(t, r0, r1)
    base, mult = _row_base(d)
    q = raw[..., 2:].view(np.int8).astype(np.int16) * np.rint(mult).astype(np.int16)[..., None]
    return {"qweight": q.reshape(r1 - r0, -1).astype(np.int8), "scales": base[:, 0].astype(np.float32)}


def native_kind(t, hf: str) -> str:
    """What tensor ``t`` (HF name ``hf``) becomes in the GGUF's own precision: "int4", "int8",
    "bfloat16" (widened; F16 and BF16 weights too) or "float32" (vectors, F32 weights)."""
    name = t.tensor_type.name
    if len(t.shape) < 2 or not hf.endswith(".weight") or name == "F32":
        return "float32"
    if name in ("BF16", "F16"):     # F16: half the bytes of float32, 3 bits of mantissa fewer
        return "bfloat16"
    if name in INT4_TYPES and shape_of(t)[-1] % GROUP == 0:
        return "int4"
    if name == "Q8_0":
        return "int8" if int8_exact(t) else "bfloat16"
    return "bfloat16"


def is_exact(t, kind: str) -> bool:
    """Whether ``kind`` holds tensor ``t``'s dequantized values exactly (a widened Q5/Q6/Q8 is not)."""
    name = t.tensor_type.name
    return kind in ("int4", "int8") or name in ("F32", "BF16") or (name == "F16" and kind == "float32")
