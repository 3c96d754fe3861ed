"""GGUF -> Hugging Face folder (llmsh.convert), on tiny GGUF files written here with gguf.GGUFWriter.

The reference is the original transformers model: we permute its Q/K rows the way llama.cpp's
convert_hf_to_gguf.py does, write a GGUF (F32, and Q8_0 quantized with gguf.quants.quantize),
convert it back and check that the weights, the config and the logits come back. The tokenizer
round trip is checked against the byte-level BPE tokenizer the vocabulary was trained with;
llama.cpp's own ids are checked on the real default model in test_default_model.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from llmsh.convert import convert_gguf  # noqa: E402
from llmsh.errors import ConvertError  # noqa: E402
from tiny_models import build_tiny_hf_model  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
CORPUS = ("The quick brown fox jumps over the lazy dog. It was 1984 and 2025 in room 7. "
          "the then there these those that this think thing in on an and at as is it "
          "hello world, hello there! def main(): return 42\n\n\tindented text here. ") * 20
SAMPLES = ["Hello world", " Hello  world", "room  7", "1234567890 apples", "\n\n\tindent",
           "café naïve", "😀 emoji", "中文", "don't won't", "<|im_start|>user\nhi<|im_end|>", "", " "]

_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def train_tokenizer(vocab_size: int = 320):
    """A SmolLM-style byte-level BPE (digits split one by one), trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return tok


def llamacpp_permute(w: torch.Tensor, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF halves -> interleaved rotary pairs."""
    w = w.detach().numpy()
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, hf_model, tok, *, quant=QT.F32, tokenizer_model="gpt2", pre="smollm",
                    arch="llama", extra=None, add_bos=False):
    """Write ``hf_model`` (a transformers llama) and the trained ``tok`` as a GGUF file.

    quant: type for 2-D weights (F32 or a type gguf.quants.quantize supports), or a function of
    the GGUF tensor name giving it (a mix, as Q4_K_M files have); norms stay F32.
    extra: {gguf_name: ndarray} additional tensors (to provoke errors).
    """
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    sd = hf_model.state_dict()
    tensors = {}
    for key, t in sd.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = _name(key)
        if ".attn_q." in name:
            arr = llamacpp_permute(t, cfg.num_attention_heads)
        elif ".attn_k." in name:
            arr = llamacpp_permute(t, cfg.num_key_value_heads)
        else:
            arr = t.detach().numpy()
        tensors[name] = np.ascontiguousarray(arr, dtype=np.float32)
    tensors.update(extra or {})
    for name, arr in tensors.items():
        q = quant(name) if callable(quant) and not isinstance(quant, QT) else quant
        if arr.ndim == 2 and q != QT.F32 and arr.dtype == np.float32:
            w.add_tensor(name, gguf.quants.quantize(arr, q), raw_dtype=q)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _name(key: str) -> str:
    """Hugging Face key -> llama.cpp GGUF tensor name (the mapping convert.py inverts)."""
    if key.startswith("model.layers."):
        parts = key.split(".")
        return f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[key]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


def _model(tok, spec="llama", **kw):
    return build_tiny_hf_model(spec, vocab_size=tok.get_vocab_size(), **kw)


def _load_st(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.mark.parametrize("spec,tied", [("llama", False), ("llama", True), ("llama_bias_tied", True)])
def test_f32_round_trip_matches_transformers(tmp_path, tok, spec, tied):
    """Exact weights back, and logits equal; llama_bias_tied: head_dim 24 != 64/4, all biases."""
    from transformers import AutoModelForCausalLM

    hf = _model(tok, spec, tie_word_embeddings=tied)
    src = write_tiny_gguf(tmp_path / "tiny.gguf", hf, tok)
    out = convert_gguf(src, tmp_path / "out")
    sd, ref = _load_st(out), hf.state_dict()
    expected = {k for k in ref if not (tied and k == "lm_head.weight")}
    assert set(sd) == expected
    for k in expected:  # exact: F32 in, F32 out, permutation undone
        assert torch.equal(sd[k], ref[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "num_hidden_layers", "vocab_size", "max_position_embeddings", "head_dim",
                "attention_bias", "mlp_bias"):
        assert cfg[key] == getattr(hf.config, key), key
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 70, 200, 11, 300, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


def test_q8_0_dequantized_and_unpermuted(tmp_path, tok):
    hf = _model(tok)
    out = convert_gguf(write_tiny_gguf(tmp_path / "q8.gguf", hf, tok, quant=QT.Q8_0), tmp_path / "out")
    sd, ref = _load_st(out), hf.state_dict()
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
              "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
        w = ref[k]
        # Q8_0: blocks of 32, step d = max|x|/127 stored as float16: error <= d/2 + 127*d*2^-11
        tol = w.abs().max().item() / 127 * 0.6
        assert (sd[k] - w).abs().max().item() <= tol, k
    q = ref["model.layers.0.self_attn.q_proj.weight"]
    assert (sd["model.layers.0.self_attn.q_proj.weight"] - torch.from_numpy(llamacpp_permute(q, 4))).abs().max() > 0.05


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_dtypes_round_like_torch(tmp_path, tok, dtype, torch_dtype):
    hf = _model(tok)
    out = convert_gguf(write_tiny_gguf(tmp_path / "t.gguf", hf, tok), tmp_path / "out", dtype=dtype)
    sd, ref = _load_st(out), hf.state_dict()
    for k, t in sd.items():
        assert t.dtype == torch_dtype
        assert torch.equal(t, ref[k].to(torch_dtype)), k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


def test_tokenizer_and_configs(tmp_path, tok):
    from tokenizers import Tokenizer

    hf = _model(tok)
    out = convert_gguf(write_tiny_gguf(tmp_path / "t.gguf", hf, tok), tmp_path / "out")
    conv = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in SAMPLES:
        assert conv.encode(text).ids == tok.encode(text).ids, text
        assert conv.decode(conv.encode(text).ids, skip_special_tokens=False) == text
    # control tokens are special: parsed whole, and split like text when special parsing is off
    assert conv.encode("<|im_start|>").ids == [1]
    conv.encode_special_tokens = True
    ids = conv.encode("<|im_start|>user").ids
    assert 1 not in ids and conv.decode(ids) == "<|im_start|>user"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == CHAT_TEMPLATE
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["add_bos_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", False)
    gc = json.loads((out / "generation_config.json").read_text())
    # <|endoftext|> (0) is a control token llama.cpp treats as end of generation, after EOS
    assert (gc["bos_token_id"], gc["eos_token_id"], gc["pad_token_id"]) == (1, [2, 0], 2)


def test_add_bos_token_adds_bos(tmp_path, tok):
    from tokenizers import Tokenizer

    hf = _model(tok)
    out = convert_gguf(write_tiny_gguf(tmp_path / "t.gguf", hf, tok, add_bos=True), tmp_path / "out")
    conv = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert conv.encode("Hello").ids == [1] + tok.encode("Hello").ids
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


def _no_leftovers(parent: Path, keep=("t.gguf",)):
    return sorted(p.name for p in parent.iterdir() if p.name not in keep) == []


@pytest.mark.parametrize("kw,match", [
    (dict(tokenizer_model="bert"), "tokenizer model 'bert' is not supported"),
    (dict(pre="qwen35"), "pre-tokenizer 'qwen35' is not supported"),
    (dict(arch="gemma"), "architecture 'gemma'"),
    (dict(extra={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)}), "blk.0.attn_q_norm.weight"),
    (dict(extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)}), "only some self_attn"),
    (dict(extra={"rope_freqs.weight": np.array([3, 1, 1, 1, 1, 1, 1, 1], np.float32)}), "rope_freqs"),
    (dict(arch="falcon"), r"supported: llama, qwen2, qwen3, gemma3, gpt2"),
    (dict(extra={"blk.0.attn_sinks.weight": np.zeros((4, 64), np.int8)}), "attn_sinks"),
])
def test_refuses_unsupported(tmp_path, tok, kw, match):
    hf = _model(tok)
    src = write_tiny_gguf(tmp_path / "t.gguf", hf, tok, **kw)
    with pytest.raises(ConvertError, match=match):
        convert_gguf(src, tmp_path / "out")
    assert _no_leftovers(tmp_path)


def test_undequantizable_type_named_and_nothing_left(tmp_path, tok):
    hf = _model(tok)
    # an int8 tensor under a real weight name: GGUF type I8, which gguf cannot dequantize
    src = write_tiny_gguf(tmp_path / "t.gguf", hf, tok,
                          extra={"blk.1.ffn_up.weight": np.ones((128, 64), np.int8)})
    with pytest.raises(ConvertError, match=r"blk\.1\.ffn_up\.weight.*I8"):
        convert_gguf(src, tmp_path / "out")
    assert _no_leftovers(tmp_path)


def test_existing_output_and_bad_file(tmp_path, tok):
    hf = _model(tok)
    src = write_tiny_gguf(tmp_path / "t.gguf", hf, tok)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConvertError, match="already exists"):
        convert_gguf(src, tmp_path / "out")
    convert_gguf(src, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConvertError, match="bad.gguf"):
        convert_gguf(bad, tmp_path / "out2")
    with pytest.raises(ConvertError, match="dtype"):
        convert_gguf(src, tmp_path / "out3", dtype="int4")


def test_progress_reports_every_tensor(tmp_path, tok):
    hf = _model(tok)
    src = write_tiny_gguf(tmp_path / "t.gguf", hf, tok)
    seen = []
    convert_gguf(src, tmp_path / "out", progress=lambda *a: seen.append(a))
    n = len(hf.state_dict())  # untied: lm_head is a tensor of its own
    assert seen[-1] == ("convert", n, n) and len(seen) == n
