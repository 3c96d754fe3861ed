"""A safetensors checkpoint on disk: which file holds each tensor, and reading tensors by ``pread``.

A checkpoint is ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> shard file), as written by transformers' ``save_pretrained``.
Headers are validated by the safetensors library first, then offsets again here; nothing is
unpickled and nothing is memory-mapped.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from pathlib import Path

import torch

from .errors import WeightsError


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


def _short(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


_FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointFile:
    """A safetensors file read with ``pread`` straight into tensors we allocate (no mmap).

    Memory-mapped tensors count in the process's RSS once touched, next to any copy made from
    them (fusing, quantizing): reading into the destination keeps every weight in memory once
    and lets a quantized load keep only a small float block at a time. The header was already
    validated by safetensors in :func:`checkpoint_files`; offsets are checked again here.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            n = struct.unpack("<Q", os.pread(self.fd, 8, 0))[0]
            header = json.loads(os.pread(self.fd, n, 8))
            header.pop("__metadata__", None)
            self.base, self.info = 8 + n, header
            for key, h in header.items():
                dt = _FILE_DTYPES[h["dtype"]]
                begin, end = h["data_offsets"]
                numel = math.prod(h["shape"])
                if end - begin != numel * dt.itemsize or self.base + end > size:
                    raise ValueError(f"tensor {key!r} lies outside the file")
        except Exception as e:
            os.close(self.fd)
            raise WeightsError(f"{path}: corrupt or truncated safetensors file ({_short(e)})") from None

    def close(self) -> None:
        os.close(self.fd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.info[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _FILE_DTYPES[self.info[key]["dtype"]]

    def read(self, key: str, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0..r1 of tensor ``key`` (all by default) as a new CPU tensor in the file's dtype."""
        shape = self.shape(key)
        if not shape:
            out = torch.empty((), dtype=self.dtype(key))
            self._pread(key, out, 0)
            return out
        r1 = shape[0] if r1 is None else r1
        out = torch.empty((r1 - r0, *shape[1:]), dtype=self.dtype(key))
        self._pread(key, out, r0)
        return out

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous, CPU, the tensor's shape) with tensor ``key``, casting in
        blocks of rows (about 8 MB) when the dtypes differ."""
        if out.dtype == self.dtype(key):
            return self._pread(key, out, 0)
        if out.dim() == 0:
            return out.copy_(self.read(key))
        step = max(1, (8 << 20) // max(1, out[0].numel() * self.dtype(key).itemsize))
        for r in range(0, out.shape[0], step):
            out[r:r + step].copy_(self.read(key, r, min(r + step, out.shape[0])))

    def _pread(self, key: str, out: torch.Tensor, r0: int) -> None:
        nbytes = out.numel() * out.element_size()
        if nbytes == 0:
            return
        row = out[0].numel() * out.element_size() if out.dim() else 0
        pos = self.base + self.info[key]["data_offsets"][0] + r0 * row
        view = memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")
        done = 0
        while done < nbytes:
            n = os.preadv(self.fd, [view[done:]], pos + done)
            if n <= 0:
                raise WeightsError(f"{self.path}: corrupt or truncated safetensors file "
                                   f"(tensor {key!r} ends early)")
            done += n


def open_checkpoint(model_dir) -> tuple[dict[str, "CheckpointFile"], list["CheckpointFile"]]:
    """Open every file of the checkpoint: (tensor name -> its open file, the open files to close).

    Raises:
        WeightsError: as :func:`checkpoint_files`, or a header :class:`CheckpointFile` rejects.
    """
    files = checkpoint_files(model_dir)
    opened: dict[Path, CheckpointFile] = {}
    try:
        for f in dict.fromkeys(files.values()):
            opened[f] = CheckpointFile(f)
    except WeightsError:
        for o in opened.values():
            o.close()
        raise
    return {key: opened[f] for key, f in files.items()}, list(opened.values())
