"""GGUF file -> Hugging Face-style model folder (config.json, model.safetensors, tokenizer.json, ...).

Reference behaviour: llama.cpp's own reading of a GGUF file (``llama-vocab.cpp`` for the
tokenizer, built by :mod:`llmsh.gguf_vocab`; ``convert_hf_to_gguf.py`` for the tensor layout
that we undo here). Only the ``llama`` architecture is supported so far; everything else is
refused with a :class:`~llmsh.errors.ConvertError` rather than guessed.

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

from llmsh import gguf_precision, gguf_vocab
from llmsh.errors import ConvertError
from llmsh.gguf_tensors import unpermute_rope  # noqa: F401  (re-exported: tests and callers use it here)

SOURCE_FILE = "llmsh-source.json"  # provenance in every folder llmsh writes (hub.SOURCE_FILE too)


def _fields(reader) -> dict:
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def hf_name(gguf_name: str) -> str:
    """Map a llama-architecture GGUF tensor name to its Hugging Face key; ConvertError if unknown."""
    from .gguf_tensors import hf_name as arch_hf_name

    return arch_hf_name("llama", gguf_name)


def _f32(x) -> float:
    """GGUF stores float32: write its shortest repr (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _has_biases(hf_names: set, block: str, projs: tuple) -> bool:
    """HF llama has one switch per block: all of its projections have biases, or none."""
    have = {p for p in projs if f"model.layers.0.{block}.{p}.bias" in hf_names}
    if have and have != set(projs):
        raise ConvertError(f"GGUF file has biases on only some {block} projections ({', '.join(sorted(have))}); not supported")
    return bool(have)


def _config(meta: dict, hf_names: set, torch_dtype: str) -> dict:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConvertError(f"GGUF architecture {arch!r} is not supported yet (only 'llama')")

    def get(key, default=None, required=True):
        value = meta.get(f"llama.{key}", default)
        if value is None and required:
            raise ConvertError(f"GGUF metadata lacks llama.{key}")
        return value

    hidden, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // n_head))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ConvertError(f"partial rotary embeddings (rope.dimension_count {rope_dim} != head_dim {head_dim}) are not supported")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(get("vocab_size", len(tokens) or None)),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": _has_biases(hf_names, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        "mlp_bias": _has_biases(hf_names, "mlp", ("gate_proj", "up_proj", "down_proj")),
        "tie_word_embeddings": "lm_head.weight" not in hf_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": torch_dtype,
    }
    scaling = get("rope.scaling.type", "none", required=False)
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling not in ("none", None):
        raise ConvertError(f"rope scaling {scaling!r} in GGUF file is not supported yet")
    return cfg


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
    """Convert a llama-architecture GGUF file into a Hugging Face-style folder; returns out_dir.

    Writes config.json, model.safetensors (dequantized to ``dtype``: float32 | float16 |
    bfloat16, or ``native``: the GGUF's own precision, see :mod:`llmsh.gguf_precision`; Q/K
    rows (and biases) un-permuted to HF layout; lm_head omitted and
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
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ConvertError("GGUF files with rope_freqs (llama3-style rope scaling) are not supported yet")
    plan = sorted(((hf_name(t.name), t, tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors),
                  key=lambda p: p[0])
    if len({p[0] for p in plan}) != len(plan):
        raise ConvertError(f"duplicate tensor names in GGUF file {gguf_path}")
    cfg = _config(meta, {p[0] for p in plan}, "float32" if dtype == gguf_precision.NATIVE else dtype)
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
