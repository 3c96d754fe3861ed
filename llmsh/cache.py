"""Preallocated key/value cache for the decoder, owned by the caller.

Like gpt-fast's static KV cache: one (B, n_kv, max_seq_len, head_dim) buffer per layer for keys
and one for values, plus an ``offset`` counting the valid positions. Trimming is O(1) (only the
offset moves), which is what undo and prefix reuse across chat turns need.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of ``num_layers`` layers for up to ``max_seq_len`` positions.

    Buffers are allocated with ``torch.empty`` (pages are touched only as positions are
    written), and positions at or after ``offset`` are never read.

    Attributes:
        offset: number of valid positions (tokens) already in the cache.
        max_seq_len: capacity in positions.
        batch_size: the batch the buffers were allocated for; a smaller batch uses the first rows.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, *, dtype: torch.dtype, device) -> None:
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.offset = 0
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size

    @classmethod
    def for_model(cls, config, max_seq_len: int, batch_size: int = 1, *, dtype: torch.dtype,
                  device) -> "KVCache":
        """A cache shaped for ``config`` (a :class:`llmsh.config.ModelConfig`)."""
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, max_seq_len,
                   config.head_dim, dtype=dtype, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, head_dim) at positions [offset, offset+T) of ``layer``.

        Returns views of all valid keys and values, (B, n_kv, offset+T, head_dim). Does not
        advance ``offset`` (the decoder calls :meth:`advance` once after all layers).

        Raises:
            ValueError: the write would go past ``max_seq_len`` or the batch is too large.
        """
        b, end = k.shape[0], self.offset + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_seq_len {self.max_seq_len}")
        if b > self.batch_size:
            raise ValueError(f"batch {b} larger than the cache's batch {self.batch_size}")
        kc, vc = self.k[layer][:b], self.v[layer][:b]
        kc[:, :, self.offset:end] = k
        vc[:, :, self.offset:end] = v
        return kc[:, :, :end], vc[:, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions valid (after every layer has been updated)."""
        if self.offset + n > self.max_seq_len:
            raise ValueError(f"KV cache overflow: {self.offset + n} > {self.max_seq_len}")
        self.offset += n

    def trim(self, n: int) -> None:
        """Keep the first ``n`` positions (0 <= n <= offset); later writes overwrite the rest."""
        if not 0 <= n <= self.offset:
            raise ValueError(f"cannot trim a cache of {self.offset} positions to {n}")
        self.offset = n

    def repeat_first_row(self) -> None:
        """Copy row 0's valid positions into every other row, so that several continuations of one
        prefix can run as a batch over it (prefix run once with batch 1, then B rows)."""
        for t in self.k + self.v:
            t[1:, :, : self.offset] = t[:1, :, : self.offset]

    def reset(self) -> None:
        """Forget every position."""
        self.trim(0)

    @property
    def remaining(self) -> int:
        """Positions still free."""
        return self.max_seq_len - self.offset

    @property
    def nbytes(self) -> int:
        """Bytes allocated for all keys and values."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
