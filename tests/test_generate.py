"""The generation loop: greedy/sampled ids against transformers' generate on every tiny
architecture, cache reuse, EOS and length stops, statistics, and stop strings in streamed text."""

import pytest
import torch
from torch import nn

from llmsh.cache import KVCache
from llmsh.errors import InputError
from llmsh.generate import GenerationStats, generate_text, generate_tokens, prefill
from llmsh.sampling import SamplingParams, make_generator
from tiny_models import ARCHS, make_tiny_model, our_decoder, random_tokens

GREEDY = SamplingParams(temperature=0.0)


def hf_generate(hf, prompt, **kw):
    hf.generation_config.eos_token_id = None   # run the full length, as ours does with no eos_ids
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, **kw)
    return out[0, prompt.shape[1]:].tolist()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path, hf = make_tiny_model("llama", tmp_path_factory.mktemp("gen"))
    return hf, our_decoder(hf, path)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_generate(arch, tmp_path):
    path, hf = make_tiny_model(arch, tmp_path)
    dec = our_decoder(hf, path)
    prompt = random_tokens(hf.config.vocab_size, 10, seed=5)
    ref = hf_generate(hf, prompt, do_sample=False)
    cache = dec.new_cache(64)
    stats = GenerationStats()
    ours = list(generate_tokens(dec, prompt[0].tolist(), cache, GREEDY, max_new_tokens=32, eos_ids=(), stats=stats))
    assert ours == ref
    assert stats.finish_reason == "length" and stats.generated_tokens == 32 and stats.token_ids == ours
    assert cache.offset == 10 + 31   # the last token is yielded, not fed


def test_repetition_penalty_equals_transformers_and_sees_cached_context(llama):
    hf, dec = llama
    prompt = random_tokens(hf.config.vocab_size, 12, seed=9)
    ref = hf_generate(hf, prompt, do_sample=False, repetition_penalty=1.8)
    ids = prompt[0].tolist()
    cache = dec.new_cache(64)
    prefill(dec, ids[:7], cache)   # part of the prompt is already cached
    params = SamplingParams(temperature=0, repetition_penalty=1.8)
    ours = list(generate_tokens(dec, ids[7:], cache, params, max_new_tokens=32, context_ids=ids[:7]))
    assert ours == ref
    assert ours != hf_generate(hf, prompt, do_sample=False)   # the penalty mattered


def test_sampling_equals_transformers_with_the_same_seed(llama):
    # With top_k off both draw with multinomial over the same full distribution, so the same seed
    # gives the same tokens: this checks the filter order and parameters end to end.
    hf, dec = llama
    prompt = random_tokens(hf.config.vocab_size, 8, seed=11)
    kw = dict(temperature=1.7, top_k=0, top_p=0.9, min_p=0.02, repetition_penalty=1.1)
    torch.manual_seed(1234)
    ref = hf_generate(hf, prompt, do_sample=True, **kw)
    ours = list(generate_tokens(dec, prompt[0].tolist(), dec.new_cache(64), SamplingParams(seed=1234, **kw),
                                max_new_tokens=32))
    assert ours == ref
    assert len(set(ours)) > 5


def test_seeded_sampling_is_reproducible(llama):
    _, dec = llama
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    runs = [list(generate_tokens(dec, [1, 5, 9], dec.new_cache(64), params, max_new_tokens=40))
            for _ in range(2)]
    other = list(generate_tokens(dec, [1, 5, 9], dec.new_cache(64), SamplingParams(top_k=50, seed=8),
                                 max_new_tokens=40))
    assert runs[0] == runs[1] != other
    # One generator carried across calls continues the stream instead of restarting it.
    g = make_generator(7)
    a = list(generate_tokens(dec, [1, 5, 9], dec.new_cache(64), params, max_new_tokens=5, generator=g))
    b = list(generate_tokens(dec, [1, 5, 9], dec.new_cache(64), params, max_new_tokens=5, generator=g))
    assert a == runs[0][:5] and b != a


def test_cache_reuse_trim_and_regenerate(llama):
    _, dec = llama
    prompt = random_tokens(dec.config.vocab_size, 9, seed=3)[0].tolist()
    cache = dec.new_cache(64)
    first = list(generate_tokens(dec, prompt, cache, GREEDY, max_new_tokens=20))
    full = prompt + first
    assert cache.offset == len(full) - 1
    # continue from the middle of the reply
    cache.trim(len(prompt) + 5)
    again = list(generate_tokens(dec, [first[5]], cache, GREEDY, max_new_tokens=14,
                                 context_ids=full[: len(prompt) + 5]))
    assert again == first[6:]
    # regenerate the whole reply with the prompt cached: empty prompt_ids re-feeds the last token
    cache.trim(len(prompt))
    stats = GenerationStats()
    regen = list(generate_tokens(dec, [], cache, GREEDY, max_new_tokens=20, context_ids=prompt, stats=stats))
    assert regen == first
    assert stats.reused_tokens == len(prompt) - 1 and stats.prompt_tokens == len(prompt)


def test_chunked_prefill_equals_one_shot(llama):
    _, dec = llama
    ids = random_tokens(dec.config.vocab_size, 50, seed=4)[0].tolist()
    c1, c2 = dec.new_cache(64), dec.new_cache(64)
    a = prefill(dec, ids, c1)
    b = prefill(dec, ids, c2, chunk_size=7)
    assert a.shape == (dec.config.vocab_size,) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert c1.offset == c2.offset == 50


# --- a scripted decoder: the next token after position p is script[p] --------------------------

class Scripted(nn.Module):
    def __init__(self, script, vocab=64):
        super().__init__()
        self.script = list(script)
        self.vocab = vocab
        self.calls = []

    def forward(self, tokens, cache=None, last_only=False):
        b, t = tokens.shape
        start = cache.offset if cache is not None else 0
        self.calls.append(t)
        positions = range(start, start + t)
        if last_only:
            positions = positions[-1:]
        logits = torch.zeros(b, len(positions), self.vocab)
        for j, p in enumerate(positions):
            logits[:, j, self.script[p] if p < len(self.script) else 0] = 10.0
        if cache is not None:
            cache.advance(t)
        return logits


def empty_cache(n):
    return KVCache(0, 1, 1, n, 1, dtype=torch.float32, device="cpu")


def test_eos_stops_and_is_not_yielded():
    dec = Scripted([0, 0, 11, 12, 3, 13])   # prompt of 3, then 11 12 <eos=3>
    stats = GenerationStats()
    out = list(generate_tokens(dec, [5, 6, 7], empty_cache(32), GREEDY, max_new_tokens=10,
                               eos_ids=[3, 4], stats=stats))
    assert out == [11, 12]
    assert stats.finish_reason == "stop" and stats.stop_token_id == 3 and stats.generated_tokens == 2
    assert stats.ttft_seconds > 0 and stats.prefill_seconds > 0


def test_length_stop_and_full_cache():
    dec = Scripted([0] + list(range(20, 40)))
    stats = GenerationStats()
    assert list(generate_tokens(dec, [1, 2], empty_cache(32), GREEDY, max_new_tokens=4, stats=stats)) == [20, 21, 22, 23]
    assert stats.finish_reason == "length" and stats.decode_steps == 3
    cache = empty_cache(5)   # room for the prompt and 3 more tokens: 4 can be yielded
    out = list(generate_tokens(dec, [1, 2], cache, GREEDY, max_new_tokens=100, stats=stats))
    assert out == [20, 21, 22, 23] and stats.finish_reason == "length" and cache.offset == 5
    assert dec.calls[-4:] == [2, 1, 1, 1]   # one-token decode steps after one prefill pass


def test_prompt_that_does_not_fit_raises_input_error():
    cache = empty_cache(4)
    with pytest.raises(InputError, match="5 tokens does not fit"):
        list(generate_tokens(Scripted([0] * 9), [1] * 5, cache, GREEDY, max_new_tokens=1))
    with pytest.raises(InputError, match="no tokens"):
        list(generate_tokens(Scripted([0]), [], empty_cache(4), GREEDY, max_new_tokens=1))


def test_prefill_is_chunked_and_asks_for_last_logits_only():
    dec = Scripted(list(range(40)))
    seen = []
    orig = dec.forward
    dec.forward = lambda tokens, cache=None, last_only=False: (seen.append(last_only), orig(tokens, cache, last_only))[1]
    logits = prefill(dec, list(range(25)), empty_cache(32), chunk_size=10)
    assert dec.calls == [10, 10, 5] and all(seen)
    assert int(logits.argmax()) == 24


def test_prefill_reports_progress_per_chunk():
    # issue 9 item 12: a long prompt's prefill tells how far it is, (done, total) in tokens.
    seen = []
    prefill(Scripted(list(range(40))), list(range(25)), empty_cache(32), chunk_size=10,
            on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 25), (10, 25), (20, 25), (25, 25)]
    seen.clear()
    list(generate_tokens(Scripted(list(range(40))), list(range(12)), empty_cache(32), GREEDY,
                         max_new_tokens=2, chunk_size=5, on_prefill=lambda d, t: seen.append(d)))
    assert seen == [0, 5, 10, 12]


class DelayedTokenizer:
    """Each id's text is ``pieces[id]``; the stream emits each piece one token late (a held
    partial character, like byte-fallback), so flush() has work to do."""

    eos_token_ids = [3]

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special=False):
        return "".join(self.pieces[i] for i in ids)

    def stream_decoder(self, skip_special=False):
        tok = self

        class S:
            held = None

            def step(self, i):
                out, self.held = (tok.pieces[self.held] if self.held is not None else ""), i
                return out

            def flush(self, complete=False):
                out, self.held = (tok.pieces[self.held] if self.held is not None else ""), None
                return out

        return S()


PIECES = {i: p for i, p in enumerate(["", "", "", "</s>", "Hel", "lo", " wor", "ld", "<", "/", "end", ">", "!", " and", "x"])}


def run_text(script_tail, stops, max_new=20):
    dec = Scripted([0] + script_tail, vocab=len(PIECES))
    stats = GenerationStats()
    pieces = list(generate_text(dec, DelayedTokenizer(PIECES), [1, 2], empty_cache(40), GREEDY,
                                max_new_tokens=max_new, stop_strings=stops, stats=stats))
    return pieces, stats


def test_stop_string_across_tokens_is_not_emitted():
    pieces, stats = run_text([4, 5, 8, 9, 10, 11, 13, 6, 7], ["</end>"])
    assert "".join(pieces) == "Hello"
    assert stats.finish_reason == "stop"
    assert stats.token_ids[:6] == [4, 5, 8, 9, 10, 11]


def test_partial_stop_prefix_is_held_then_released():
    # "</" looks like the start of "</end>" but becomes "</x", which is emitted in full.
    pieces, stats = run_text([4, 8, 9, 14, 12, 3], ["</end>"])
    assert "".join(pieces) == "Hel</x!"
    assert stats.finish_reason == "stop" and stats.stop_token_id == 3
    assert all(not p.endswith("<") for p in pieces[:-1])


def test_stop_string_found_in_flushed_text_and_earliest_stop_wins():
    pieces, _ = run_text([4, 5, 12, 3], ["!"])         # "!" only arrives with flush()
    assert "".join(pieces) == "Hello"
    pieces, _ = run_text([4, 5, 6, 7, 12, 3], ["ld", "o w"])
    assert "".join(pieces) == "Hell"


def test_text_without_stops_equals_decode_and_length_finish():
    pieces, stats = run_text([4, 5, 6, 7, 12, 13] * 3, [], max_new=10)
    assert "".join(pieces) == DelayedTokenizer(PIECES).decode(stats.token_ids)
    assert stats.finish_reason == "length" and stats.generated_tokens == 10
