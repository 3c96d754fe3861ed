"""What the model thread does for a request: generate with KV-cache reuse, score prompts, perplexity.

Cache reuse is the chat session's (:mod:`llmsh.session`): the ids whose keys and values fill the
cache are kept (:attr:`ModelState.cache_ids`); a new request trims the cache back to the longest
common prefix with its prompt and prefills only the rest, so a chat client that resends the whole
conversation each turn pays only for the new turn. Log-probabilities are those of the model's
own distribution (log-softmax of the float32 logits: temperature 1, no sampling filters), in
nats, as OpenAI's ``logprobs`` and :mod:`llmsh.scoring` report them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..generate import GenerationStats, generate_text
from ..sampling import make_generator
from ..session import common_prefix

# Tokens per forward pass when a prompt's own log-probabilities are computed (bounds the logits
# held at once: 512 x vocabulary x 4 bytes).
SCORE_CHUNK = 512
LOGPROB_FLOOR = -9999.0   # what OpenAI reports for a token of probability 0 (JSON has no -inf)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


class ModelState:
    """The loaded model (:class:`llmsh.loader.LoadedModel`) and one KV cache of ``n_ctx``
    positions, with :attr:`cache_ids`: the ids whose keys/values fill ``cache[:offset]``."""

    def __init__(self, lm, n_ctx: int):
        self.lm = lm
        self.n_ctx = n_ctx
        self.cache = lm.decoder.new_cache(n_ctx)
        self.cache_ids: list[int] = []


@dataclass
class TokenLogprob:
    """One token: id, logprob (nats; None for a prompt's first token, which nothing predicts)
    and the ``top`` most likely ids there as [(id, logprob), ...] (None where logprob is None)."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] | None = None


def _entry(logp_row: torch.Tensor, token: int, k: int) -> TokenLogprob:
    top = None
    if k:
        lp, ids = torch.topk(logp_row, min(k, logp_row.numel()))
        top = [(int(i), _finite(float(v))) for i, v in zip(ids.tolist(), lp.tolist())]
    return TokenLogprob(int(token), _finite(float(logp_row[token])), top)


@dataclass
class GenerationResult:
    """text: the reply (stop string cut); finish_reason "stop" or "length"; token counts
    (completion_tokens includes the ids of a cut stop string, as ``llmsh generate --json``);
    cached_tokens: prompt tokens whose KV cache was reused; prompt_logprobs (echo) and
    logprobs (requested): one :class:`TokenLogprob` per token."""

    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None
    logprobs: list[TokenLogprob] | None = None
    token_ids: list[int] = field(default_factory=list)
    context_used: int = 0
    stats: GenerationStats | None = None

    def details(self, n_ctx: int) -> dict:
        """llmsh's extra reply fields (the request's ``llmsh.details``): what ``llmsh generate
        --json`` and ``--stats`` print (seconds, tokens)."""
        st = self.stats or GenerationStats(prompt_tokens=self.prompt_tokens)
        return {"token_ids": self.token_ids, "n_ctx": n_ctx, "context_used": self.context_used,
                "stats": {"prompt_tokens": st.prompt_tokens, "reused_tokens": st.reused_tokens,
                          "generated_tokens": st.generated_tokens, "prefill_seconds": st.prefill_seconds,
                          "decode_seconds": st.decode_seconds, "ttft_seconds": st.ttft_seconds,
                          "decode_steps": st.decode_steps, "compile_seconds": st.compile_seconds,
                          "finish_reason": self.finish_reason}}


def _score_prompt(state: ModelState, ids: list[int], k: int, job) -> list[TokenLogprob]:
    """Each token's logprob given the tokens before it (the first has none), computed as
    ``llmsh ppl --stride`` does for a window over the whole prompt: forward passes from scratch
    without the KV cache, so the numbers are that command's (not those of a chunked prefill,
    which differ in the last digits). Logits are taken :data:`SCORE_CHUNK` positions at a time,
    each pass over the prefix up to the chunk's end: memory stays bounded, a prompt longer than
    one chunk costs more passes. The KV cache is not touched."""
    decoder = state.lm.decoder
    tokens = torch.as_tensor(ids, dtype=torch.long, device=state.lm.device)[None]
    n = len(ids)
    out = [TokenLogprob(int(ids[0]), None, None)]
    with torch.no_grad():
        for a in range(0, n - 1, SCORE_CHUNK):
            job.check()
            e = min(a + SCORE_CHUNK, n)
            logits = decoder(tokens[:, :e], None, logits_from=a)[0]        # positions a … e-1
            targets = ids[a + 1:e + 1]
            x = logits[: len(targets)].float()
            tgt = torch.as_tensor(targets, dtype=torch.long, device=x.device)
            # The NLL exactly as llmsh.perplexity computes it (float32 logsumexp minus the target's
            # logit), so that the two agree to the bit; top alternatives from log_softmax.
            nll = (torch.logsumexp(x, -1) - x.gather(-1, tgt[:, None]).squeeze(-1)).tolist()
            tops = torch.topk(torch.log_softmax(x, -1), min(k, x.shape[-1])) if k else None
            for i, t in enumerate(targets):
                top = None
                if tops is not None:
                    top = [(int(j), _finite(float(v))) for j, v in zip(tops.indices[i].tolist(),
                                                                      tops.values[i].tolist())]
                out.append(TokenLogprob(int(t), _finite(-nll[i]), top))
    return out


def generate(state: ModelState, job, ids: list[int], params, *, max_tokens: int, stops: list[str],
             logprobs: int | None = None, echo_logprobs: int | None = None,
             stream: bool = False, eos_logprob: bool = False) -> GenerationResult:
    """Generate up to ``max_tokens`` tokens after ``ids`` (the whole prompt), reusing the cache.

    params: :class:`llmsh.sampling.SamplingParams` (a seed seeds this request's generator);
    logprobs: top alternatives per generated token (0: the token's own logprob only; None: no
    logprobs); echo_logprobs: also score the prompt's own tokens with this many alternatives
    (see :func:`_score_prompt`). With ``stream``, each text piece
    is emitted as ``("piece", (text, [TokenLogprob, ...]))`` as it is generated. The caller has
    checked that ``len(ids) + max_tokens <= state.n_ctx``. ``eos_logprob``: with logprobs, an
    end-of-sequence token that ended the reply gets an entry too (legacy completions do: a client
    such as lm-evaluation-harness drops the last entry as the generated one).
    Raises :class:`llmsh.server.worker.Cancelled` at the next token once the job is cancelled.
    """
    lm, cache = state.lm, state.cache
    res = GenerationResult(prompt_tokens=len(ids))
    if echo_logprobs is not None:
        res.prompt_logprobs = _score_prompt(state, ids, echo_logprobs, job)
    if max_tokens == 0:
        res.finish_reason = "length"
        res.context_used = cache.offset
        return res
    reuse = min(common_prefix(state.cache_ids, ids), len(ids) - 1)
    cache.trim(min(reuse, cache.offset))
    state.cache_ids = ids[:reuse]
    res.cached_tokens = reuse
    pending: list[TokenLogprob] = []
    if logprobs is not None:
        res.logprobs = []

    def on_logits(logits, token):
        job.check()
        if logprobs is not None:
            pending.append(_entry(torch.log_softmax(logits.float(), -1), token, logprobs))

    stats = GenerationStats()
    generator = make_generator(params.seed, lm.device) if params.seed is not None else None
    pieces = generate_text(lm.decoder, lm.tokenizer, ids[reuse:], cache, params, max_new_tokens=max_tokens,
                           stop_strings=stops, eos_ids=lm.eos_ids, stats=stats, context_ids=ids[:reuse],
                           generator=generator, on_logits=on_logits)
    text = []
    try:
        for piece in pieces:
            entries = pending[:]
            pending.clear()
            text.append(piece)
            if res.logprobs is not None:
                res.logprobs += entries
            if stream:
                job.emit("piece", (piece, entries))
    finally:
        pieces.close()
        # The cache holds a prefix of prompt + generated ids (generate.py's invariant): keep their ids.
        full = ids + stats.token_ids
        cache.trim(min(cache.offset, len(full)))
        state.cache_ids = full[: cache.offset]
        res.context_used = cache.offset
    if res.logprobs is not None and pending:   # tokens of a cut stop string or a held-back tail
        res.logprobs += pending
    full = ids + stats.token_ids
    if (eos_logprob and res.logprobs is not None and stats.stop_token_id is not None
            and cache.offset == len(full)):
        # The EOS was sampled from the last position's logits: one step again to get them.
        cache.trim(cache.offset - 1)
        with torch.no_grad():
            last = lm.decoder(torch.as_tensor([[full[-1]]], dtype=torch.long, device=lm.device), cache,
                              last_only=True)[0, -1]
        res.logprobs.append(_entry(torch.log_softmax(last.float(), -1), stats.stop_token_id, logprobs))
    res.text = "".join(text)
    res.finish_reason = stats.finish_reason or "length"
    res.completion_tokens = len(stats.token_ids)
    res.token_ids = list(stats.token_ids)
    res.stats = stats
    return res


def perplexity(state: ModelState, job, text: str, *, n_ctx: int, stride: int | None, all_tokens: bool,
               per_token: bool, top_logprobs: int | None) -> dict:
    """``llmsh ppl --json`` on ``text``: the same result object (source "request"), plus with
    ``per_token`` a ``tokens`` list of {position, id, text, logprob[, top_logprobs]} as the
    ``--per-token`` rows. Raises InputError (text too short for the protocol...)."""
    from ..perplexity import perplexity_llamacpp, perplexity_sliding
    from ..scoring import TopLogprobs

    lm = state.lm
    tok = lm.tokenizer
    ids = tok.encode(text)
    top = TopLogprobs(top_logprobs) if top_logprobs else None
    common = dict(n_bytes=len(text.encode()), per_token=per_token, observe=top,
                  progress=lambda done, total: job.check())
    if stride is not None:
        r = perplexity_sliding(lm.decoder, ids, n_ctx, stride, **common)
    else:
        bos_id = tok.bos_token_id if tok.add_bos else None
        r = perplexity_llamacpp(lm.decoder, ids, n_ctx, bos_id=bos_id, all_tokens=all_tokens, **common)
    out = r.summary("request")
    if per_token:
        rows = []
        for i, (pos, tid, nll) in enumerate(zip(r.token_positions, r.token_ids, r.token_nll)):
            row = {"position": pos, "id": tid, "text": tok.decode([tid]), "logprob": -nll}
            if top is not None:
                row["top_logprobs"] = [{"id": j, "text": tok.decode([j]), "logprob": lp} for j, lp in top.rows[i]]
            rows.append(row)
        out["tokens"] = rows
    return out
