"""Decoder vs transformers on tiny random models of every architecture (float32, CPU).

Every comparison is against transformers' own logits, never against our earlier output.
"""

import dataclasses
import json

import pytest
import torch

from llmsh.cache import KVCache
from llmsh.config import ModelConfig
from llmsh.weights import load_decoder
from tiny_models import ARCHS, build_tiny_hf_model, make_tiny_model, random_tokens

TOL = 1e-4
N = 40  # longer than the sliding windows (8) of the mistral / qwen2_sliding models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (config, our decoder, hf model, tokens (2, N), hf logits (2, N, V))."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ARCHS:
        path, hf = make_tiny_model(arch, root)
        config = ModelConfig.from_file(path)
        dec = load_decoder(path, config, device="cpu", dtype="float32")
        tokens = random_tokens(config.vocab_size, N, batch=2)
        with torch.no_grad():
            ref = hf(tokens).logits.float()
        out[arch] = (config, dec, hf, tokens, ref)
    return out


def _close(a, b, tol=TOL):
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max abs diff {diff}"


@pytest.mark.parametrize("arch", ARCHS)
def test_full_forward_matches_transformers(models, arch):
    config, dec, hf, tokens, ref = models[arch]
    assert ref.std() > 0.3  # logits far from uniform: a wrong model cannot pass by accident
    with torch.no_grad():
        out = dec(tokens)
    assert out.dtype == torch.float32
    _close(out, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_token_by_token_decode_matches(models, arch):
    config, dec, hf, tokens, ref = models[arch]
    cache = dec.new_cache(N + 5, batch_size=2)
    with torch.no_grad():
        steps = [dec(tokens[:, i:i + 1], cache) for i in range(N)]
    assert cache.offset == N
    _close(torch.cat(steps, dim=1), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_matches(models, arch):
    config, dec, hf, tokens, ref = models[arch]
    cache = dec.new_cache(N, batch_size=2)
    with torch.no_grad():
        chunks = [dec(tokens[:, i:i + 7], cache) for i in range(0, N, 7)]
    _close(torch.cat(chunks, dim=1), ref)
    # last_only gives the last position's logits only
    cache.reset()
    with torch.no_grad():
        last = dec(tokens, cache, last_only=True)
    _close(last, ref[:, -1:])
    # logits_from keeps the logits of the later positions only (what scoring reads)
    with torch.no_grad():
        tail = dec(tokens, None, logits_from=N - 9)
        assert tail.shape[1] == 9
        _close(tail, ref[:, N - 9:])
        with pytest.raises(ValueError, match="logits_from"):
            dec(tokens, None, logits_from=N)


@pytest.mark.parametrize("arch", ARCHS)
def test_trim_and_rerun(models, arch):
    config, dec, hf, tokens, ref = models[arch]
    cache = dec.new_cache(N, batch_size=2)
    other = random_tokens(config.vocab_size, N - 25, batch=2, seed=7)
    with torch.no_grad():
        dec(tokens, cache)
        cache.trim(25)
        assert cache.offset == 25
        out = dec(other, cache)
        ref2 = hf(torch.cat([tokens[:, :25], other], dim=1)).logits
    _close(out, ref2[:, 25:])


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_batch_rows_are_independent(models, arch):
    config, dec, hf, tokens, ref = models[arch]
    with torch.no_grad():
        one = dec(tokens[1:2])
        cache = dec.new_cache(N, batch_size=2)   # a smaller batch may use a bigger cache
        one_cached = dec(tokens[1:2], cache)
    _close(one, ref[1:2])
    _close(one_cached, ref[1:2])


@pytest.mark.parametrize("arch", ["mistral", "qwen2_sliding"])
def test_long_sliding_window_with_cache(models, arch):
    """100 tokens through an 8-token window: chunked, with the cache, after the window slid."""
    config, dec, hf, _, _ = models[arch]
    tokens = random_tokens(config.vocab_size, 100, batch=1, seed=3)
    with torch.no_grad():
        ref = hf(tokens).logits
        cache = dec.new_cache(100)
        parts = [dec(tokens[:, :3], cache)]                 # short first chunk
        parts += [dec(tokens[:, i:i + 13], cache) for i in range(3, 94, 13)]
        parts += [dec(tokens[:, i:i + 1], cache) for i in range(94, 100)]
    _close(torch.cat(parts, dim=1), ref)


def test_features_are_exercised(models):
    """The test inputs are long enough that the window and rope scaling change the output."""
    for arch, change in [("mistral", dict(sliding_window=None)),
                         ("qwen2_sliding", dict(use_sliding_window=False)),
                         ("llama3_rope", dict(rope_scaling=None)),
                         ("llama_linear_rope", dict(rope_scaling=None))]:
        _, _, _, tokens, ref = models[arch]
        hf2 = build_tiny_hf_model(arch, **change)
        with torch.no_grad():
            assert (hf2(tokens).logits - ref).abs().max() > 1e-2, arch


def test_positions_past_max_position_embeddings(tmp_path):
    """RoPE tables grow past max_position_embeddings (128) like transformers' on-the-fly rope."""
    path, hf = make_tiny_model("llama3_rope", tmp_path)
    dec = load_decoder(path, ModelConfig.from_file(path), device="cpu")
    tokens = random_tokens(320, 150, seed=5)
    with torch.no_grad():
        ref = hf(tokens).logits
        _close(dec(tokens), ref)                     # tables grown on demand by forward
        cache = dec.new_cache(160)
        out = torch.cat([dec(tokens[:, :120], cache), dec(tokens[:, 120:], cache)], dim=1)
    _close(out, ref)


def test_transformers4_config_gives_same_logits(tmp_path):
    """A 4.x-style config.json (top-level rope_theta / rope_scaling with 'type') loads the same."""
    path, hf = make_tiny_model("llama3_rope", tmp_path)
    d = json.loads((path / "config.json").read_text())
    params = d.pop("rope_parameters", None) or {}
    d["rope_theta"] = params.pop("rope_theta", 500000.0)
    d["rope_scaling"] = dict(type=params.pop("rope_type", "llama3"), **params)
    (path / "config.json").write_text(json.dumps(d))
    config = ModelConfig.from_file(path)
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_theta == 500000.0
    dec = load_decoder(path, config, device="cpu")
    tokens = random_tokens(320, N)
    with torch.no_grad():
        _close(dec(tokens), hf(tokens).logits)


def test_cache_api(models):
    config, dec, *_ = models["llama"]
    cache = KVCache.for_model(config, 10, dtype=torch.float32, device="cpu")
    assert cache.nbytes == 2 * config.num_hidden_layers * config.num_key_value_heads * 10 * config.head_dim * 4
    with torch.no_grad():
        dec(torch.zeros(1, 6, dtype=torch.long), cache)
        assert cache.offset == 6 and cache.remaining == 4
        with pytest.raises(ValueError):
            dec(torch.zeros(1, 5, dtype=torch.long), cache)
        assert cache.offset == 6  # a refused forward leaves the cache untouched
    with pytest.raises(ValueError):
        cache.trim(7)
    cache.reset()
    assert cache.offset == 0
    k = torch.randn(1, config.num_key_value_heads, 3, config.head_dim)
    kk, vv = cache.update(0, k, k + 1)
    assert kk.shape == (1, config.num_key_value_heads, 3, config.head_dim) and cache.offset == 0
    assert torch.equal(kk, k) and torch.equal(vv, k + 1)


def test_gpt2_refuses_positions_past_n_positions(models):
    config, dec, *_ = models["gpt2"]
    cache = dec.new_cache(config.max_position_embeddings + 10)
    cache.offset = config.max_position_embeddings  # pretend it is full of positions
    with pytest.raises(ValueError, match="positions"):
        dec(torch.zeros(1, 1, dtype=torch.long), cache)


def test_tied_lm_head_shares_the_embedding(models):
    for arch in ("llama_bias_tied", "qwen2", "gpt2"):
        config, dec, *_ = models[arch]
        assert config.tie_word_embeddings
        embed = dec.embed_tokens
        assert dec.lm_head.weight is embed.weight


def test_config_is_frozen(models):
    config = models["llama"][0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.vocab_size = 1
