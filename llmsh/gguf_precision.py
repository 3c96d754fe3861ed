"""A GGUF file's tensors written into our safetensors folder, in its own precision or dequantized.

Precisions (the cache holds one folder per GGUF file and precision, see :mod:`llmsh.hub`):

- ``native`` (the default on CPU): each weight as :func:`llmsh.gguf_tensors.native_kind` says —
  ``int4`` (Q4_0 / Q4_1 / Q4_K, exact), ``int8`` (Q8_0 whose block scales our int8 rows hold
  exactly), ``bfloat16`` (the other types, widened: not exact), ``float32`` (vectors, F32 weights).
- ``float32`` / ``bfloat16`` / ``float16``: every tensor dequantized (``gguf.quants``) and cast;
  ``float32`` is the exact reference that the parity tests use.

Layout of a native folder's ``model.safetensors``: a float tensor under its Hugging Face name, in
the Hugging Face layout (GPT-2's Conv1D weights transposed, as checkpoints keep them); an int4
weight (N, K) as ``NAME`` uint8 (N, K/2) (two values a byte, even column in the low nibble),
``NAME.scales`` and ``NAME.zeros`` float32 (N, K/32), w = (q − 8)·scale + zero; an int8 weight as
``NAME`` int8 (N, K) and ``NAME.scales`` float32 (N,), w = q·scale. Quantized weights are always
(out, in). ``llmsh-tensors.json`` (:data:`MANIFEST`) says, for every Hugging Face tensor, its GGUF
type, what it became, whether that is exact, and its (out, in) shape; :func:`load_manifest`
reads it and :func:`summary` counts it for ``llmsh info``.

Tensors are converted a block of rows at a time (:func:`llmsh.gguf_tensors.row_blocks`) and
streamed to the file after a header computed up front, so memory stays a few MB above one tensor.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np

from . import gguf_tensors as gt
from .errors import ConvertError, WeightsError

MANIFEST = "llmsh-tensors.json"
NATIVE = "native"
FLOAT_PRECISIONS = ("float32", "bfloat16", "float16")
PRECISIONS = (NATIVE, *FLOAT_PRECISIONS)
QUANT_KINDS = ("int4", "int8")
_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint8": "U8", "int8": "I8"}
_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1}


def to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 array -> ``dtype`` (float32 | float16 | bfloat16 as uint16 bit patterns, rounded
    to nearest even: numpy has no bfloat16 type)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "float32":
        return a
    if dtype == "float16":
        return a.astype(np.float16)
    u = a.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def kind_of(t, hf: str, precision: str) -> str:
    """What GGUF tensor ``t`` (Hugging Face name ``hf``) becomes in ``precision``."""
    gt.check_type(t)
    if precision != NATIVE:
        return precision
    kind = gt.native_kind(t, hf)
    if kind == "int4" and hf.endswith(("embed_tokens.weight", ".wte.weight")):
        return "bfloat16"      # an embedding is looked up by rows: our int4 layout has no gather yet
    return kind


def exact(t, kind: str) -> bool:
    """Whether ``kind`` holds the values ``gguf.quants.dequantize`` gives for ``t`` exactly
    (float32 always does: it is that dequantization)."""
    name = t.tensor_type.name
    return kind in (*QUANT_KINDS, "float32") or (kind, name) in (("bfloat16", "BF16"), ("float16", "F16"))


def _entries(hf: str, kind: str, shape: tuple, transposed: bool) -> list[tuple[str, str, list]]:
    """(safetensors key, dtype, stored shape) of the tensors that hold ``hf`` as ``kind``."""
    if kind == "int4":
        n, k = shape
        return [(hf, "U8", [n, k // 2]), (hf + ".scales", "F32", [n, k // gt.GROUP]),
                (hf + ".zeros", "F32", [n, k // gt.GROUP])]
    if kind == "int8":
        return [(hf, "I8", list(shape)), (hf + ".scales", "F32", [shape[0]])]
    stored = list(shape[::-1]) if transposed else list(shape)
    return [(hf, _ST[kind], stored)]


def _blocks(arch: str, hf: str, t, kind: str, cfg: dict, transposed: bool):
    """Yield the bytes of ``hf`` as ``kind``, tensor by tensor of :func:`_entries`, in order."""
    shape = gt.shape_of(t)
    whole = gt.needs_whole(arch, hf) or transposed
    ranges = [(0, shape[0] if shape else 1)] if whole else list(gt.row_blocks(t))
    if kind in QUANT_KINDS:
        rows = gt.int4_rows if kind == "int4" else gt.int8_rows
        parts: dict[str, list] = {}
        for r0, r1 in ranges:
            d = rows(t, r0, r1)
            if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):   # undo llama.cpp's permutation
                n = cfg["num_attention_heads"] if ".q_proj." in hf else cfg["num_key_value_heads"]
                d = {k: gt.unpermute_rope(v, n) for k, v in d.items()}
            for k, v in d.items():
                parts.setdefault(k, []).append(np.ascontiguousarray(v))
        for k in (("qweight", "scales", "zeros") if kind == "int4" else ("qweight", "scales")):
            for a in parts[k]:
                yield a.tobytes()
        return
    for r0, r1 in ranges:
        w = gt.float_rows(arch, hf, t, cfg, r0, r1)
        if transposed:
            w = np.ascontiguousarray(w.T)
        yield to_dtype(w, kind).tobytes()


def _release(t) -> None:
    """Drop the pages of GGUF tensor ``t`` from the reader's memory map (``MADV_DONTNEED``):
    touched pages of a mapped file count in RSS, so converting would otherwise end up holding
    the whole file; this way it holds about one tensor of it. Best effort (no-op elsewhere)."""
    import mmap

    base = getattr(t, "data", None)
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    offset, n = getattr(t, "data_offset", None), getattr(t, "n_bytes", None)
    if base is None or offset is None or not n or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = int(offset) // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        base.madvise(mmap.MADV_DONTNEED, start, int(offset) + int(n) - start)
    except (OSError, ValueError):
        pass


def write_safetensors(path: Path, arch: str, plan: list, cfg: dict, precision: str, progress=None) -> dict:
    """Write ``plan`` ([(hf name, gguf ReaderTensor, shape)]; the shapes are taken from the
    tensors, the plan's are not used) into the safetensors file ``path``
    in ``precision`` (see the module doc); returns the manifest (written beside it by the caller
    through :func:`write_manifest`). progress(stage, done, total) after each tensor ("convert").

    Raises ConvertError: an unsupported or undequantizable type (named), a precision unknown.
    """
    if precision not in PRECISIONS:
        raise ConvertError(f"unsupported precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    kinds = []
    for hf, t, _ in plan:
        kinds.append(kind_of(t, hf, precision))      # Q8_0: reads the tensor (int8_exact)
        _release(t)
    header, offset, tensors = {}, 0, {}
    for (hf, t, _), kind in zip(plan, kinds):
        shape = gt.shape_of(t)       # (out, in), whatever layout the plan gives GPT-2's Conv1D
        transposed = kind not in QUANT_KINDS and gt.conv1d_transposed(arch, hf)
        for key, dt, stored in _entries(hf, kind, shape, transposed):
            n = int(np.prod(stored)) * _SIZE[dt]
            header[key] = {"dtype": dt, "shape": stored, "data_offsets": [offset, offset + n]}
            offset += n
        tensors[hf] = {"gguf_type": t.tensor_type.name, "kind": kind, "exact": exact(t, kind),
                       "shape": list(shape)}
    header["__metadata__"] = {"format": "pt", "source": f"llmsh.convert (GGUF, {precision})"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i, ((hf, t, _), kind) in enumerate(zip(plan, kinds)):
            transposed = kind not in QUANT_KINDS and gt.conv1d_transposed(arch, hf)
            for chunk in _blocks(arch, hf, t, kind, cfg, transposed):
                f.write(chunk)
            _release(t)
            if progress:
                progress("convert", i + 1, len(plan))
        if f.tell() != len(raw) + 8 + offset:   # a size computed up front that the data did not meet
            raise ConvertError(f"internal error: {path} has {f.tell()} bytes, header promised {len(raw) + 8 + offset}")
    return {"format": 1, "precision": precision, "tensors": tensors}


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``manifest`` as ``folder/llmsh-tensors.json``."""
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def load_manifest(folder) -> dict | None:
    """The manifest of ``folder`` (None when it has none: a plain float checkpoint).

    Raises WeightsError: the file exists but is not a manifest llmsh wrote."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(m.get("tensors"), dict):
            raise ValueError("no tensors")
    except (OSError, ValueError, AttributeError) as e:
        raise WeightsError(f"{p}: not a tensor manifest written by llmsh ({e})") from None
    return m


def summary(manifest: dict | None) -> list[dict]:
    """Counts of the manifest's tensors by (GGUF type, kind, exact), most numerous first:
    [{"gguf_type": "Q4_1", "kind": "int4", "exact": True, "tensors": 210}, ...]."""
    if not manifest:
        return []
    c = Counter((v["gguf_type"], v["kind"], bool(v["exact"])) for v in manifest["tensors"].values())
    return [{"gguf_type": g, "kind": k, "exact": e, "tensors": n}
            for (g, k, e), n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]


def describe(row: dict) -> str:
    """One line of :func:`summary`: "Q4_1 → int4 (exact): 210 tensors"."""
    n = row["tensors"]
    return (f"{row['gguf_type']} → {row['kind']} ({'exact' if row['exact'] else 'not exact'}): "
            f"{n} tensor{'s' if n != 1 else ''}")
