"""The compiled decode step (llmsh.compiled) and the benchmark (llmsh.bench).

The step is checked with torch.compile's "eager" backend (the same graph Dynamo captures,
without inductor's minutes of C++ compilation) and directly, against the decoder's own
token-by-token forward, which tests/test_model.py checks against transformers.
"""

import json

import pytest
import torch

from llmsh import compiled
from llmsh.config import ModelConfig
from llmsh.weights import load_decoder
from cli_fixtures import bos_model, llmsh_home  # noqa: F401  (fixtures)
from tiny_models import make_tiny_model, random_tokens


def _decode_all(dec, tokens, size=32):
    cache = dec.new_cache(size, batch_size=tokens.shape[0])
    with torch.no_grad():
        first = dec(tokens[:, :3], cache)
        steps = [dec(tokens[:, i:i + 1], cache) for i in range(3, tokens.shape[1])]
    return torch.cat([first] + steps, dim=1), cache


@pytest.mark.parametrize("full_length", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2_sliding", "mistral", "llama_bias_tied"])
def test_decode_step_matches_eager_forward(tmp_path, arch, full_length):
    path, hf = make_tiny_model(arch, tmp_path)
    config = ModelConfig.from_file(path)
    dec = load_decoder(path, config, device="cpu", dtype="float32")
    tokens = random_tokens(config.vocab_size, 20)       # longer than the sliding window (8)
    ref, _ = _decode_all(dec, tokens)
    compiled.compile_step(dec, backend="eager", full_length=full_length)
    assert "decode_step" in dec.__dict__
    out, cache = _decode_all(dec, tokens)
    assert cache.offset == 20
    assert (out - ref).abs().max() <= 1e-5
    with torch.no_grad():
        assert (out - hf(tokens).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_decode_step_through_dynamo(tmp_path, quantize):
    # One graph (fullgraph) for float and quantized models: the int8/int4 kernels and their
    # bfloat16 input casts must trace too.
    path, _ = make_tiny_model("llama", tmp_path)
    config = ModelConfig.from_file(path)
    dec = load_decoder(path, config, device="cpu", dtype="float32", quantize=quantize)
    assert compiled.compile_unavailable(dec) is None
    tokens = random_tokens(config.vocab_size, 12)
    ref, _ = _decode_all(dec, tokens)
    compiled.compile_step(dec, mode=None, backend="eager", full_length=False)
    dec.__dict__["decode_step"].fn = torch.compile(compiled.DecodeStep(dec, False), backend="eager",
                                                   fullgraph=True)
    out, _ = _decode_all(dec, tokens)
    assert (out - ref).abs().max() <= (1e-5 if quantize is None else 1e-4)


def test_setup_decoder_policy_and_fallback(tmp_path, monkeypatch):
    path, _ = make_tiny_model("gpt2", tmp_path)
    gpt2 = load_decoder(path, ModelConfig.from_file(path), device="cpu")
    notes = []
    info = compiled.setup_decoder(gpt2, compile=True, notice=notes.append)
    assert not info["compiled"] and "gpt2" in notes[0]
    path, _ = make_tiny_model("llama", tmp_path / "l")
    dec = load_decoder(path, ModelConfig.from_file(path), device="cpu")
    assert compiled.setup_decoder(dec, max_new_tokens=16, compile=None)["compiled"] is False

    def boom(*a, **k):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(compiled, "compile_step", boom)
    notes.clear()
    info = compiled.setup_decoder(dec, compile=True, notice=notes.append)
    assert "compiling the decode step" in notes[0] and "about a minute" in notes[0]
    assert not info["compiled"] and "decoding eagerly" in notes[-1] and "C++" in notes[-1]
    assert "decode_step" not in dec.__dict__
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    assert "C compiler" in compiled.compile_unavailable(dec)


def test_automatic_compile_follows_the_warm_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    real = compiled.compile_step
    monkeypatch.setattr(compiled, "compile_step",
                        lambda d, **kw: real(d, backend="eager", full_length=False))
    path, _ = make_tiny_model("llama", tmp_path / "l")
    dec = load_decoder(path, ModelConfig.from_file(path), device="cpu")
    n = compiled.AUTO_COMPILE_WARM_MIN_TOKENS
    assert not compiled.cache_is_warm(dec)
    assert compiled.setup_decoder(dec, max_new_tokens=n, compile=None)["compiled"] is False
    info = compiled.setup_decoder(dec, max_new_tokens=n, compile=True)
    assert info["compiled"] and info["cache"] == "cold"
    assert info["cache_dir"] == str(tmp_path / "inductor") and compiled.cache_is_warm(dec)
    info = compiled.setup_decoder(dec, max_new_tokens=n, compile=None)    # warm: automatic
    assert info["compiled"] and info["cache"] == "warm"
    assert compiled.setup_decoder(dec, max_new_tokens=n - 1, compile=None)["compiled"] is False
    other = load_decoder(path, ModelConfig.from_file(path), device="cpu", dtype="bfloat16")
    assert not compiled.cache_is_warm(other)                              # keyed by dtype too
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("LLMSH_HOME", str(tmp_path / "home"))
    assert compiled.inductor_cache_dir() == str(tmp_path / "home" / "inductor")


def test_run_bench_reports_every_field(tmp_path):
    from llmsh.bench import format_bench, run_bench
    from llmsh.loader import LoadedModel

    path, _ = make_tiny_model("llama", tmp_path)
    config = ModelConfig.from_file(path)
    lm = LoadedModel(path=path, config=config, decoder=load_decoder(path, config, device="cpu"),
                     tokenizer=None)
    r = run_bench(lm, prompt_tokens=16, new_tokens=8, repetitions=2)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s"):
        assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"]
    assert r["peak_rss_mb"] > 0 and r["decode_gb_s"] > 0 and r["quantization"] == "none"
    assert r["dtype"] == "float32" and r["threads"] == torch.get_num_threads()
    assert "decode" in format_bench(r)
    with pytest.raises(ValueError):
        run_bench(lm, prompt_tokens=0)


def test_bench_command_json(tmp_path):
    from click.testing import CliRunner

    from llmsh.cli import cli

    path, _ = make_tiny_model("llama", tmp_path)
    res = CliRunner().invoke(cli, ["bench", "-m", str(path), "--device", "cpu", "-p", "8", "-n", "4",
                                   "-r", "1", "--quantize", "int8", "--dtype", "bfloat16", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["quantization"] == "int8" and r["dtype"] == "bfloat16" and r["decode_tok_s"]["median"] > 0
    assert {"prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "decode_gb_s"} <= set(r)


# --- the performance options on the model commands (generate, chat, perplexity, info) -----------

@pytest.fixture(scope="module")
def hf_bos_model(bos_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bos_model, attn_implementation="eager").eval()


def _cli(args, input=None):
    from click.testing import CliRunner

    from llmsh.cli import cli

    res = CliRunner().invoke(cli, args, input=input)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr)
    return res


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_generate_and_perplexity_quantized(bos_model, hf_bos_model, tmp_path, llmsh_home, quantize):
    from cli_fixtures import LONG_TEXT, hf_tokenizer
    from test_cli import hf_llamacpp_ppl

    args = ["-m", str(bos_model), "--quantize", quantize]
    out = json.loads(_cli(["generate", *args, "--raw", "-n", "6", "--json", "Hello world"]).stdout)
    vocab = hf_bos_model.config.vocab_size
    assert out["completion_tokens"] == len(out["tokens"]) and 1 <= len(out["tokens"]) <= 6
    assert all(0 <= t < vocab for t in out["tokens"]) and isinstance(out["text"], str)
    # Quantization perturbs the logits a little: perplexity stays close to transformers' float32.
    f = tmp_path / "long.txt"
    f.write_text(LONG_TEXT + "\n", encoding="utf-8")
    ids = hf_tokenizer(bos_model)(LONG_TEXT).input_ids
    want, n = hf_llamacpp_ppl(hf_bos_model, ids, 32, bos_id=0)
    got = json.loads(_cli(["perplexity", *args, "--n-ctx", "32", "--json", str(f)]).stdout)
    assert got["n_tokens"] == n
    assert abs(got["perplexity"] / want - 1) < (0.02 if quantize == "int8" else 0.1), (got, want)
    assert got["perplexity"] != pytest.approx(want, rel=1e-6)     # it did quantize


def test_info_shows_quantization_and_fusion(bos_model, hf_bos_model, llmsh_home):
    n_hf = hf_bos_model.num_parameters()
    for q in ("none", "int8", "int4"):
        data = json.loads(_cli(["info", "-m", str(bos_model), "--quantize", q, "--json"]).stdout)
        assert data["quantization"] == q and data["fused_projections"] is True
        assert data["parameters"] == n_hf
    text = _cli(["info", "-m", str(bos_model), "--quantize", "int8"]).stdout
    assert "quantization:" in text and "int8" in text and "fused projections: yes" in text


def test_generate_compile_option(bos_model, llmsh_home, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    real = compiled.compile_step
    calls = []

    def eager_backend(decoder, **kw):       # Dynamo's graph without inductor's C++ build
        calls.append(kw)
        return real(decoder, backend="eager", full_length=False)

    monkeypatch.setattr(compiled, "compile_step", eager_backend)
    base = ["generate", "-m", str(bos_model), "--raw", "-n", "8", "--json", "Hello world"]
    # The eager decoder is checked against transformers in test_model / test_cli.
    want = json.loads(_cli(base + ["--no-compile"]).stdout)["tokens"]
    assert not calls
    res = _cli(base + ["--compile"])
    assert calls and "compiled the decode step" in res.stderr
    assert json.loads(res.stdout)["tokens"] == want
    calls.clear()
    assert json.loads(_cli(base).stdout)["tokens"] == want     # default: automatic, eager for -n 8
    assert not calls
    # chat takes the options too (one piped message, answered once).
    res = _cli(["chat", "-m", str(bos_model), "--chat-template", "chatml", "-n", "8", "-t", "0", "--no-history", "--compile"],
               input="Hi\n")
    assert calls and res.stdout.strip()
    calls.clear()
    res = _cli(["chat", "-m", str(bos_model), "--chat-template", "chatml", "-n", "8", "-t", "0", "--no-history", "--quantize", "int8",
                "--compile"], input="Hi\n")
    assert calls and "compiled the decode step" in res.stderr and res.stdout.strip()


# --- bench's refusals, and automatic compile decided by the tokens generated ---------------------

def _fails(args):
    from click.testing import CliRunner

    from llmsh.cli import cli

    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert res.stderr.startswith("llmsh: error: ") and res.stderr.count("\n") == 1, res.stderr
    return res.stderr


def test_bench_refuses_what_it_cannot_measure(tmp_path):
    import os

    path, _ = make_tiny_model("llama", tmp_path)            # a context of 128 tokens
    m = ["bench", "-m", str(path), "--device", "cpu", "-r", "1"]
    assert "no decode step" in _fails(m + ["-p", "8", "-n", "1"])
    assert "-p (200 + 4 tokens) is more than the model's context (128" in _fails(m + ["-p", "200", "-n", "4"])
    assert "-p plus -n (100 + 40 tokens)" in _fails(m + ["-p", "100", "-n", "40"])
    for n in ("0", "-2", str(4 * (os.cpu_count() or 1) + 1)):
        assert "--threads" in _fails(m + ["-p", "8", "-n", "4", "--threads", n])


@pytest.fixture
def eager_compiles(tmp_path, monkeypatch):
    """compile_step with Dynamo's eager backend (no C++ build); the list records each compile."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    real = compiled.compile_step
    calls = []

    def eager_backend(decoder, **kw):
        calls.append(kw)
        return real(decoder, backend="eager", full_length=False)

    monkeypatch.setattr(compiled, "compile_step", eager_backend)
    return calls


def test_automatic_compile_waits_for_the_tokens_generated(tmp_path, monkeypatch, eager_compiles):
    from llmsh.generate import GenerationStats, generate_tokens
    from llmsh.sampling import SamplingParams

    monkeypatch.setattr(compiled, "AUTO_COMPILE_MIN_TOKENS", 8)
    path, _ = make_tiny_model("llama", tmp_path, max_position_embeddings=256)
    config = ModelConfig.from_file(path)
    dec = load_decoder(path, config, device="cpu", dtype="float32")
    greedy = SamplingParams(temperature=0.0)
    prompt = random_tokens(config.vocab_size, 5)[0].tolist()

    def reply(n, size=128):
        st = GenerationStats()
        return list(generate_tokens(dec, prompt, dec.new_cache(size), greedy, max_new_tokens=n, stats=st)), st

    want, _ = reply(40)                                       # eager
    assert compiled.defer_compile(dec, max_new_tokens=15) is None   # could never pay: stays eager
    step = compiled.defer_compile(dec, max_new_tokens=None)
    short, st = reply(5)                    # a reply that stops early: never compiled, whatever -n was
    assert short == want[:5] and not eager_compiles and st.compile_seconds == 0
    got, st = reply(8, size=5 + 10)         # 4 + 7 eager steps: past 8, but room for only 4 more
    assert not eager_compiles
    got, st = reply(40)                     # compiles once past 8 eager steps, then runs compiled
    assert len(eager_compiles) == 1 and step.info["compiled"] and step.step is not None
    assert got == want and st.compile_seconds > 0 and dec.__dict__["decode_step"] is step
    assert st.decode_seconds > 0


def test_generate_does_not_compile_for_a_large_n_alone(tmp_path, llmsh_home, eager_compiles):
    from cli_fixtures import ENDOFTEXT, vocab_size, write_tokenizer

    path, _ = make_tiny_model("llama", tmp_path, vocab_size=vocab_size(), max_position_embeddings=32768,
                              bos_token_id=ENDOFTEXT, eos_token_id=ENDOFTEXT, pad_token_id=ENDOFTEXT)
    write_tokenizer(path, bos=True, template=None)
    base = ["generate", "-m", str(path), "--raw", "--temperature", "0", "--json", "Hello world"]
    tenth = json.loads(_cli(base + ["-n", "10", "--no-compile"]).stdout)["tokens"][9]
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": tenth}))
    out = json.loads(_cli(base + ["-n", "100000"]).stdout)   # the reply ends by itself, by token 10
    assert out["finish_reason"] == "stop" and len(out["tokens"]) < 10
    assert not eager_compiles and out["timings"]["compile_s"] == 0
