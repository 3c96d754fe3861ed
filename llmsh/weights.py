"""Load safetensors checkpoints into a :class:`llmsh.models.Decoder`, strictly, without pickle.

The checkpoint's files are found and read by :mod:`llmsh.checkpoint` (single file or shards);
safetensors validates each file's header; tensors are then read with ``pread`` straight into
the tensors the decoder keeps (fused, cast or quantized in blocks), never memory-mapped, so
peak memory is the converted weights plus one small block. The decoder is built on the meta
device and the tensors are assigned to it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig
from .checkpoint import CheckpointFile, open_checkpoint
from .errors import WeightsError
from .models import family
from .models.decoder import Decoder

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# gpt2 stores these as Conv1D weights, (in, out); our nn.Linear wants (out, in).
def _transposed(config: ModelConfig, name: str) -> bool:
    """Whether checkpoint tensor ``name`` is stored transposed to nn.Linear's (out, in) layout."""
    suffixes = family(config.model_type).TRANSPOSED
    return bool(suffixes) and name.endswith(suffixes)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, then mps, then cpu; anything else as torch.device.

    Raises:
        WeightsError: the device name is invalid or the device is not available.
    """
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise WeightsError(f"invalid device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WeightsError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise WeightsError(f"device {device!r} requested but MPS is not available")
    return dev


def resolve_dtype(dtype: str, device) -> torch.dtype:
    """``auto`` -> float32 on CPU, bfloat16 on GPUs; else float32/bfloat16/float16 (or aliases).

    Raises:
        WeightsError: unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise WeightsError(f"unsupported dtype {dtype!r} (use auto, float32, bfloat16 or float16)") from None


def _our_name(config: ModelConfig, key: str) -> str | None:
    """The Decoder parameter name for checkpoint ``key``, or None for tensors we drop."""
    key = family(config.model_type).checkpoint_name(key)
    if key is None:
        return None
    if config.tie_word_embeddings and key == "lm_head.weight":   # transformers ignores it too
        return None
    return key


def load_state_dict(model_dir, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All checkpoint tensors of ``model_dir``, keyed by Decoder parameter name, CPU, file dtype.

    gpt2 checkpoints are normalised: the ``transformer.`` prefix added when absent, attention
    mask buffers dropped, Conv1D weights transposed to (out, in). A tied ``lm_head.weight`` is
    dropped. Raises WeightsError as :func:`llmsh.checkpoint.checkpoint_files`.
    """
    where, opened = open_checkpoint(model_dir)
    try:
        out = {}
        for key, f in where.items():
            ours = _our_name(config, key)
            if ours is not None:
                t = f.read(key)
                out[ours] = t.t().contiguous() if _transposed(config, ours) else t
        return out
    finally:
        for f in opened:
            f.close()


def load_decoder(model_dir, config: ModelConfig, *, device="auto", dtype="auto", fuse: bool = True,
                 quantize: str | None = None, keep_stored: bool = True) -> Decoder:
    """Build a :class:`Decoder` for ``config`` and fill it from ``model_dir``'s safetensors.

    The decoder is returned in eval mode with ``requires_grad`` off, on ``device`` in ``dtype``
    (floating tensors are cast; see :func:`resolve_device`, :func:`resolve_dtype`). With ``fuse``
    (default) llama-family q/k/v and gate/up projections are concatenated while loading
    (:meth:`Decoder.fuse_projections`): each part is read from the file straight into its rows
    of the fused tensor, so nothing is held twice. ``quantize`` ("int8" / "int4", CPU only):
    each projection and the embedding are quantized as they are read, int8 in blocks of rows
    (:mod:`llmsh.quant`), so peak memory stays near the quantized size; activations stay in
    ``dtype``. The whole checkpoint is checked (names, shapes) before anything is read.

    A folder in a GGUF's own precision (one with :data:`llmsh.gguf_precision.MANIFEST`) loads,
    on CPU without ``quantize`` and with ``keep_stored``, as stored: int4 weights into
    :class:`~llmsh.quant.Int4Linear` (with an exact float32 prefill when ``dtype`` is float32),
    int8 into :class:`~llmsh.quant.Int8Linear` / ``Int8Embedding``, widened ones into ``BF16Linear`` / ``BF16Embedding``; q/k/v and gate/up
    are fused only where their parts are stored alike; ``decoder.quantization`` is "native" and
    ``decoder.tensor_kinds`` the manifest's :func:`~llmsh.gguf_precision.summary`. Otherwise
    its int4/int8 tensors are dequantized (exactly) as they are read.

    Raises:
        WeightsError: missing or unreadable files, a missing or unexpected tensor, a shape that
            does not match the config (the tensor and file are named), or a quantization that
            the device or mode does not support.
    """
    from . import gguf_precision as gp, quant

    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    dt = resolve_dtype(dtype, dev)
    if quantize is not None:
        if quantize not in quant.MODES:
            raise WeightsError(f"unsupported quantization {quantize!r} (use int8 or int4)")
        if dev.type != "cpu":
            raise WeightsError(f"--quantize {quantize} uses PyTorch's CPU kernels; it needs --device cpu")
        fuse = True
    # A folder in a GGUF's own precision: what each stored tensor is (our names).
    manifest = gp.load_manifest(model_dir)
    stored = {}
    for hf, v in (manifest or {}).get("tensors", {}).items():
        ours = _our_name(config, hf)
        if ours is not None:
            stored[ours] = v["kind"]
    aux = {f"{hf}.{x}" for hf, v in (manifest or {}).get("tensors", {}).items() if v["kind"] in gp.QUANT_KINDS
           for x in ("scales", "zeros")}
    # Kept as stored (int4/int8/bfloat16) on CPU unless a quantization or float weights were asked for.
    native = (quantize is None and dev.type == "cpu" and keep_stored
              and any(k in (*gp.QUANT_KINDS, "bfloat16") for k in stored.values()))
    with torch.device("meta"):
        decoder = Decoder(config)
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    if native:
        _fuse_alike(decoder, stored) if fuse else None
        _swap_native(decoder, stored, dt)
    else:
        stored = {k: v for k, v in stored.items() if v in gp.QUANT_KINDS}   # dequantized on reading
        if fuse:
            decoder.fuse_projections()
        if quantize is not None:
            quant.swap_modules(decoder, quantize, dt)
    modules = dict(decoder.named_modules())

    where, opened = open_checkpoint(model_dir)
    jobs: list = []          # plain reads, run together at the end (in parallel)
    try:
        src: dict[str, tuple[CheckpointFile, str]] = {}
        for key, f in where.items():
            if key in aux:
                continue
            ours = _our_name(config, key)
            if ours is None:
                continue
            if ours not in expected:
                raise WeightsError(f"{f.path}: unexpected tensor {ours!r} for a {config.model_type} model")
            if ours in stored and stored[ours] in gp.QUANT_KINDS:
                shape = tuple(manifest["tensors"][key]["shape"])
            else:
                shape = f.shape(key)[::-1] if _transposed(config, ours) else f.shape(key)
            if shape != expected[ours]:
                raise WeightsError(f"{f.path}: tensor {ours!r} has shape {shape}, "
                                   f"config expects {expected[ours]}")
            src[ours] = (f, key)
        missing = [k for k in expected if k not in src]
        if missing:
            raise WeightsError(f"{Path(model_dir)}: tensor {missing[0]!r} missing from the checkpoint"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        # Destination tensor -> its checkpoint parts, in row order (one part unless fused).
        targets: dict[str, list[str]] = {}
        for name in expected:
            target, rank = name, 0
            for fused, members in family(config.model_type).FUSED.items():
                for j, m in enumerate(members):
                    if f".{m}." in name and name.replace(m, fused).rpartition(".")[0] in modules:
                        target, rank = name.replace(m, fused), j
            targets.setdefault(target, []).append((rank, name))
        state = {}
        for target, parts in targets.items():
            parts = [src[n] + (n,) for _, n in sorted(parts)]
            mod_name, _, attr = target.rpartition(".")
            mod = modules.get(mod_name)
            kind = stored.get(parts[0][2])
            if native and attr == "weight" and kind in gp.QUANT_KINDS:
                for k, v in _read_stored(parts, kind, dt, mod).items():
                    state[f"{mod_name}.{k}"] = v
            elif quantize is not None and attr == "weight" and isinstance(mod, (quant.Int8Linear, quant.Int8Embedding)):
                for k, v in _read_int8(parts, expected, config, dt, stored).items():
                    state[f"{mod_name}.{k}"] = v
            elif quantize is not None and attr == "weight" and isinstance(mod, quant.Int4Linear):
                w = _read(parts, expected, config, torch.float32, stored=stored)
                for k, v in quant.quantize_tensor(mod, w, dt).items():
                    state[f"{mod_name}.{k}"] = v
                del w
            else:
                floating = kind in gp.QUANT_KINDS or parts[0][0].dtype(parts[0][1]).is_floating_point
                want = torch.bfloat16 if native and kind == "bfloat16" else dt if floating else None
                t = _read(parts, expected, config, want, jobs if dev.type == "cpu" else None, stored)
                state[target] = t.to(dev)
        # Copying from the page cache is bound by one core's memcpy: read on torch's threads.
        if len(jobs) > 1 and torch.get_num_threads() > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(4, torch.get_num_threads())) as pool:
                for _ in pool.map(lambda job: job(), jobs):
                    pass
        else:
            for job in jobs:
                job()
    finally:
        for f in opened:
            f.close()
    if config.tie_word_embeddings:
        embed = f"{decoder.prefix}.{decoder.backbone.embed_name}"
        for k in [k for k in state if k.startswith(embed + ".")]:
            state["lm_head." + k.rsplit(".", 1)[1]] = state[k]
    decoder.load_state_dict(state, strict=True, assign=True)
    if isinstance(decoder.embed_tokens, quant.Int8Embedding):
        quant.tie(decoder)
    elif isinstance(decoder.embed_tokens, quant.BF16Embedding):
        if config.tie_word_embeddings:
            decoder.lm_head.weight = decoder.embed_tokens.weight
    else:
        decoder.tie_weights()
    if native:
        for m in decoder.modules():
            if "_after_load" in m.__dict__:
                m.__dict__.pop("_after_load")()
        # The RoPE tables and float32 tensors take the compute dtype; widened weights stay bfloat16.
        for m in decoder.modules():
            if not isinstance(m, quant.KEEP_DTYPE):
                m._apply(lambda t: t.to(dt) if t.is_floating_point() else t, recurse=False)
        decoder.quantization = gp.NATIVE
        decoder.tensor_kinds = gp.summary(manifest)
    else:
        decoder.to(device=dev, dtype=dt)       # the RoPE buffers (integer buffers keep their dtype)
        if manifest is not None:
            decoder.tensor_kinds = gp.summary(manifest)
    decoder.requires_grad_(False)
    decoder.compute_dtype = dt
    return decoder.eval()


def _kind_of_module(name: str, stored: dict, fused_table: dict) -> str:
    """What the weight of Linear ``name`` is stored as (fused: its members', which agree)."""
    if f"{name}.weight" in stored:
        return stored[f"{name}.weight"]
    for fused, members in fused_table.items():
        if name.endswith(fused):
            return stored.get(f"{name[:-len(fused)]}{members[0]}.weight", "float32")
    return "float32"


def _fuse_alike(decoder: Decoder, stored: dict) -> None:
    """Fuse each block's q/k/v (gate/up) where its parts are stored alike: a Q4_K_M file keeps
    some v projections in Q6_K beside Q4_K q and k, and those stay three projections."""
    table = family(decoder.config.model_type).FUSED
    if not table:
        return
    for name, mod in list(decoder.named_modules()):
        for fused, members in table.items():
            parent, _, _ = fused.rpartition(".")
            first = members[0].rpartition(".")[2]
            if not name.endswith("." + parent) or not hasattr(mod, first) or not hasattr(mod, "fuse"):
                continue
            kinds = {stored.get(f"{name}.{m.rpartition('.')[2]}.weight", "float32") for m in members}
            if len(kinds) == 1:
                mod.fuse()


def _swap_native(decoder: Decoder, stored: dict, dtype) -> None:
    """Replace each nn.Linear (and the token embedding) by the module of its stored kind:
    Int4Linear, Int8Linear, BF16Linear, or left float (see :mod:`llmsh.gguf_precision`)."""
    from torch import nn

    from . import quant

    table = family(decoder.config.model_type).FUSED
    embed_owner = decoder.backbone
    embed = f"{decoder.prefix}.{embed_owner.embed_name}"
    e_kind = stored.get(f"{embed}.weight", "float32")
    for name, mod in list(decoder.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        kind = e_kind if name == "lm_head" and decoder.config.tie_word_embeddings else \
            _kind_of_module(name, stored, table)
        k, n, bias = mod.in_features, mod.out_features, mod.bias is not None
        cls = {"int4": quant.Int4Linear, "int8": quant.Int8Linear, "bfloat16": quant.BF16Linear}.get(kind)
        if cls is None:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(decoder.get_submodule(parent) if parent else decoder, attr, cls(k, n, bias, dtype, device="meta"))
    e = getattr(embed_owner, embed_owner.embed_name)
    cls = {"int8": quant.Int8Embedding, "bfloat16": quant.BF16Embedding}.get(e_kind)
    if cls is not None:
        setattr(embed_owner, embed_owner.embed_name, cls(e.num_embeddings, e.embedding_dim, dtype, device="meta"))


def _dequantized(f: CheckpointFile, key: str, kind: str, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Rows r0…r1 of the int4/int8 weight ``key`` (our stored layout) as float32 (R, K)."""
    from .quant import unpack_int4

    if kind == "int4":
        return unpack_int4(f.read(key, r0, r1), f.read(key + ".scales", r0, r1), f.read(key + ".zeros", r0, r1))
    return f.read(key, r0, r1).float() * f.read(key + ".scales", r0, r1).float()[:, None]


def _read_stored(parts, kind: str, dtype, mod) -> dict[str, torch.Tensor]:
    """The Int4Linear / Int8Linear buffers of the weight made of ``parts`` (stacked by rows),
    from their stored int4 / int8 rows as they are (no requantization). An Int4Linear keeps
    an exact float32 prefill (:meth:`llmsh.quant.Int4Linear.exact_prefill`)."""
    from .quant import pack_int4

    def rows(suffix: str) -> torch.Tensor:      # the parts' rows read straight into one tensor
        shapes = [f.shape(key + suffix) for f, key, _ in parts]
        out = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=parts[0][0].dtype(parts[0][1] + suffix))
        r = 0
        for (f, key, _), shape in zip(parts, shapes):
            f.read_into(key + suffix, out[r:r + shape[0]])
            r += shape[0]
        return out

    q, scales = rows(""), rows(".scales")
    if kind == "int4":
        zeros = rows(".zeros")
        out = pack_int4(q, scales, zeros, dtype)
        mod.__dict__["_after_load"] = mod.exact_prefill     # once its buffers are assigned
        return out
    return {"weight": q, "scales": scales.to(dtype)}


def _read(parts, expected, config: ModelConfig, dtype, jobs: list | None = None,
          stored: dict | None = None) -> torch.Tensor:
    """One CPU tensor made of ``parts`` ((file, key, our name), stacked by rows) in ``dtype``
    (None: the file's). With ``jobs``, the reads are appended there (callables) for the caller to
    run, and the tensor is returned empty. ``stored``: our name -> "int4" / "int8" for parts kept
    quantized in the file (:mod:`llmsh.gguf_precision`), dequantized here."""
    rows = sum(expected[n][0] for _, _, n in parts) if expected[parts[0][2]] else None
    first = parts[0]
    shape = (rows, *expected[first[2]][1:]) if rows is not None else ()
    out = torch.empty(shape, dtype=dtype or first[0].dtype(first[1]))
    r = 0
    for f, key, name in parts:
        n = expected[name][0] if shape else None
        dest = out[r:r + n] if shape else out
        if stored and stored.get(name) in ("int4", "int8"):
            job = (lambda f, key, dest, kind: lambda: dest.copy_(_dequantized(f, key, kind)))(f, key, dest, stored[name])
        elif _transposed(config, name):
            job = (lambda f, key, dest: lambda: dest.copy_(f.read(key).t()))(f, key, dest)
        else:
            job = (lambda f, key, dest: lambda: f.read_into(key, dest))(f, key, dest)
        jobs.append(job) if jobs is not None else job()
        r += n or 0
    return out


def _read_int8(parts, expected, config: ModelConfig, dtype, stored: dict | None = None) -> dict[str, torch.Tensor]:
    """int8 rows and per-row scales (as :func:`llmsh.quant.quantize_int8`) of the (N, K) weight
    made of ``parts``, quantized in blocks of rows read into one float32 scratch (~4 MB)."""
    from .quant import quantize_int8_into

    n_rows = sum(expected[n][0] for _, _, n in parts)
    k = expected[parts[0][2]][1]
    q = torch.empty((n_rows, k), dtype=torch.int8)
    s = torch.empty(n_rows, dtype=dtype)
    step = max(1, (4 << 20) // (4 * k))
    scratch = torch.empty((min(step, n_rows), k), dtype=torch.float32)
    r = 0
    for f, key, name in parts:
        n = expected[name][0]
        packed = bool(stored) and stored.get(name) in ("int4", "int8")
        whole = f.read(key).t() if _transposed(config, name) and not packed else None
        for b in range(0, n, step):
            e = min(b + step, n)
            w = scratch[:e - b]
            if packed:
                w.copy_(_dequantized(f, key, stored[name], b, e))
            elif whole is not None:
                w.copy_(whole[b:e])
            elif f.dtype(key) == torch.float32:
                f._pread(key, w, b)
            else:
                w.copy_(f.read(key, b, e))
            quantize_int8_into(w, q[r + b:r + e], s[r + b:r + e])
        r += n
    return {"weight": q, "scales": s}
