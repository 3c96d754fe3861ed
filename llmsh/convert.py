"""GGUF file -> Hugging Face-style model folder (config.json, model.safetensors, tokenizer.json, ...).

Reference behaviour: llama.cpp's own reading of a GGUF file (``llama-vocab.cpp`` for the
tokenizer, built by :mod:`llmsh.gguf_vocab`; ``convert_hf_to_gguf.py`` for the tensor layout
that we undo here, :mod:`llmsh.gguf_tensors`). Architectures: those of
:data:`llmsh.gguf_config.SUPPORTED_ARCHS` (llama, qwen2, qwen3, gemma3, gpt2), whose config.json
:mod:`llmsh.gguf_config` builds; everything else is refused with a
:class:`~llmsh.errors.ConvertError` rather than guessed.

Weights are dequantized with ``gguf.quants.dequantize`` (or kept in their own precision, int4 /
int8 where that is exact: :mod:`llmsh.gguf_precision`) and streamed a block of rows at a time
into a safetensors file we write ourselves, so peak memory is a block, not the model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from llmsh import gguf_config, gguf_precision, gguf_tensors, gguf_vocab
from llmsh.errors import ConvertError
from llmsh.gguf_tensors import unpermute_rope  # noqa: F401  (re-exported: tests and callers use it here)

SOURCE_FILE = "llmsh-source.json"  # provenance in every folder llmsh writes (hub.SOURCE_FILE too)


def _fields(reader) -> dict:
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def hf_name(gguf_name: str, arch: str = "llama") -> str:
    """Map GGUF tensor ``gguf_name`` of architecture ``arch`` to its Hugging Face key;
    ConvertError if the architecture has no such tensor."""
    return gguf_tensors.hf_name(arch, gguf_name)


def _config(meta: dict, shapes: dict, torch_dtype: str, extra: dict | None = None) -> dict:
    """config.json for the file (see :func:`llmsh.gguf_config.hf_config`)."""
    return gguf_config.hf_config(meta, shapes, torch_dtype, extra)


def _plan(reader, arch: str) -> tuple[list, dict]:
    """([(hf name, GGUF tensor, HF shape)] sorted by name, {config tensor: float32 array}).

    Config tensors (llama's ``rope_freqs``, Llama 3.x RoPE scaling) are not weights: they are
    returned apart for :func:`llmsh.gguf_config.hf_config`. Every weight's type is checked
    here, before anything is written (ConvertError naming the tensor and its type)."""
    plan, extra = [], {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            if arch != "llama":
                raise ConvertError(f"tensor rope_freqs.weight in a GGUF file of architecture {arch!r} is not supported")
            gguf_tensors.check_type(t)
            extra["rope_freqs"] = gguf_tensors.float_rows(arch, "rope_freqs", t, {}, 0, 1)
            continue
        hf = hf_name(t.name, arch)
        gguf_tensors.check_type(t)
        shape = gguf_tensors.shape_of(t)
        if gguf_tensors.conv1d_transposed(arch, hf):   # GPT-2's Conv1D: HF keeps (in, out)
            shape = shape[::-1]
        plan.append((hf, t, shape))
    return sorted(plan, key=lambda p: p[0]), extra


def _write_safetensors(path: Path, reader, plan: list, dtype: str, cfg: dict, progress) -> dict:
    """Stream the tensors of ``plan`` into ``path`` in precision ``dtype`` (a
    :data:`llmsh.gguf_precision.PRECISIONS` name); returns the tensor manifest."""
    arch = _fields_arch(reader)
    return gguf_precision.write_safetensors(path, arch, plan, cfg, dtype, progress)


def _fields_arch(reader) -> str:
    f = reader.fields.get("general.architecture")
    return f.contents() if f is not None else "llama"


def convert_gguf(gguf_path, out_dir, dtype: str = "float32", *, overwrite: bool = False,
                 progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Convert a GGUF file (llama, qwen2, qwen3, gemma3 or gpt2) into a Hugging Face-style folder; returns out_dir.

    Writes config.json, model.safetensors (dequantized to ``dtype``: float32 | float16 |
    bfloat16, or ``native``: the GGUF's own precision, see :mod:`llmsh.gguf_precision`; in HF
    layout: llama Q/K rows (and biases) un-permuted, Gemma norms minus one, GPT-2 Conv1D weights
    (in, out); lm_head omitted and
    tie_word_embeddings true when the file has no output.weight), the tokenizer files of
    :func:`llmsh.gguf_vocab.tokenizer_files` (tokenizer.json or tokenizer.model, tokenizer_config.json,
    generation_config.json), llmsh-tensors.json (what each tensor became). Work happens in a hidden temp folder next to out_dir that is
    renamed into place at the end, so a failure or interrupt leaves no half-written out_dir.
    progress(stage, done, total) is called after each tensor with stage "convert".
    Raises ConvertError (bad/unsupported file, quant type, tokenizer, existing out_dir).
    """
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in gguf_precision.PRECISIONS:
        raise ConvertError(f"unsupported dtype {dtype!r} (choose from {', '.join(gguf_precision.PRECISIONS)})")
    if out_dir.exists() and not overwrite:
        raise ConvertError(f"output folder {out_dir} already exists")
    try:
        reader = GGUFReader(gguf_path)
    except (OSError, ValueError, IndexError, struct.error) as e:
        raise ConvertError(f"cannot read GGUF file {gguf_path}: {e}") from None
    meta = _fields(reader)
    arch = gguf_config.check_arch(meta)
    plan, extra = _plan(reader, arch)
    if len({p[0] for p in plan}) != len(plan):
        raise ConvertError(f"duplicate tensor names in GGUF file {gguf_path}")
    cfg = _config(meta, {hf: shape for hf, _, shape in plan},
                  "float32" if dtype == gguf_precision.NATIVE else dtype, extra)
    tokenizer_files = gguf_vocab.tokenizer_files(meta)  # refuses an unsupported vocabulary before any writing
    # Read into meta and tokenizer_files: the vocabulary's per-token numpy views hold ~150 MB.
    for key in [k for k in reader.fields if k.startswith("tokenizer.ggml.")]:
        del reader.fields[key]
    del meta

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    try:
        work = tmp / "model"
        work.mkdir(mode=0o755)
        (work / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for name, data in tokenizer_files.items():
            (work / name).write_bytes(data)
        # Provenance: the mark that lets `convert --force` replace this folder (and nothing else).
        (work / SOURCE_FILE).write_text(json.dumps({"converted_from": str(gguf_path.resolve()),
                                                    "dtype": dtype}, indent=2) + "\n")
        manifest = _write_safetensors(work / "model.safetensors", reader, plan, dtype, cfg, progress)
        gguf_precision.write_manifest(work, manifest)
        del reader, plan  # release the memory map before renaming (Windows)
        if out_dir.exists():
            if not overwrite:  # someone else finished first; theirs stays
                raise ConvertError(f"output folder {out_dir} already exists")
            out_dir.rename(tmp / "old")
        os.replace(work, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
