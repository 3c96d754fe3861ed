"""Sampling filters on hand-built distributions, agreement with transformers' logits processors,
seeded reproducibility and parameter validation."""

import dataclasses
import math

import pytest
import torch

from llmsh.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    candidates,
    make_generator,
    min_p_filter,
    process_logits,
    sample_next,
    top_k_filter,
    top_p_filter,
)

INF = float("inf")


def kept(x: torch.Tensor) -> list[int]:
    return torch.isfinite(x).nonzero().flatten().tolist()


def logits_of(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


# --- each filter on a hand-built distribution -------------------------------------------------

def test_repetition_penalty_divides_positive_multiplies_negative_once():
    x = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(x, torch.tensor([0, 1, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert x.tolist() == [2.0, -2.0, 1.0, 0.5]  # pure
    assert apply_repetition_penalty(x, torch.tensor([0]), 1.0) is x
    assert apply_repetition_penalty(x, None, 2.0) is x


def test_temperature_scales_logits():
    x = torch.tensor([1.0, 2.0, -3.0])
    assert apply_temperature(x, 0.5).tolist() == [2.0, 4.0, -6.0]


def test_top_k_keeps_k_highest_and_ties():
    x = torch.tensor([1.0, 4.0, 2.0, 3.0])
    assert kept(top_k_filter(x, 2)) == [1, 3]
    assert kept(top_k_filter(x, 0)) == [0, 1, 2, 3]     # 0 disables
    assert kept(top_k_filter(x, 10)) == [0, 1, 2, 3]
    assert kept(top_k_filter(torch.tensor([2.0, 0.0, 2.0]), 1)) == [0, 2]  # ties with the k-th stay


def test_top_p_smallest_set_reaching_p():
    x = logits_of([0.05, 0.5, 0.15, 0.3])
    assert kept(top_p_filter(x, 0.75)) == [1, 3]          # 0.5 + 0.3 >= 0.75
    assert kept(top_p_filter(x, 0.85)) == [1, 2, 3]
    assert kept(top_p_filter(x, 0.4)) == [1]
    assert kept(top_p_filter(x, 0.0)) == [1]              # only the most likely token
    assert kept(top_p_filter(x, 1.0)) == [0, 1, 2, 3]
    # kept logits are unchanged
    assert torch.equal(top_p_filter(x, 0.75)[[1, 3]], x[[1, 3]])


def test_min_p_relative_to_top_probability():
    x = logits_of([0.05, 0.5, 0.15, 0.3])
    assert kept(min_p_filter(x, 0.4)) == [1, 3]           # threshold 0.2
    assert kept(min_p_filter(x, 0.2)) == [1, 2, 3]        # threshold 0.1
    assert kept(min_p_filter(x, 1.0)) == [1]
    assert kept(min_p_filter(x, 0.0)) == [0, 1, 2, 3]


def test_filters_always_keep_one_token():
    x = torch.tensor([0.0, 0.0, 0.0, 10.0])
    for f in (top_p_filter(x, 0.0), min_p_filter(x, 1.0), top_k_filter(x, 1)):
        assert kept(f) == [3]


def test_order_penalty_then_temperature_then_topk_topp_minp():
    # The repetition penalty demotes id 0 before top-k looks at the logits.
    x = torch.tensor([3.0, 2.0, 1.0, 0.0])
    p = SamplingParams(temperature=1.0, top_k=1, repetition_penalty=4.0)
    assert kept(process_logits(x, p, torch.tensor([0]))) == [1]
    # Temperature comes before top-p: a high temperature flattens the distribution so more survive.
    y = logits_of([0.6, 0.3, 0.1])
    assert kept(process_logits(y, SamplingParams(temperature=1.0, top_k=0, top_p=0.55))) == [0]
    assert kept(process_logits(y, SamplingParams(temperature=5.0, top_k=0, top_p=0.55))) == [0, 1]


# --- agreement with transformers -------------------------------------------------------------

PARAM_SETS = [
    dict(temperature=0.7, top_k=50, top_p=1.0, min_p=0.0, repetition_penalty=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.9, min_p=0.0, repetition_penalty=1.2),
    dict(temperature=0.5, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=0.8),
    dict(temperature=1.0, top_k=5, top_p=0.3, min_p=0.3, repetition_penalty=1.5),
    dict(temperature=2.0, top_k=0, top_p=1.0, min_p=0.1, repetition_penalty=1.0),
    dict(temperature=0.9, top_k=300, top_p=0.0, min_p=0.0, repetition_penalty=1.1),
]


@pytest.mark.parametrize("kw", PARAM_SETS)
def test_process_logits_equals_transformers_processors(kw):
    from transformers.generation.logits_process import (
        MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper)

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 257, generator=g) * 3
    prev = torch.randint(0, 257, (1, 40), generator=g)
    procs = []
    if kw["repetition_penalty"] != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    if kw["temperature"] != 1.0:
        procs.append(TemperatureLogitsWarper(kw["temperature"]))
    if kw["top_k"]:
        procs.append(TopKLogitsWarper(kw["top_k"]))
    if kw["top_p"] < 1.0:
        procs.append(TopPLogitsWarper(kw["top_p"]))
    procs.append(MinPLogitsWarper(kw["min_p"]))
    ref = logits.clone()
    for proc in procs:
        ref = proc(prev, ref)
    params = SamplingParams(**kw)
    ours = process_logits(logits[0], params, prev[0])
    assert kept(ours) == kept(ref[0])
    mask = torch.isfinite(ours)
    torch.testing.assert_close(ours[mask], ref[0][mask], rtol=1e-6, atol=1e-6)

    # The fast path (filters on the top-k survivors only) is the same distribution.
    ids, cand = candidates(logits[0], params, prev[0])
    full = torch.full_like(ours, -INF)
    full[ids if ids is not None else slice(None)] = cand
    assert kept(full) == kept(ours)
    torch.testing.assert_close(full[mask], ours[mask])


def test_greedy_is_argmax_after_repetition_penalty():
    x = torch.tensor([1.0, 5.0, 4.0, -1.0])
    assert sample_next(x, SamplingParams(temperature=0), None) == 1
    assert sample_next(x, SamplingParams(temperature=0, repetition_penalty=2.0), None, torch.tensor([1])) == 2
    assert sample_next(torch.tensor([3.0, 3.0, 1.0]), SamplingParams(temperature=0), None) == 0


def test_sample_frequencies_follow_filtered_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.85, seed=0)  # keeps ids 0, 1, 2
    g = make_generator(0)
    n = 6000
    counts = torch.zeros(5)
    for _ in range(n):
        counts[sample_next(probs.log(), params, g)] += 1
    expect = torch.tensor([0.4, 0.3, 0.2, 0, 0]) / 0.9
    assert counts[3] == 0 and counts[4] == 0
    assert torch.allclose(counts / n, expect, atol=0.025), counts / n


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.5, top_k=0, seed=1234)

    def draw(seed):
        g = make_generator(seed)
        return [sample_next(logits, params, g) for _ in range(50)]

    a, b, c = draw(1234), draw(1234), draw(99)
    assert a == b
    assert a != c
    assert len(set(a)) > 10


# --- parameters -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),  # /set temperature inf
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=1.5), "top_p must be in [0, 1]"),
    (dict(top_p=-0.01), "top_p must be in [0, 1]"),
    (dict(min_p=2), "min_p must be in [0, 1]"),
    (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0"),
    (dict(seed=-1), "seed"),
])
def test_out_of_range_parameters_raise_value_error_with_range(kw, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kw)


def test_replace_revalidates():
    with pytest.raises(ValueError):
        dataclasses.replace(SamplingParams(), top_p=3.0)


def test_defaults_are_transformers_defaults():
    from transformers import GenerationConfig

    d = GenerationConfig._get_default_generation_params()
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (
        d["temperature"], d["top_k"], d["top_p"], d["repetition_penalty"])
    assert p.min_p == 0.0 and p.seed is None


def test_from_generation_config():
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
           "repetition_penalty": 1.05, "min_p": None, "eos_token_id": [1, 2]}
    p = SamplingParams.from_generation_config(gen)
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (0.7, 20, 0.8, 0.0, 1.05)
    p = SamplingParams.from_generation_config(gen, top_p=0.5, temperature=None, seed=3)
    assert (p.top_p, p.temperature, p.seed) == (0.5, 0.7, 3)
    # transformers decodes greedily unless do_sample is true
    assert SamplingParams.from_generation_config({"bos_token_id": 1}).temperature == 0.0
    assert SamplingParams.from_generation_config({}, temperature=0.9).temperature == 0.9
    assert SamplingParams.from_generation_config(None, honour_do_sample=False) == SamplingParams()
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config({"top_p": 7})
    assert math.isclose(SamplingParams.from_generation_config({"top_k": 40.0}).top_k, 40)


def test_frequency_and_presence_penalties_as_openai_defines_them():
    """OpenAI: logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty."""
    from llmsh.sampling import apply_frequency_penalty

    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    c = torch.tensor([0.0, 1.0, 3.0, 0.0])
    got = apply_frequency_penalty(x, c, 0.5, 0.25)
    assert got.tolist() == [1.0, 2.0 - 0.5 - 0.25, 3.0 - 1.5 - 0.25, 4.0]
    assert apply_frequency_penalty(x, None, 0.5, 0.25) is x
    # greedy reads them too: token 3 generated twice before loses its lead
    p = SamplingParams(temperature=0, frequency_penalty=1.0)
    assert sample_next(x, p, None, counts=torch.tensor([0.0, 0.0, 0.0, 2.0])) == 2
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=2.5)
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=-3)
def test_chat_params_sample_with_a_mild_penalty_unless_the_model_says_otherwise():
    # issue 9 item 6: chat and a bare prompt do not decode greedily (small models loop).
    from llmsh.sampling import CHAT_DEFAULTS, chat_params

    p = chat_params({"bos_token_id": 1, "eos_token_id": [2, 0]})  # the default model's file
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (0.8, 40, 0.9, 0.0, 1.1)
    assert dataclasses.asdict(p) == dict(CHAT_DEFAULTS, seed=None, frequency_penalty=0.0, presence_penalty=0.0)
    own = chat_params({"do_sample": True, "temperature": 0.6, "top_p": 0.95})  # e.g. Qwen's
    assert (own.temperature, own.top_p, own.top_k, own.repetition_penalty) == (0.6, 0.95, 40, 1.1)
    assert chat_params({"do_sample": False}).greedy
    assert chat_params({"temperature": 0.6}, temperature=0.0, seed=3).greedy
    assert chat_params(None, seed=3).seed == 3
