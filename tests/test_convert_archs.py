"""GGUF -> Hugging Face folder for every GGUF architecture llmsh reads (llama, qwen2, qwen3,
gemma3, gpt2), on tiny GGUF files written in the test (tests/tiny_ggufs.py, llama.cpp's layout).

Reference: transformers, on the same weights (those the file holds, dequantized by gguf):
the converted folder must give its logits within 1e-4 in float32, through llmsh's Decoder and
through transformers itself (so the config.json is one transformers reads the same way).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from llmsh import gguf_config  # noqa: E402
from llmsh.convert import convert_gguf  # noqa: E402
from llmsh.errors import ConvertError  # noqa: E402
from test_convert import train_tokenizer  # noqa: E402
from tiny_ggufs import llama3_rope_freqs, round_trip_reference, write_gguf  # noqa: E402
from cli_fixtures import llmsh_home  # noqa: E402,F401
from tiny_models import build_tiny_hf_model, random_tokens  # noqa: E402

MIXED = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.F16, QT.BF16]

# Shapes a GGUF can express: Gemma 3's layer pattern (every 6th layer global) and attention
# scale (head_dim**-0.5) are fixed by llama.cpp, so the tiny Gemma uses them; its 8-token
# window and global linear RoPE scaling stay visible within 24 tokens.
CASES = {
    "llama": ("llama", {}),
    "llama_tied_bias": ("llama_bias_tied", {}),
    "qwen2_untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2_tied": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma3": ("gemma3", dict(num_hidden_layers=7, sliding_window_pattern=6, query_pre_attn_scalar=32)),
    "gpt2_tied": ("gpt2", {}),
    "gpt2_untied": ("gpt2", dict(tie_word_embeddings=False)),
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


def _build(tok, case):
    spec, kw = CASES[case]
    return build_tiny_hf_model(spec, vocab_size=tok.get_vocab_size(), **kw)


def _our_logits(folder, ids):
    from llmsh.config import ModelConfig
    from llmsh.weights import load_decoder

    dec = load_decoder(folder, ModelConfig.from_file(folder), device="cpu", dtype="float32")
    with torch.no_grad():
        return dec(ids)


def _check(folder, ref, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        want = ref(ids).logits
        back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        torch.testing.assert_close(back(ids).logits, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(_our_logits(folder, ids), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("quant", ["f32", "mixed"])
def test_converted_logits_match_transformers(tmp_path, tok, case, quant):
    hf = _build(tok, case)
    q = QT.F32 if quant == "f32" else MIXED
    out = convert_gguf(write_gguf(tmp_path / "t.gguf", hf, tok, quant=q), tmp_path / "out")
    ref = round_trip_reference(hf, q)
    if quant == "f32":  # nothing lost: the transformers model itself
        ref = hf
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == hf.config.model_type
    assert cfg["tie_word_embeddings"] is bool(hf.config.tie_word_embeddings)
    _check(out, ref, random_tokens(tok.get_vocab_size(), 24, batch=2))


def test_gemma3_config_as_llamacpp_reads_it(tmp_path, tok):
    hf = _build(tok, "gemma3")
    cfg = json.loads((convert_gguf(write_gguf(tmp_path / "t.gguf", hf, tok), tmp_path / "o") / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert (cfg["sliding_window"], cfg["query_pre_attn_scalar"], cfg["head_dim"]) == (8, 32, 32)
    assert cfg["rope_parameters"] == {
        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    assert cfg["final_logit_softcapping"] is None


def test_gemma3_norms_lose_the_plus_one(tmp_path, tok):
    from safetensors.torch import load_file

    hf = _build(tok, "gemma3")
    out = convert_gguf(write_gguf(tmp_path / "t.gguf", hf, tok), tmp_path / "o")
    sd, ref = load_file(str(out / "model.safetensors")), hf.state_dict()
    for k in ("model.norm.weight", "model.layers.0.self_attn.q_norm.weight",
              "model.layers.3.post_feedforward_layernorm.weight", "model.layers.6.input_layernorm.weight"):
        torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=1e-6)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, tok):
    hf = build_tiny_hf_model("llama3_rope", vocab_size=tok.get_vocab_size())
    rs = hf.config.rope_parameters
    freqs = llama3_rope_freqs(rs["rope_theta"], hf.config.head_dim, rs["factor"], rs["low_freq_factor"],
                              rs["high_freq_factor"], rs["original_max_position_embeddings"])
    assert freqs.min() == 1 and freqs.max() == 4 and ((freqs > 1) & (freqs < 4)).sum() == 1  # one smoothed
    out = convert_gguf(write_gguf(tmp_path / "t.gguf", hf, tok, extra={"rope_freqs.weight": freqs}),
                       tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    _check(out, hf, random_tokens(tok.get_vocab_size(), 24))


@pytest.mark.parametrize("factor,low,high,old,theta,dim", [
    (8.0, 1.0, 4.0, 8192, 500000.0, 128),    # Llama 3.1
    (32.0, 1.0, 4.0, 8192, 500000.0, 64),    # Llama 3.2 1B/3B
    (4.0, 2.0, 8.0, 4096, 500000.0, 128),    # not Llama's: recovered up to the equivalent pair
])
def test_llama3_scaling_recovered_from_divisors(factor, low, high, old, theta, dim):
    rf = llama3_rope_freqs(theta, dim, factor, low, high, old)
    got = gguf_config.llama3_rope_scaling(rf, theta, dim)
    again = llama3_rope_freqs(theta, dim, got["factor"], got["low_freq_factor"], got["high_freq_factor"],
                              got["original_max_position_embeddings"])
    np.testing.assert_allclose(again, rf, rtol=1e-5)
    if low == 1.0:
        assert got == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": old}


def test_llama3_all_ones_is_no_scaling():
    assert gguf_config.llama3_rope_scaling(np.ones(32, np.float32), 500000.0, 64) is None
    with pytest.raises(ConvertError, match="entries"):
        gguf_config.llama3_rope_scaling(np.ones(8, np.float32), 500000.0, 64)


@pytest.mark.parametrize("case,extra,match", [
    ("qwen2_tied", {"rope_freqs.weight": np.ones(8, np.float32)}, "rope_freqs.weight.*'qwen2'"),
    ("gemma3", {"blk.0.ffn_gate_inp.weight": np.ones((4, 64), np.float32)}, "ffn_gate_inp"),
    ("gpt2_tied", {"blk.0.attn_q.weight": np.ones((64, 64), np.float32)}, "blk.0.attn_q.weight.*'gpt2'"),
])
def test_tensors_an_architecture_lacks_are_refused(tmp_path, tok, case, extra, match):
    src = write_gguf(tmp_path / "t.gguf", _build(tok, case), tok, extra=extra)
    with pytest.raises(ConvertError, match=match):
        convert_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_quant_type_named(tmp_path, tok):
    hf = _build(tok, "qwen3")
    src = write_gguf(tmp_path / "t.gguf", hf, tok, extra={"blk.1.ffn_up.weight": np.ones((128, 64), np.int8)})
    with pytest.raises(ConvertError, match=r"blk\.1\.ffn_up\.weight.*I8"):
        convert_gguf(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]


def test_unknown_architecture_lists_supported():
    with pytest.raises(ConvertError, match=r"^GGUF architecture 'mamba' is not supported "
                                           r"\(supported: llama, qwen2, qwen3, gemma3, gpt2\)$"):
        gguf_config.hf_config({"general.architecture": "mamba"}, {}, "float32")


def test_missing_metadata_key_named():
    with pytest.raises(ConvertError, match=r"^GGUF metadata lacks qwen3\.block_count$"):
        gguf_config.hf_config({"general.architecture": "qwen3"}, {}, "float32")


def _cli(args):
    from click.testing import CliRunner

    from llmsh.cli import cli

    r = CliRunner().invoke(cli, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


@pytest.mark.parametrize("case", ["gemma3", "qwen3", "gpt2_untied"])
def test_cli_runs_a_gguf_of_each_architecture(tmp_path, tok, llmsh_home, case):
    """-m FILE.gguf: converted into the cache, greedy ids those of transformers on the weights."""
    hf = _build(tok, case)
    src = write_gguf(tmp_path / f"{case}.gguf", hf, tok)
    r = _cli(["generate", "-m", str(src), "--raw", "-n", "8", "-t", "0", "--json", "hello world"])
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)["tokens"]
    ids = tok.encode("hello world").ids
    want = []
    with torch.no_grad():
        for _ in range(8):
            want.append(int(hf(torch.tensor([ids + want])).logits[0, -1].argmax()))
    assert got and got == want[:len(got)]
    assert len(got) == 8 or want[len(got)] in (1, 2)   # stopped early only on an end token


def test_cli_unknown_architecture_one_line_error(tmp_path, tok, llmsh_home):
    src = write_gguf(tmp_path / "t.gguf", _build(tok, "qwen3"), tok)
    data = src.read_bytes().replace(b"qwen3", b"qwenX")   # every key and the architecture name
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    for args in (["generate", "-m", str(bad), "--raw", "hi"], ["convert", str(bad), str(tmp_path / "out")]):
        r = _cli(args)
        lines = [x for x in r.stderr.strip().splitlines() if "converting" not in x]  # -m: a notice first
        assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert lines[0] == ("llmsh: error: GGUF architecture 'qwenX' is not supported "
                            "(supported: llama, qwen2, qwen3, gemma3, gpt2)"), lines[0]
