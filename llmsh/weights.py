"""Load safetensors checkpoints into a :class:`llmsh.model.Decoder`, strictly, without pickle.

A checkpoint is ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> shard file), as written by transformers' ``save_pretrained``.
Tensors are read one at a time through ``safetensors.safe_open`` (memory-mapped) and cast as
they are read; the decoder is built on the meta device and the tensors are assigned to it, so
peak memory is the converted weights plus one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import WeightsError
from .model import Decoder

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# gpt2 stores these as Conv1D weights, (in, out); our nn.Linear wants (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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


def checkpoint_files(model_dir) -> dict[str, Path]:
    """Map every tensor name in the checkpoint of ``model_dir`` to the file that holds it.

    Raises:
        WeightsError: no model.safetensors / index, an unreadable index, a missing shard,
            or a corrupt or truncated safetensors file (named).
    """
    d = Path(model_dir)
    index, single = d / "model.safetensors.index.json", d / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = {name: d / f for name, f in weight_map.items()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e})") from None
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise WeightsError(f"{f}: shard listed in {index.name} is missing")
            stored = _keys(f)
            missing = [n for n, g in files.items() if g == f and n not in stored]
            if missing:
                raise WeightsError(f"{f}: tensor {missing[0]!r} listed in {index.name} is not in the file")
        return files
    if single.is_file():
        return {name: single for name in _keys(single)}
    if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
        raise WeightsError(f"{d}: only pickle checkpoints (.bin/.pt) found; llmsh loads safetensors only")
    raise WeightsError(f"{d}: no model.safetensors or model.safetensors.index.json")


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise WeightsError(f"{path}: corrupt or truncated safetensors file ({_short(e)})") from None


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _file_dtype_is(path: Path, dtype: torch.dtype) -> bool:
    """Whether every floating tensor of the safetensors file ``path`` is stored as ``dtype``."""
    from safetensors import safe_open

    want = _ST_DTYPES.get(dtype)
    try:
        with safe_open(str(path), framework="pt") as f:
            kinds = {f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as e:
        raise WeightsError(f"{path}: corrupt or truncated safetensors file ({_short(e)})") from None
    return all(k == want or not k.startswith(("F", "BF")) for k in kinds)


def _short(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _our_name(config: ModelConfig, key: str) -> str | None:
    """The Decoder parameter name for checkpoint ``key``, or None for tensors we drop."""
    if config.is_gpt2:
        if key.endswith((".attn.bias", ".attn.masked_bias")):   # old causal-mask buffers
            return None
        if not key.startswith(("transformer.", "lm_head.")):     # original gpt2 has no prefix
            key = "transformer." + key
    elif key.endswith("rotary_emb.inv_freq"):                    # old llama checkpoints
        return None
    if config.tie_word_embeddings and key == "lm_head.weight":   # transformers ignores it too
        return None
    return key


def _iter_tensors(model_dir, config: ModelConfig, convert=None, reopen=False):
    """Yield (our name, tensor, file) for every kept checkpoint tensor, ``convert``-ed if given.

    Tensors come memory-mapped on CPU in the file's dtype. With ``reopen`` the file is opened
    per tensor: a mapping lives while any tensor from it does, so when tensors are converted
    (copied) a single handle would keep every page already read resident next to the copies.
    """
    from safetensors import safe_open

    files = checkpoint_files(model_dir)
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)

    def read(sf, f, key, ours):
        try:
            t = sf.get_tensor(key)
        except Exception as e:
            raise WeightsError(f"{f}: cannot read tensor {key!r} ({_short(e)})") from None
        if config.is_gpt2 and ours.endswith(_CONV1D):
            t = t.t()
        return convert(ours, t, f) if convert is not None else t

    for f, names in by_file.items():
        keys = [(k, _our_name(config, k)) for k in names]
        keys = [(k, o) for k, o in keys if o is not None]
        try:
            if not reopen:
                with safe_open(str(f), framework="pt") as sf:
                    for key, ours in keys:
                        yield ours, read(sf, f, key, ours), f
            else:
                for key, ours in keys:
                    with safe_open(str(f), framework="pt") as sf:
                        t = read(sf, f, key, ours)
                    yield ours, t, f
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(f"{f}: corrupt or truncated safetensors file ({_short(e)})") from None


def load_state_dict(model_dir, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All checkpoint tensors of ``model_dir``, keyed by Decoder parameter name, CPU, file dtype.

    gpt2 checkpoints are normalised: the ``transformer.`` prefix added when absent, attention
    mask buffers dropped, Conv1D weights transposed to (out, in). A tied ``lm_head.weight`` is
    dropped. Raises WeightsError as :func:`checkpoint_files`.
    """
    return {name: t for name, t, _ in _iter_tensors(model_dir, config)}


def _fuse_stream(stream, config: ModelConfig):
    """Re-yield (name, tensor, file) from ``stream`` with each layer's q/k/v and gate/up tensors
    concatenated into ``qkv_proj`` / ``gate_up_proj`` (see :data:`llmsh.model.FUSED`) as soon as
    a group is complete, so only one layer's parts wait in memory. Incomplete groups are left
    for the caller's missing-tensor check (they are yielded unfused at the end)."""
    from .model import FUSED

    parts: dict[str, tuple[str, str, int]] = {}     # HF name -> (fused name, suffix, index)
    if not config.is_gpt2:
        for i in range(config.num_hidden_layers):
            for fused, members in FUSED.items():
                for j, m in enumerate(members):
                    for suffix in ("weight", "bias"):
                        parts[f"model.layers.{i}.{m}.{suffix}"] = (f"model.layers.{i}.{fused}.{suffix}", suffix, j)
    pending: dict[str, dict[int, tuple[str, torch.Tensor, Path]]] = {}
    for name, t, f in stream:
        if name not in parts:
            yield name, t, f
            continue
        fused, _, j = parts[name]
        group = pending.setdefault(fused, {})
        group[j] = (name, t, f)
        n = len(FUSED[fused.split(".", 3)[3].rsplit(".", 1)[0]])
        if len(group) == n:
            del pending[fused]
            yield fused, torch.cat([group[k][1] for k in range(n)]), f
            del group
    for group in pending.values():
        yield from group.values()


def load_decoder(model_dir, config: ModelConfig, *, device="auto", dtype="auto", fuse: bool = True,
                 quantize: str | None = None) -> Decoder:
    """Build a :class:`Decoder` for ``config`` and fill it from ``model_dir``'s safetensors.

    The decoder is returned in eval mode with ``requires_grad`` off, on ``device`` in ``dtype``
    (floating tensors are cast; see :func:`resolve_device`, :func:`resolve_dtype`). With ``fuse``
    (default) llama-family q/k/v and gate/up projections are concatenated while loading
    (:meth:`Decoder.fuse_projections`); the checkpoint is still checked against the HF names.
    ``quantize`` ("int8" / "int4", CPU only): each projection and the embedding are quantized as
    they are read (:mod:`llmsh.quant`), so peak memory stays near the quantized size; activations
    stay in ``dtype``.

    Raises:
        WeightsError: missing or unreadable files, a missing or unexpected tensor, a shape that
            does not match the config (the tensor and file are named), or a quantization that
            the device or mode does not support.
    """
    from . import quant

    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    dt = resolve_dtype(dtype, dev)
    if quantize is not None:
        if quantize not in quant.MODES:
            raise WeightsError(f"unsupported quantization {quantize!r} (use int8 or int4)")
        if dev.type != "cpu":
            raise WeightsError(f"--quantize {quantize} uses PyTorch's CPU kernels; it needs --device cpu")
        fuse = True
    with torch.device("meta"):
        decoder = Decoder(config)
    expected = {k: v.shape for k, v in decoder.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    if fuse:
        decoder.fuse_projections()
    if quantize is not None:
        quant.swap_modules(decoder, quantize, dt)
    modules = dict(decoder.named_modules())

    def convert(name, t, f):
        if name not in expected:
            raise WeightsError(f"{f}: unexpected tensor {name!r} for a {config.model_type} model")
        if tuple(t.shape) != tuple(expected[name]):
            raise WeightsError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, "
                               f"config expects {tuple(expected[name])}")
        if t.is_floating_point() and quantize is None:
            t = t.to(device=dev, dtype=dt)
        return t if t.is_contiguous() else t.contiguous()

    # Without a cast, tensors stay memory-mapped (shared with the page cache, one map per file);
    # fusing or quantizing copies, so then each tensor gets its own map, dropped once copied.
    in_place = dev.type == "cpu" and not (fuse and decoder.fused) and quantize is None and all(
        _file_dtype_is(f, dt) for f in set(checkpoint_files(model_dir).values()))
    stream = _iter_tensors(model_dir, config, convert, reopen=not in_place)
    if decoder.fused:
        stream = _fuse_stream(stream, config)
    state, seen = {}, set()
    for name, t, f in stream:
        seen.add(name)
        mod_name, _, attr = name.rpartition(".")
        mod = modules.get(mod_name)
        if quantize is not None and attr == "weight" and isinstance(
                mod, (quant.Int8Linear, quant.Int4Linear, quant.Int8Embedding)):
            for k, v in quant.quantize_tensor(mod, t, dt).items():
                state[f"{mod_name}.{k}"] = v
        elif t.is_floating_point() and quantize is not None:
            state[name] = t.to(dtype=dt)
        else:
            state[name] = t
        del t
    have = set(state) | seen
    from .model import FUSED

    def present(k):
        if k in have:
            return True
        for fused, members in FUSED.items():
            for m in members:
                if f".{m}." in k and k.replace(m, fused) in have:
                    return True
        return False

    missing = [k for k in expected if not present(k)]
    if missing:
        raise WeightsError(f"{Path(model_dir)}: tensor {missing[0]!r} missing from the checkpoint"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if config.tie_word_embeddings:
        embed = "transformer.wte" if config.is_gpt2 else "model.embed_tokens"
        for k in [k for k in state if k.startswith(embed + ".")]:
            state["lm_head." + k.rsplit(".", 1)[1]] = state[k]
    decoder.load_state_dict(state, strict=True, assign=True)
    decoder.tie_weights() if quantize is None else quant.tie(decoder)
    decoder.to(device=dev, dtype=dt)       # the RoPE buffers (integer buffers keep their dtype)
    decoder.requires_grad_(False)
    decoder.compute_dtype = dt
    return decoder.eval()

