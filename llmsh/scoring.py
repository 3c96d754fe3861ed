"""Scoring beyond perplexity: top-k log-probabilities, and ranking the choices of a context.

Pure engine code: numbers in, numbers out (nats). Log-probabilities are those of the model's
own distribution, ``log_softmax`` of the float32 logits (temperature 1, no sampling filters),
as OpenAI's ``top_logprobs`` and llama.cpp's ``n_probs`` report them.

Choices follow llama-perplexity's ``--hellaswag`` (llama.cpp tools/perplexity,
``hellaswag_score``): every choice is tokenized together with its context, the longest prefix of
token ids common to all choices is the shared context, and a choice's log-probability is the sum
over its tokens after that prefix. Here the prefix runs once, its KV cache is copied to one row
per choice, and the choices run as one right-padded batch over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError

# float32 logits held at once when scoring choices (bytes): B choices x L tokens x V.
_CHOICE_LOGIT_BUDGET_BYTES = 1 << 28


def top_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` most likely tokens at each position.

    logits: (..., V) float. Returns (logprobs, ids), each (..., min(k, V)): float32 nats sorted
    from the most likely, and int64 token ids.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.topk(logp, min(k, logp.shape[-1]), dim=-1)


class TopLogprobs:
    """An ``observe`` callback for :mod:`llmsh.perplexity`: keeps each scored position's top ``k``
    as ``[(id, logprob), ...]`` in :attr:`rows`, in the protocol's scoring order."""

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.rows: list[list[tuple[int, float]]] = []

    def __call__(self, logits: Tensor, targets: Tensor) -> None:
        lp, ids = top_logprobs(logits, self.k)
        for row_lp, row_ids in zip(lp.tolist(), ids.tolist()):
            self.rows.append(list(zip(row_ids, row_lp)))


class GeneratedLogprobs:
    """An ``on_logits`` callback for :func:`llmsh.generate.generate_tokens`: for each generated
    token, in order, ``(id, logprob, [(id, logprob), ...])`` in :attr:`rows`: its log-probability
    and the ``k`` most likely tokens at its position (none for k 0), nats, under the model's own
    distribution (log-softmax of the float32 logits, before temperature, repetition penalty and
    the top-k/top-p/min-p filters), as OpenAI's ``logprobs``/``top_logprobs``."""

    def __init__(self, k: int = 0):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k
        self.rows: list[tuple[int, float, list[tuple[int, float]]]] = []

    def __call__(self, logits: Tensor, token: int) -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = []
        if self.k:
            lp, ids = torch.topk(logp, min(self.k, logp.shape[-1]))
            top = list(zip(ids.tolist(), lp.tolist()))
        self.rows.append((int(token), float(logp[token]), top))    # one append: whole rows only


@dataclass
class ChoiceScore:
    """One choice: logprob (sum over its n_tokens scored tokens, nats); n_bytes its UTF-8 length
    (set by the caller; 0: unknown). Derived: per token and per byte (nats), NaN when undefined."""

    logprob: float
    n_tokens: int
    n_bytes: int = 0

    @property
    def logprob_per_token(self) -> float:
        return self.logprob / self.n_tokens if self.n_tokens else float("nan")

    @property
    def logprob_per_byte(self) -> float:
        return self.logprob / self.n_bytes if self.n_bytes else float("nan")


def common_prefix_all(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by every sequence of ``seqs``."""
    n = min(len(s) for s in seqs)
    i = 0
    while i < n and all(s[i] == seqs[0][i] for s in seqs):
        i += 1
    return i


def _device_of(decoder) -> torch.device:
    p = next(iter(decoder.parameters()), None) if hasattr(decoder, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def score_choices(decoder, seqs: Sequence[Sequence[int]], *, context_len: int | None = None,
                  max_len: int | None = None, batch_size: int | None = None,
                  pad_id: int = 0) -> list[ChoiceScore]:
    """Log-probability of each choice given the shared context (llama.cpp's hellaswag scoring).

    seqs: each choice's full token ids (context + choice, tokenized together). The common
    prefix P = :func:`common_prefix_all`, at most ``context_len`` (the context's own tokens:
    without it, choices that start alike share their first tokens unscored, as in llama.cpp),
    is scored from: P is run once into a KV cache (1, P); the cache is copied
    into one row per choice and the choices' remaining tokens run as a right-padded batch
    (padding needs no mask: it comes after every scored position of a causal decoder).
    batch_size: choices per forward pass (default: as many as ~256 MiB of logits allow).
    Returns one :class:`ChoiceScore` per sequence, in order (n_bytes 0).

    Raises InputError when P is 0 (nothing to predict the first token from), when a sequence has
    no token after P (a choice that is empty or a prefix of every other) or P plus the longest
    choice exceeds ``max_len`` (the model's context).
    """
    seqs = [list(s) for s in seqs]
    if not seqs:
        raise InputError("no choices to score")
    p = common_prefix_all(seqs)
    if context_len is not None:
        p = min(p, context_len)
    if p == 0:
        raise InputError("the context has no tokens (give a context, or a model that adds BOS)")
    tails = [s[p:] for s in seqs]
    if any(not t for t in tails):
        raise InputError("a choice adds no tokens to the context (empty, or the start of every other)")
    width = max(len(t) for t in tails)
    if max_len is not None and p + width > max_len:
        raise InputError(f"context and choice take {p + width} tokens, more than the model's "
                         f"context ({max_len})")
    device = _device_of(decoder)
    vocab = decoder.config.vocab_size
    b = batch_size or max(1, _CHOICE_LOGIT_BUDGET_BYTES // (width * vocab * 4))
    b = min(b, len(seqs))
    cache = decoder.new_cache(p + width, batch_size=b)
    prefix = torch.as_tensor(seqs[0][:p], dtype=torch.long, device=device)[None]
    first = torch.log_softmax(decoder(prefix, cache, last_only=True)[0, -1].float(), -1)   # (V,)
    cache.repeat_first_row()
    out = []
    for g0 in range(0, len(tails), b):
        group = tails[g0: g0 + b]
        batch = torch.full((len(group), width), pad_id, dtype=torch.long)
        for row, t in enumerate(group):
            batch[row, : len(t)] = torch.as_tensor(t)
        batch = batch.to(device)
        cache.trim(p)
        if width > 1:
            logits = decoder(batch[:, :-1], cache)                  # (G, width-1, V)
            logp = torch.log_softmax(logits.float(), -1)
            rest = logp.gather(-1, batch[:, 1:, None]).squeeze(-1).double()   # (G, width-1)
        for row, t in enumerate(group):
            total = float(first[t[0]].double())
            if len(t) > 1:
                total += float(rest[row, : len(t) - 1].sum())
            out.append(ChoiceScore(total, len(t)))
    return out
