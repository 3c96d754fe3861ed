"""Next-token selection: repetition penalty, temperature, top-k, top-p, min-p, seeded sampling.

The filters run in the order in which transformers (5.x) ``GenerationMixin._get_logits_processor``
builds its logits processors for ``generate(do_sample=True)``:

1. repetition penalty (``RepetitionPenaltyLogitsProcessor``; also applied when greedy), then
   OpenAI's frequency and presence penalties (:func:`apply_frequency_penalty`; also when greedy),
2. temperature (``TemperatureLogitsWarper``),
3. top-k (``TopKLogitsWarper``; ``top_k=0`` disables it),
4. top-p (``TopPLogitsWarper``; only when ``top_p < 1``),
5. min-p (``MinPLogitsWarper``; only when ``min_p > 0``),

then one draw from ``softmax`` with ``torch.multinomial``. ``temperature=0`` means greedy: the
argmax of the logits after the repetition penalty (transformers' ``do_sample=False``), with ties
going to the lowest id as ``torch.argmax`` does. Every filter is a pure function of a 1-D logits
tensor that returns a new tensor with removed entries set to ``-inf``; each keeps at least one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; defaults are transformers' ``GenerationConfig`` defaults for sampling.

    Ranges (checked on construction and by ``dataclasses.replace``; ``ValueError`` names the
    parameter and its allowed range): temperature >= 0 (0 = greedy), top_k >= 0 (0 = off),
    0 <= top_p <= 1 (1 = off, 0 = only the most likely token), 0 <= min_p <= 1 (0 = off),
    repetition_penalty > 0 (1 = off), -2 <= frequency_penalty, presence_penalty <= 2 (0 = off;
    OpenAI's, see :func:`apply_frequency_penalty`), seed None (fresh randomness) or 0 <= seed < 2**63.
    """

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        def bad(name: str, rng: str) -> ValueError:
            return ValueError(f"{name} must be {rng}, got {getattr(self, name)!r}")

        def real(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise bad(name, "a number")
            return float(v)

        if not (0.0 <= real("temperature") < math.inf):
            raise bad("temperature", "a finite number >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 disables top-k)")
        if not (0.0 <= real("top_p") <= 1.0):
            raise bad("top_p", "in [0, 1]")
        if not (0.0 <= real("min_p") <= 1.0):
            raise bad("min_p", "in [0, 1]")
        if not (0.0 < real("repetition_penalty") < math.inf):
            raise bad("repetition_penalty", "a finite number > 0 (1 disables it)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not (-2.0 <= real(name) <= 2.0):
                raise bad(name, "in [-2, 2] (0 disables it)")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise bad("seed", "an integer in [0, 2**63) or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def counts_tokens(self) -> bool:
        """True when sampling needs the counts of the tokens generated so far (OpenAI's penalties)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @classmethod
    def from_generation_config(cls, gen: dict | None, *, honour_do_sample: bool = True, **overrides) -> "SamplingParams":
        """Defaults from a model's generation_config.json dict, then ``overrides`` (None values ignored).

        Keys read: temperature, top_k, top_p, min_p, repetition_penalty, do_sample; a missing or
        null key keeps transformers' default. Like transformers, a config without
        ``do_sample: true`` decodes greedily, so with ``honour_do_sample`` that maps to
        ``temperature=0`` (an explicit ``temperature`` override still wins).
        """
        gen = gen or {}
        kw = {}
        for f in fields(cls):
            if f.name not in ("seed", "frequency_penalty", "presence_penalty") and gen.get(f.name) is not None:
                kw[f.name] = gen[f.name]
        if honour_do_sample and gen.get("do_sample") is not True:
            kw["temperature"] = 0.0
        kw.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(kw.get("top_k"), float) and kw["top_k"].is_integer():
            kw["top_k"] = int(kw["top_k"])
        return cls(**kw)


# Defaults for chat and for a bare ``llmsh "prompt"``: Ollama's (temperature 0.8, top_k 40,
# top_p 0.9, repeat_penalty 1.1; llama.cpp's are the same but for top_p 0.95 plus min_p 0.05 and
# no penalty since 2024). Greedy decoding of a small instruct model loops ("Write a short poem
# about the sea." -> one line repeated for 1,139 tokens with SmolLM2-135M); sampling with a
# mild penalty ends that reply and others by themselves (tests/test_default_model.py). Our
# penalty, as transformers', sees the whole context, so it is kept mild.
CHAT_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repetition_penalty": 1.1}
CHAT_MAX_TOKENS = 1024  # chat's reply cap (tokens) unless -n or /set max_tokens says otherwise
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def chat_params(gen: dict | None, **overrides) -> SamplingParams:
    """Sampling for chat and a bare prompt: :data:`CHAT_DEFAULTS`, except what the model's
    generation_config.json dict ``gen`` sets itself (each key it gives wins; an explicit
    ``do_sample: false`` means greedy, as the model asks), then ``overrides`` (None ignored).

    Raises ValueError (naming the parameter) for an out-of-range value."""
    gen = gen or {}
    kw = dict(CHAT_DEFAULTS)
    kw.update({k: gen[k] for k in _SAMPLING_KEYS if gen.get(k) is not None})
    if gen.get("do_sample") is False:
        kw["temperature"] = 0.0
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(kw.get("top_k"), float) and kw["top_k"].is_integer():
        kw["top_k"] = int(kw["top_k"])
    return SamplingParams(**kw)


def random_seed() -> int:
    """A fresh seed for a session that was given none (shown by ``/show``, to reproduce it)."""
    import secrets

    return secrets.randbelow(2**31)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device``: seeded with ``seed``, or non-deterministically when None."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


# --- pure filters: (V,) float logits in, new (V,) logits out -------------------------------------


def apply_repetition_penalty(logits: Tensor, prev_ids: Tensor | None, penalty: float) -> Tensor:
    """Penalise every id in ``prev_ids`` once (duplicates count once), like transformers'
    RepetitionPenaltyLogitsProcessor: negative logits are multiplied by ``penalty``, others divided."""
    if penalty == 1.0 or prev_ids is None or prev_ids.numel() == 0:
        return logits
    prev_ids = prev_ids.to(device=logits.device, dtype=torch.long)
    picked = logits.gather(0, prev_ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(0, prev_ids, picked)


def apply_frequency_penalty(logits: Tensor, counts: Tensor | None, frequency: float,
                            presence: float) -> Tensor:
    """OpenAI's penalties (API reference, "Parameter details"): ``logits[j] -= c[j] * frequency +
    (c[j] > 0) * presence``, where ``counts`` (V,) holds c[j], how many times token j has been
    generated so far in this reply (the prompt does not count). Unlike the repetition penalty
    it subtracts, and the frequency term grows with each repeat."""
    if counts is None or (frequency == 0.0 and presence == 0.0):
        return logits
    counts = counts.to(device=logits.device, dtype=logits.dtype)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` (temperature > 0)."""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` highest logits (and any tied with the k-th, as transformers does); 0 = off."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to >= ``p``.

    As in transformers' TopPLogitsWarper, a token is removed when the cumulative probability of the
    tokens less likely than or as likely as it is <= 1 - p; the most likely token always stays, so
    ``p=0`` keeps only it. ``p >= 1`` is a no-op.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cum <= (1.0 - p)
    remove_sorted[-1] = False
    remove = torch.empty_like(remove_sorted).scatter_(0, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Remove tokens whose probability is below ``min_p`` times the top probability (MinPLogitsWarper);
    the most likely token always stays. ``min_p=0`` is a no-op."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    remove = probs < min_p * probs.max()
    remove[probs.argmax()] = False
    return logits.masked_fill(remove, NEG_INF)


def process_logits(logits: Tensor, params: SamplingParams, prev_ids: Tensor | None = None,
                   counts: Tensor | None = None) -> Tensor:
    """All filters of ``params`` on full (V,) logits, in transformers' order (module docstring).

    For ``temperature=0`` only the repetition penalty applies (greedy takes the argmax of this).
    Reference path; :func:`sample_next` computes the same distribution over fewer candidates.
    """
    x = apply_repetition_penalty(logits.float(), prev_ids, params.repetition_penalty)
    x = apply_frequency_penalty(x, counts, params.frequency_penalty, params.presence_penalty)
    if params.greedy:
        return x
    x = apply_temperature(x, params.temperature)
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    return min_p_filter(x, params.min_p)


def candidates(logits: Tensor, params: SamplingParams, prev_ids: Tensor | None = None,
               counts: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """(ids, filtered logits) of the tokens that can be sampled, for ``temperature > 0``.

    With top-k on, the later filters run on the top-k survivors only (the others are ``-inf``
    and carry no probability, so top-p and min-p decide identically) instead of sorting the whole
    vocabulary every token. ``ids`` is None when every vocabulary id is a candidate.
    Scattering the result back into a ``-inf`` (V,) tensor gives :func:`process_logits`.
    """
    x = apply_repetition_penalty(logits.float(), prev_ids, params.repetition_penalty)
    x = apply_frequency_penalty(x, counts, params.frequency_penalty, params.presence_penalty)
    x = apply_temperature(x, params.temperature)
    ids = None
    if 0 < params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        ids = (x >= kth).nonzero().squeeze(1)
        x = x[ids]
    x = top_p_filter(x, params.top_p)
    x = min_p_filter(x, params.min_p)
    return ids, x


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
                prev_ids: Tensor | None = None, counts: Tensor | None = None) -> int:
    """Choose the next token id from one position's logits.

    logits: (V,) any float dtype; prev_ids: 1-D int64 ids of the whole context so far (prompt and
    generated; used only by the repetition penalty); counts: (V,) times each id was generated
    in this reply (only the frequency/presence penalties read it); generator: a torch.Generator on the logits'
    device (same seed and device give the same choices). Greedy when ``params.temperature == 0``.
    Matches transformers' generate: filters in the module docstring's order, then ``multinomial``.
    """
    if params.greedy:
        x = apply_repetition_penalty(logits.float(), prev_ids, params.repetition_penalty)
        x = apply_frequency_penalty(x, counts, params.frequency_penalty, params.presence_penalty)
        return int(torch.argmax(x))
    ids, x = candidates(logits, params, prev_ids, counts)
    probs = torch.softmax(x, -1)
    choice = torch.multinomial(probs, 1, generator=generator)
    if ids is not None:
        choice = ids[choice]
    return int(choice)
