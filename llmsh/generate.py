"""The generation loop: chunked prefill, token-by-token decoding with a KV cache, text streaming.

Reference behaviour: transformers' ``generate`` (greedy ids match it exactly); the loop shape
follows gpt-fast / mlx-lm: one forward pass of one token per step, logits of the last position
only, no tensors that grow with the output.

Cache invariant (what a chat session relies on to reuse the cache): while a token is being
yielded, the cache holds every earlier token of the sequence (context, prompt, previously yielded
tokens) but not that token itself. When the generator ends, ``cache.offset`` says how much of
``context_ids + prompt_ids + yielded ids`` is cached: all of it, or all but the last token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import InputError
from .sampling import SamplingParams, make_generator, sample_next


@dataclass
class GenerationStats:
    """Filled in by :func:`generate_tokens` as it runs (seconds of wall time, tokens).

    prompt_tokens: context length at the first sampled token (reused + newly prefilled);
    reused_tokens: tokens already in the cache at the start; generated_tokens: tokens yielded
    (an EOS that stopped generation is not counted); ttft_seconds: from the call's first step to the
    first token; prefill_seconds / decode_seconds: time spent in our own code (the consumer's time
    between tokens is not counted); decode_steps: one-token forward passes; finish_reason: "stop"
    (EOS or stop string) or "length" (max_new_tokens or a full cache); stop_token_id: the EOS id
    that stopped it, if any; token_ids: the generated ids; compile_seconds: time an automatic
    compile of the decode step took during this call (:class:`llmsh.compiled.DeferredStep`), not
    counted in decode_seconds.
    """

    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    ttft_seconds: float = 0.0
    finish_reason: str | None = None
    decode_steps: int = 0
    stop_token_id: int | None = None
    token_ids: list[int] = field(default_factory=list)
    compile_seconds: float = 0.0

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _device_of(decoder) -> torch.device:
    p = next(iter(decoder.parameters()), None) if hasattr(decoder, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def prefill(decoder, ids: Sequence[int] | Tensor, cache, chunk_size: int = 512,
            on_progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Feed ``ids`` into ``cache`` after its current offset, ``chunk_size`` tokens per forward pass.

    Returns the float32 logits of the last position, shape (V,). Each chunk asks the decoder for
    its last position only, so memory is bounded by the chunk size, not the prompt length.
    on_progress(done, total): called with (0, n) before the first chunk and after each chunk
    with the tokens prefilled so far (a long prompt takes seconds to minutes on a CPU).
    Raises InputError if ``ids`` is empty or does not fit in the cache's free positions.
    """
    n = len(ids)
    if n == 0:
        raise InputError("nothing to prefill: the prompt has no tokens")
    free = cache.max_seq_len - cache.offset
    if n > free:
        raise InputError(
            f"prompt of {n} tokens does not fit in the context: {free} of {cache.max_seq_len} positions are free"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    tokens = torch.as_tensor(ids, dtype=torch.long, device=_device_of(decoder)).reshape(1, n)
    logits = None
    if on_progress is not None:
        on_progress(0, n)
    for start in range(0, n, chunk_size):
        logits = decoder(tokens[:, start:start + chunk_size], cache, last_only=True)
        if on_progress is not None:
            on_progress(min(start + chunk_size, n), n)
    return logits[0, -1].float()


def generate_tokens(decoder, prompt_ids: Sequence[int], cache, params: SamplingParams, *,
                    max_new_tokens: int, eos_ids: Iterable[int] = (),
                    stats: GenerationStats | None = None, context_ids: Sequence[int] | None = None,
                    generator: torch.Generator | None = None, chunk_size: int = 512,
                    on_logits: Callable[[Tensor, int], None] | None = None,
                    on_prefill: Callable[[int, int], None] | None = None) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids continuing ``context_ids + prompt_ids``.

    prompt_ids: tokens NOT yet in the cache (prefilled first); context_ids: the ``cache.offset``
    tokens already cached (only the repetition penalty reads them; without them it sees the prompt
    and the generated tokens only). An empty ``prompt_ids`` re-feeds the last cached token, which
    needs ``context_ids``. Stops on any id in ``eos_ids`` (that id is not yielded; finish_reason
    "stop"), after ``max_new_tokens``, or when the cache is full (finish_reason "length").
    generator: a torch.Generator on the decoder's device; default: one seeded with ``params.seed``.
    If the consumer stops iterating early (Ctrl-C), ``stats.finish_reason`` stays None.
    on_logits(logits, token): called before each token is yielded with the float32 logits (V,)
    it was sampled from (the model's, before temperature and filters), e.g. for top logprobs.
    on_prefill(done, total): :func:`prefill`'s progress over ``prompt_ids``.

    Raises InputError when the prompt does not fit in the cache, ValueError when ``context_ids``
    disagrees with ``cache.offset``. See the module docstring for what the cache holds afterwards.
    """
    stats = stats if stats is not None else GenerationStats()
    t0 = time.perf_counter()
    eos = frozenset(int(e) for e in eos_ids)
    if context_ids is not None and len(context_ids) != cache.offset:
        raise ValueError(f"context_ids has {len(context_ids)} tokens but the cache holds {cache.offset}")
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        if not context_ids:
            raise InputError("nothing to generate from: the prompt has no tokens")
        cache.trim(cache.offset - 1)
        prompt_ids = [int(context_ids[-1])]
        context_ids = context_ids[:-1]
    stats.reused_tokens = cache.offset
    stats.prompt_tokens = cache.offset + len(prompt_ids)
    stats.finish_reason = None
    device = _device_of(decoder)

    # History buffer for the repetition penalty, preallocated once: no per-token concatenation.
    penalise = params.repetition_penalty != 1.0
    history = None
    n_hist = 0
    if penalise:
        known = (list(context_ids) if context_ids is not None else []) + prompt_ids
        history = torch.empty(len(known) + max(max_new_tokens, 0), dtype=torch.long, device=device)
        history[: len(known)] = torch.as_tensor(known, dtype=torch.long)
        n_hist = len(known)

    logits = prefill(decoder, prompt_ids, cache, chunk_size, on_progress=on_prefill)
    # Counts of the generated ids for OpenAI's frequency/presence penalties (the prompt's do not count).
    counts = torch.zeros_like(logits) if params.counts_tokens else None
    if generator is None and not params.greedy:
        generator = make_generator(params.seed, logits.device)
    token_buf = torch.empty((1, 1), dtype=torch.long, device=logits.device)
    stats.prefill_seconds = time.perf_counter() - t0

    for i in range(max(max_new_tokens, 0)):
        t_step = time.perf_counter()
        with torch.no_grad():
            tok = sample_next(logits, params, generator, history[:n_hist] if penalise else None, counts)
        _add_time(stats, i, t_step)
        if i == 0:
            stats.ttft_seconds = time.perf_counter() - t0
        if tok in eos:
            stats.stop_token_id = tok
            stats.finish_reason = "stop"
            return
        stats.generated_tokens += 1
        stats.token_ids.append(tok)
        if on_logits is not None:
            on_logits(logits, tok)
        yield tok
        if i + 1 == max_new_tokens or cache.offset >= cache.max_seq_len:
            break
        t_step = time.perf_counter()
        if penalise:
            history[n_hist] = tok
            n_hist += 1
        if counts is not None:
            counts[tok] += 1
        token_buf[0, 0] = tok
        c0 = _compile_clock(decoder)
        with torch.no_grad():
            logits = decoder(token_buf, cache, last_only=True)[0, -1]
        dc = _compile_clock(decoder) - c0           # a compile that ran within this step
        stats.decode_steps += 1
        stats.compile_seconds += dc
        stats.decode_seconds += time.perf_counter() - t_step - dc
    stats.finish_reason = "length"


def _compile_clock(decoder) -> float:
    # Seconds an automatic compile (llmsh.compiled.DeferredStep) has taken on this decoder so far.
    return getattr(getattr(decoder, "__dict__", {}).get("decode_step"), "compile_seconds", 0.0)


def _add_time(stats: GenerationStats, i: int, t_step: float) -> None:
    # Sampling from the prefill logits belongs to the prefill; later sampling to decoding.
    dt = time.perf_counter() - t_step
    if i == 0:
        stats.prefill_seconds += dt
    else:
        stats.decode_seconds += dt


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def generate_text(decoder, tokenizer, prompt_ids: Sequence[int], cache, params: SamplingParams, *,
                  max_new_tokens: int, stop_strings: Sequence[str] = (), eos_ids: Iterable[int] | None = None,
                  stats: GenerationStats | None = None, context_ids: Sequence[int] | None = None,
                  generator: torch.Generator | None = None, skip_special: bool = True,
                  chunk_size: int = 512,
                  on_logits: Callable[[Tensor, int], None] | None = None,
                  on_prefill: Callable[[int, int], None] | None = None) -> Iterator[str]:
    """Stream the text of :func:`generate_tokens` in pieces, ending at EOS or a stop string.

    Text comes from ``tokenizer.stream_decoder(skip_special=...)`` so joined pieces equal the
    decode of the generated ids, less an incomplete character at the very end (a length limit
    that cuts a multi-byte character: its ids stay in ``stats.token_ids``). A stop string is found even when it spans several tokens; neither
    it nor anything after it is emitted (finish_reason "stop"), and text that could still turn into
    a stop string is held back until it cannot. eos_ids default: ``tokenizer.eos_token_ids``.
    ``stats.token_ids`` keeps every generated id, including those of the stop string.
    on_logits, on_prefill: as in :func:`generate_tokens`.
    Errors: as :func:`generate_tokens`.
    """
    stats = stats if stats is not None else GenerationStats()
    stops = [s for s in stop_strings if s]
    if eos_ids is None:
        eos_ids = getattr(tokenizer, "eos_token_ids", None) or ()
    stream = tokenizer.stream_decoder(skip_special=skip_special)
    tokens = generate_tokens(decoder, prompt_ids, cache, params, max_new_tokens=max_new_tokens,
                             eos_ids=eos_ids, stats=stats, context_ids=context_ids,
                             generator=generator, chunk_size=chunk_size, on_logits=on_logits,
                             on_prefill=on_prefill)
    pending = ""
    try:
        for tok in tokens:
            piece = stream.step(tok)
            if not piece:
                continue
            pending += piece
            if stops:
                cut = _find_stop(pending, stops)
                if cut is not None:
                    if cut:
                        yield pending[:cut]
                    stats.finish_reason = "stop"
                    return
                keep = _held_back(pending, stops)
                out, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
            else:
                out, pending = pending, ""
            if out:
                yield out
        pending += stream.flush(complete=True)   # no U+FFFD for a character cut at the end
        cut = _find_stop(pending, stops) if stops else None
        if cut is not None:
            pending = pending[:cut]
            stats.finish_reason = "stop"
        if pending:
            yield pending
    finally:
        tokens.close()


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
