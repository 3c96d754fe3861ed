"""Perplexity protocols: llama.cpp's ``llama-perplexity``, Hugging Face's sliding window, per line.

All three score token ``t`` with the negative log-likelihood (nats) of ``ids[t]`` under the
logits of position ``t - 1``. Logits arrive in float32 from the decoder; ``logsumexp`` and the
gather run only on the scored positions, so no second (batch, n_ctx, V) tensor is made.
Sums are accumulated in float64, as llama.cpp does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .errors import InputError

# Bytes of float32 logits held per forward pass when batch_size is automatic. On a CPU, batching
# windows buys no speed (a 512-token pass already runs the GEMMs at full rate; default model,
# 8 windows: 1 per pass 804-835 tok/s, 4 per pass 738-867) but costs memory, hence one window
# of a 49k vocabulary there; GPUs get 1 GiB.
_LOGIT_BUDGET_BYTES_CPU = 1 << 26
_LOGIT_BUDGET_BYTES_GPU = 1 << 30


@dataclass
class PerplexityResult:
    """Totals of one scoring run; the last four fields are derived from the others.

    nll_sum / nll_sq_sum: sum of per-token NLL and NLL² (nats); n_tokens: tokens scored;
    protocol: "llamacpp", "llamacpp-all", "sliding" or "line"; n_ctx: window length (tokens);
    n_bytes: UTF-8 bytes of the text (0 if unknown); n_predictable: tokens of the text that could be
    scored (len(ids) - 1). perplexity = exp(nll); stderr = perplexity·sqrt((mean(NLL²) −
    mean(NLL)²)/(N − 1)) (llama-perplexity's "±"); nll: mean NLL (nats); bits_per_byte: sum of
    NLL / (ln 2 · n_bytes), with the sum extrapolated from the scored tokens to all
    ``n_predictable`` tokens when a protocol scores only some (llamacpp); NaN without bytes.
    token_ids / token_nll / token_positions (only with ``per_token=True``): each scored token's
    id, NLL and index in ``ids``, in scoring order.
    """

    nll_sum: float
    n_tokens: int
    nll_sq_sum: float
    protocol: str
    n_ctx: int
    n_bytes: int = 0
    n_predictable: int = 0
    stride: int | None = None
    token_ids: list[int] | None = field(default=None, repr=False)
    token_nll: list[float] | None = field(default=None, repr=False)
    token_positions: list[int] | None = field(default=None, repr=False)
    perplexity: float = field(init=False)
    stderr: float = field(init=False)
    nll: float = field(init=False)
    bits_per_byte: float = field(init=False)

    def __post_init__(self) -> None:
        n = self.n_tokens
        self.nll = self.nll_sum / n if n else math.nan
        self.perplexity = math.exp(self.nll) if n else math.nan
        if n > 1:
            var = max(self.nll_sq_sum / n - self.nll * self.nll, 0.0)
            self.stderr = self.perplexity * math.sqrt(var / (n - 1))
        else:
            self.stderr = math.nan
        if n and self.n_bytes > 0:
            total = self.nll * max(self.n_predictable, n)
            self.bits_per_byte = total / (math.log(2) * self.n_bytes)
        else:
            self.bits_per_byte = math.nan

    def summary(self, source: str | None) -> dict:
        """The result object of ``llmsh perplexity --json`` and the server's ``/perplexity``:
        source, perplexity, stderr, nll, bits_per_byte (None where NaN), n_tokens, n_ctx,
        protocol and, for the sliding protocol, stride."""
        def finite(x):
            return None if x is None or not math.isfinite(x) else x

        return {"source": source, "perplexity": finite(self.perplexity), "stderr": finite(self.stderr),
                "nll": finite(self.nll), "bits_per_byte": finite(self.bits_per_byte),
                "n_tokens": self.n_tokens, "n_ctx": self.n_ctx, "protocol": self.protocol,
                **({"stride": self.stride} if self.stride else {})}

    def to_dict(self) -> dict:
        """The totals and derived values, without the per-token lists."""
        d = asdict(self)
        for k in ("token_ids", "token_nll", "token_positions"):
            d.pop(k)
        return d


def combine(results: Sequence[PerplexityResult], protocol: str | None = None) -> PerplexityResult:
    """One result pooling every token of ``results`` (the "total" line over several files)."""
    if not results:
        raise ValueError("combine() needs at least one result")
    return PerplexityResult(
        nll_sum=sum(r.nll_sum for r in results), n_tokens=sum(r.n_tokens for r in results),
        nll_sq_sum=sum(r.nll_sq_sum for r in results), protocol=protocol or results[0].protocol,
        n_ctx=results[0].n_ctx, n_bytes=sum(r.n_bytes for r in results),
        n_predictable=sum(r.n_predictable for r in results), stride=results[0].stride)


Observer = Callable[[Tensor, Tensor], None]


class ScoringInterrupted(KeyboardInterrupt):
    """Ctrl-C (KeyboardInterrupt) while scoring, carrying what was scored before it.

    partial: a :class:`PerplexityResult` of the tokens scored before the interruption (per-token
    lists included when asked; ``observe`` may have seen one batch more), or for :func:`perplexity_lines` a list with one result per text
    scored and None for the others; planned: the tokens the whole run would have scored. A
    KeyboardInterrupt still, so a caller that does not look at it exits as on any Ctrl-C.
    Not raised for a sharded run (the other ranks' parts cannot be gathered then): that re-raises
    the plain KeyboardInterrupt.
    """

    def __init__(self, partial, planned: int):
        super().__init__()
        self.partial, self.planned = partial, planned


@contextlib.contextmanager
def _partial_on_interrupt(partial: Callable[[], object], planned: int, shard=None):
    try:
        yield
    except ScoringInterrupted:
        raise
    except KeyboardInterrupt:
        if shard is not None:
            raise
        raise ScoringInterrupted(partial(), planned) from None


class _Turns:
    """Which batches this rank computes when scoring is sharded over ranks (data parallel):
    batch k belongs to rank k mod world. Without a shard every batch is this process's."""

    def __init__(self, shard=None):
        self.shard, self.step = shard, -1

    def __call__(self) -> bool:
        """Move to the next batch; True if this rank computes it."""
        self.step += 1
        return self.shard is None or self.step % self.shard.world == self.shard.rank


class _Acc:
    """float64 running sums, plus per-token lists when asked.

    Sharded (``shard``: a :class:`llmsh.distributed.Dist`), each rank keeps the partial sums of
    its own batches; :meth:`result` gathers them and adds them in batch order, so the totals are
    those of one process to the last bit (given the same logits). ``observe(logits, targets)`` (the
    scored positions' float32 logits (N, V) and target ids (N,), in scoring order) sees every
    batch, for what needs the whole distribution (top logprobs, KL divergence: llmsh.scoring);
    it cannot be combined with a shard (it would see this rank's batches only).
    """

    def __init__(self, per_token: bool, shard=None, observe: Observer | None = None):
        if shard is not None and observe is not None:
            raise ValueError("observe needs every batch: it does not work with a shard")
        self.observe = observe
        # (sum, sum of squares, count), replaced in one assignment so that a Ctrl-C between two
        # statements never leaves a count that disagrees with its sums.
        self.sums = (0.0, 0.0, 0)
        self.per = ([], [], []) if per_token else None
        self.turns = _Turns(shard)
        self.parts: list = []

    def add(self, logits: Tensor, targets: Tensor, positions: Tensor | None = None) -> None:
        """logits (..., V) float at the scoring positions, targets (...) the ids they predict."""
        x = logits.float()
        if self.observe is not None:
            self.observe(x.reshape(-1, x.shape[-1]), targets.reshape(-1))
        nll = (torch.logsumexp(x, -1) - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).double().flatten()
        per = None
        if self.per is not None:
            per = (targets.flatten().tolist(), nll.tolist(), positions.flatten().tolist())
        self._add(float(nll.sum()), float((nll * nll).sum()), nll.numel(), per)

    def _add(self, s: float, s2: float, n: int, per) -> None:
        if self.turns.shard is not None:
            self.parts.append((self.turns.step, s, s2, n, per))
            return
        if per is not None:    # before the count: result() cuts the lists to it
            for mine, new in zip(self.per, per):
                mine.extend(new)
        t = self.sums
        self.sums = (t[0] + s, t[1] + s2, t[2] + n)

    def result(self, **kw) -> PerplexityResult:
        shard = self.turns.shard
        if shard is not None:       # every rank's parts, replayed in batch order
            parts = sorted((p for rank in shard.gather(self.parts) for p in rank), key=lambda p: p[0])
            self.turns.shard, self.parts = None, []
            for _, s, s2, n, per in parts:
                self._add(s, s2, n, per)
        s, s2, n = self.sums
        ids, nll, pos = (lst[:n] for lst in self.per) if self.per is not None else (None, None, None)
        return PerplexityResult(nll_sum=s, n_tokens=n, nll_sq_sum=s2,
                                token_ids=ids, token_nll=nll, token_positions=pos, **kw)


def _device_of(decoder) -> torch.device:
    p = next(iter(decoder.parameters()), None) if hasattr(decoder, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def _auto_batch(decoder, n_scored: int) -> int:
    """Windows per forward pass so that their ``n_scored`` logits each fit the budget."""
    vocab = getattr(getattr(decoder, "config", None), "vocab_size", None) or 32000
    cpu = _device_of(decoder).type == "cpu"
    budget = _LOGIT_BUDGET_BYTES_CPU if cpu else _LOGIT_BUDGET_BYTES_GPU
    return max(1, min(16, budget // (max(n_scored, 1) * vocab * 4)))


def _as_tensor(ids) -> Tensor:
    return torch.as_tensor(ids, dtype=torch.long).flatten().cpu()


@torch.no_grad()
def perplexity_llamacpp(decoder, ids: Sequence[int] | Tensor, n_ctx: int, *, bos_id: int | None = None,
                        all_tokens: bool = False, batch_size: int | None = None, n_bytes: int = 0,
                        per_token: bool = False, observe: Observer | None = None,
                        progress: Callable[[int, int], None] | None = None, shard=None) -> PerplexityResult:
    """Perplexity as ``llama-perplexity`` computes it (llama.cpp tools/perplexity, ``perplexity()``).

    ids: the whole text's token ids (BOS first if the tokenizer adds one). The text is cut into
    floor(len(ids)/n_ctx) consecutive, non-overlapping windows of ``n_ctx`` tokens (the tail is
    dropped); with ``bos_id`` the first token of each window is replaced by BOS; each window is
    evaluated from scratch (no cache); logits at positions n_ctx//2 … n_ctx−2 are scored against
    the next token (255 per window at n_ctx 512), or positions 0 … n_ctx−2 with ``all_tokens``.
    ``batch_size`` windows go through one forward pass (default: as many as fit ~256 MiB of
    logits). ``progress(done, total)`` is called after each batch of windows. ``shard`` (a
    :class:`llmsh.distributed.Dist`): this rank computes every world-th batch and the result,
    the same on every rank, is one process's (see :class:`_Acc`); ``observe``: see :class:`_Acc`
    (it sees the positions in the order of ``token_positions``). A Ctrl-C (KeyboardInterrupt)
    while scoring becomes :class:`ScoringInterrupted` with the result so far.
    Raises InputError when there are fewer than 2·n_ctx tokens (llama.cpp's requirement).
    """
    if n_ctx < 2:
        raise InputError(f"n_ctx must be at least 2, got {n_ctx}")
    ids = _as_tensor(ids)
    n = ids.numel()
    if n < 2 * n_ctx:
        raise InputError(f"input has {n} tokens but perplexity with n_ctx {n_ctx} needs at least {2 * n_ctx}")
    n_chunks = n // n_ctx
    first = 0 if all_tokens else n_ctx // 2
    batch_size = batch_size or _auto_batch(decoder, n_ctx - first)
    device = _device_of(decoder)
    windows = ids[: n_chunks * n_ctx].view(n_chunks, n_ctx)
    acc = _Acc(per_token, shard, observe)
    kw = dict(protocol="llamacpp-all" if all_tokens else "llamacpp", n_ctx=n_ctx, n_bytes=n_bytes,
              n_predictable=n - 1)
    with _partial_on_interrupt(lambda: acc.result(**kw), n_chunks * (n_ctx - 1 - first), shard):
        for b0 in range(0, n_chunks, batch_size):
            if not acc.turns():
                if progress is not None:
                    progress(min(b0 + batch_size, n_chunks), n_chunks)
                continue
            chunk = windows[b0: b0 + batch_size]
            targets = chunk[:, first + 1:]
            batch = chunk.clone()
            if bos_id is not None:
                batch[:, 0] = bos_id
            logits = decoder(batch.to(device), None, logits_from=first)    # positions first … n_ctx−1
            positions = None
            if per_token:
                starts = torch.arange(b0, b0 + chunk.shape[0]).unsqueeze(1) * n_ctx
                positions = starts + torch.arange(first + 1, n_ctx)
            acc.add(logits[:, : n_ctx - 1 - first], targets.to(logits.device), positions)
            del logits
            if progress is not None:
                progress(min(b0 + batch_size, n_chunks), n_chunks)
    return acc.result(**kw)


@torch.no_grad()
def perplexity_sliding(decoder, ids: Sequence[int] | Tensor, n_ctx: int, stride: int, *,
                       batch_size: int | None = None, n_bytes: int = 0, per_token: bool = False,
                       observe: Observer | None = None,
                       progress: Callable[[int, int], None] | None = None, shard=None) -> PerplexityResult:
    """Hugging Face's sliding-window perplexity ("Perplexity of fixed-length models").

    Windows of up to ``n_ctx`` tokens start every ``stride`` tokens (the last one ends at the end
    of the text); each window scores only the tokens that no earlier window scored, so every token
    after the first is scored exactly once with up to n_ctx − stride tokens of extra context.
    Unlike the docs' loop, which weights each window's mean loss by (scored − 1), the mean here is
    over exactly the scored tokens. Full-length windows are batched ``batch_size`` at a time.
    ``shard``, ``observe``, Ctrl-C: as :func:`perplexity_llamacpp`.
    Raises InputError for fewer than 2 tokens or a stride outside 1 … n_ctx.
    """
    ids = _as_tensor(ids)
    n = ids.numel()
    if n < 2:
        raise InputError(f"input has {n} tokens but perplexity needs at least 2")
    if n_ctx < 2:
        raise InputError(f"n_ctx must be at least 2, got {n_ctx}")
    if not 1 <= stride <= n_ctx:
        raise InputError(f"stride must be between 1 and n_ctx ({n_ctx}), got {stride}")
    # (begin, end, first scored target index) per window, as in the docs' loop.
    spans = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + n_ctx, n)
        spans.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    batch_size = batch_size or _auto_batch(decoder, n_ctx)
    device = _device_of(decoder)
    acc = _Acc(per_token, shard, observe)
    kw = dict(protocol="sliding", n_ctx=n_ctx, n_bytes=n_bytes, n_predictable=n - 1, stride=stride)
    i = 0
    with _partial_on_interrupt(lambda: acc.result(**kw), n - 1, shard):
        while i < len(spans):
            length = spans[i][1] - spans[i][0]
            j = i + 1
            while j < len(spans) and j - i < batch_size and spans[j][1] - spans[j][0] == length:
                j += 1
            group = spans[i:j]
            if not acc.turns():
                i = j
                if progress is not None:
                    progress(i, len(spans))
                continue
            batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            lo = min(s - b - 1 for b, _, s in group)          # first position any window scores
            logits = decoder(batch, None, logits_from=lo)
            for row, (b, e, s) in enumerate(group):
                pos = torch.arange(s, e) if per_token else None
                acc.add(logits[row, s - b - 1 - lo: e - b - 1 - lo], ids[s:e].to(logits.device), pos)
            del logits
            i = j
            if progress is not None:
                progress(i, len(spans))
    return acc.result(**kw)


@torch.no_grad()
def perplexity_lines(decoder, texts_ids: Sequence[Sequence[int]], n_ctx: int, *, pad_id: int = 0,
                     batch_size: int = 16, n_bytes: Sequence[int] | None = None, per_token: bool = False,
                     progress: Callable[[int, int], None] | None = None, shard=None) -> list[PerplexityResult]:
    """Score many short texts independently (``--each-line``): one result per text, in order.

    Each text scores all its tokens after the first (give it a BOS to score the first real token).
    Texts are sorted by length and right-padded with ``pad_id`` into batches; padding needs no
    mask because a causal decoder never lets a position see later ones. A text longer than
    ``n_ctx`` is scored alone with :func:`perplexity_sliding` (stride n_ctx/2). A text of fewer
    than 2 tokens gets a result with n_tokens 0 (perplexity NaN).
    n_bytes: UTF-8 byte length of each text, for bits_per_byte. ``shard``: ranks take turns over
    the long texts and the batches; every rank returns all results. Ctrl-C:
    :class:`ScoringInterrupted` whose ``partial`` is this list so far (None: a text not scored).
    """
    results: list[PerplexityResult | None] = [None] * len(texts_ids)
    seqs = [_as_tensor(t) for t in texts_ids]
    nb = list(n_bytes) if n_bytes is not None else [0] * len(seqs)
    device = _device_of(decoder)
    short = sorted((i for i, s in enumerate(seqs) if s.numel() <= n_ctx), key=lambda i: seqs[i].numel())
    planned = sum(max(s.numel() - 1, 0) for s in seqs)
    try:
        _score_lines(decoder, seqs, short, results, nb, n_ctx, pad_id, batch_size, per_token,
                     progress, _Turns(shard), device)
    except KeyboardInterrupt:
        if shard is not None:
            raise
        raise ScoringInterrupted(list(results), planned) from None
    if shard is not None:
        for theirs in shard.gather(results):
            results = [r if r is not None else t for r, t in zip(results, theirs)]
    return results


def _score_lines(decoder, seqs, short, results, nb, n_ctx, pad_id, batch_size, per_token, progress,
                 turns, device) -> None:
    """perplexity_lines' loop: fills ``results`` (one entry per finished text) in place."""
    done = 0
    for i, s in enumerate(seqs):
        if s.numel() > n_ctx and turns():
            r = perplexity_sliding(decoder, s, n_ctx, max(1, n_ctx // 2), n_bytes=nb[i], per_token=per_token)
            r.protocol = "line"
            results[i] = r
            done += 1
    for b0 in range(0, len(short), batch_size):
        group = short[b0: b0 + batch_size]
        width = seqs[group[-1]].numel()
        if not turns():
            pass
        elif width < 2:
            for i in group:
                results[i] = _Acc(per_token).result(protocol="line", n_ctx=n_ctx, n_bytes=nb[i],
                                                    n_predictable=max(seqs[i].numel() - 1, 0))
        else:
            batch = torch.full((len(group), width), pad_id, dtype=torch.long)
            for row, i in enumerate(group):
                batch[row, : seqs[i].numel()] = seqs[i]
            logits = decoder(batch.to(device), None)
            for row, i in enumerate(group):
                m = seqs[i].numel()
                acc = _Acc(per_token)
                if m >= 2:
                    acc.add(logits[row, : m - 1], seqs[i][1:].to(logits.device),
                            torch.arange(1, m) if per_token else None)
                results[i] = acc.result(protocol="line", n_ctx=n_ctx, n_bytes=nb[i], n_predictable=max(m - 1, 0))
            del logits
        done += len(group)
        if progress is not None:
            progress(done, len(seqs))
