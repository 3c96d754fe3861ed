"""llmsh.gguf_vocab: GGUF tokenizer metadata -> tokenizer files, against llama.cpp.

References: the pre-tokenizer regexes of llama.cpp's ``src/llama-vocab.cpp`` (written out here
again, and applied with Python's ``regex`` module: an independent computation of the split),
llama.cpp's token ids for the real Qwen2.5-Coder, Gemma 3 and SmolLM2 files in
../shared/reference, and sentencepiece itself for a tiny trained SPM model.
"""

from __future__ import annotations

import json

import pytest

from llmsh import gguf_vocab
from llmsh.errors import ConvertError
from llmsh.tokenizer import Tokenizer
from real_models import gguf_file, reference
from tiny_tokenizers import HARD_STRINGS, build_sentencepiece_dir

regex = pytest.importorskip("regex")

# llama.cpp's regex_exprs per pre-tokenizer type (llm_tokenizer_bpe), copied from its source
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_C = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMACPP_REGEXES = {
    "gpt-2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "qwen2": [_C + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "llama-bpe": [_C + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}
# strings on which the four splits differ: digit runs, contractions (and upper-case ones),
# CJK, runs of spaces, newlines after punctuation, tabs, leading and trailing whitespace
SPLIT_STRINGS = [
    "room 1234567 and 12", "DON'T stop, we'll see; I'M here", "中文分词 测试123",
    "a  b   c\n\n  d", "end.\n\nnext!\r\n", "\tx = f(y)  \n", "  lead and trail  ", "$100.50 or 3.14",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte -> printable character table (openai/gpt-2 encoder.py), used by byte-level BPE
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


B2U = _bytes_to_unicode()


def _bl(s: str) -> str:
    return "".join(B2U[b] for b in s.encode("utf-8"))


def reference_split(text: str, regexes: list[str]) -> list[str]:
    """Each regex splits every piece so far into its matches and the text between them."""
    pieces = [text]
    for r in regexes:
        out = []
        for p in pieces:
            pos = 0
            for m in regex.finditer(r, p):
                if m.start() > pos:
                    out.append(p[pos:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = m.end()
            if pos < len(p):
                out.append(p[pos:])
        pieces = out
    return pieces


def bpe_meta(pre: str, extra_pieces=(), **kw) -> dict:
    """gpt2-type GGUF metadata: the 256 byte symbols, ChatML control tokens, and one merge chain
    per piece of ``extra_pieces`` (byte-level strings), so whole pieces become single tokens."""
    tokens = [B2U[b] for b in range(256)] + SPECIALS
    merges = []
    for p in dict.fromkeys(extra_pieces):
        for k in range(1, len(p)):
            if p[:k + 1] not in tokens:
                tokens.append(p[:k + 1])
                merges.append(f"{p[:k]} {p[k]}")
    types = [1] * len(tokens)
    for s in SPECIALS:
        types[tokens.index(s)] = 3
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 256,
            "tokenizer.ggml.eos_token_id": 258}
    meta.update(kw)
    return meta


def load(meta, tmp_path) -> Tokenizer:
    return Tokenizer.from_dir(gguf_vocab.write_tokenizer(meta, tmp_path / "tok"))


@pytest.mark.parametrize("pre", list(LLAMACPP_REGEXES))
def test_pre_tokenizer_split_and_ids_match_llamacpp_regexes(tmp_path, pre):
    from tokenizers import Tokenizer as HFTokenizer

    splits = {text: reference_split(text, LLAMACPP_REGEXES[pre]) for text in SPLIT_STRINGS}
    pieces = [_bl(p) for parts in splits.values() for p in parts]
    meta = bpe_meta(pre, pieces, **{"tokenizer.ggml.add_bos_token": False})
    files = gguf_vocab.tokenizer_files(meta)
    hf = HFTokenizer.from_str(files["tokenizer.json"].decode())
    tok = load(meta, tmp_path)
    for text, parts in splits.items():
        got = [p for p, _ in hf.pre_tokenizer.pre_tokenize_str(text)]
        assert got == [_bl(p) for p in parts], text
        # each piece is one token of the chain vocabulary, so the ids spell out the split
        want = [t.id for p in parts for t in hf.model.tokenize(_bl(p))]
        assert tok.encode(text) == want, text
        assert tok.decode(want) == text


def test_split_strings_tell_the_pre_tokenizers_apart():
    splits = {pre: [reference_split(t, r) for t in SPLIT_STRINGS] for pre, r in LLAMACPP_REGEXES.items()}
    assert len({json.dumps(s) for s in splits.values()}) == len(splits)


def test_llama_bpe_ignores_merges_for_whole_words_and_adds_bos(tmp_path):
    # "Ġhello" is in the vocabulary but no merge builds it: llama-bpe (ignore_merges) takes it whole,
    # qwen2 falls back to the bytes; llama-bpe adds BOS unless the file says otherwise
    def meta(pre, **kw):
        m = bpe_meta(pre, **kw)
        m["tokenizer.ggml.tokens"] = [*m["tokenizer.ggml.tokens"], "Ġhello"]
        m["tokenizer.ggml.token_type"] = [*m["tokenizer.ggml.token_type"], 1]
        return m

    hello = 259  # byte b has id b in bpe_meta's vocabulary
    llama = load(meta("llama-bpe"), tmp_path / "a")
    assert llama.add_bos and llama.encode("a hello") == [256, ord("a"), hello]
    assert load(meta("llama-bpe", **{"tokenizer.ggml.add_bos_token": False}), tmp_path / "b").encode(" hello") == [hello]
    qwen = load(meta("qwen2"), tmp_path / "c")
    assert not qwen.add_bos and qwen.encode(" hello") == list(b" hello")


def test_unknown_pre_tokenizer_refused_with_the_supported_names():
    with pytest.raises(ConvertError, match=r"pre-tokenizer 'qwen35' is not supported \(supported: gpt-2, "
                                           r"smollm, qwen2, llama-bpe"):
        gguf_vocab.tokenizer_files(bpe_meta("qwen35"))
    with pytest.raises(ConvertError, match="tokenizer model 'bert' is not supported"):
        gguf_vocab.tokenizer_files(dict(bpe_meta("gpt-2"), **{"tokenizer.ggml.model": "bert"}))


def test_control_and_user_defined_tokens(tmp_path):
    m = bpe_meta("gpt-2", **{"tokenizer.ggml.add_eos_token": True})
    m["tokenizer.ggml.tokens"] = [*m["tokenizer.ggml.tokens"], "<tool_call>"]
    m["tokenizer.ggml.token_type"] = [*m["tokenizer.ggml.token_type"], 4]
    tok = load(m, tmp_path)
    # user-defined: matched even in user text; control: only when parsing markup
    assert tok.encode("a<tool_call>b") == [ord("a"), 259, ord("b")]
    assert tok.encode("<|im_start|>x", parse_special=True) == [257, ord("x")]
    assert 257 not in tok.encode("<|im_start|>x")
    assert tok.add_eos and tok.encode("a") == [ord("a")]  # encode never appends EOS
    assert tok.eos_token_ids == [258, 256]  # eos, then <|endoftext|> as llama.cpp's end of generation


def test_read_metadata_reads_no_tensors(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    m = bpe_meta("smollm")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(m["tokenizer.ggml.tokens"])
    w.add_token_types(m["tokenizer.ggml.token_type"])
    w.add_token_merges(m["tokenizer.ggml.merges"])
    w.add_context_length(77)
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: pytest.fail("dequantized a tensor"))
    meta = gguf_vocab.read_metadata(tmp_path / "t.gguf")
    assert meta["tokenizer.ggml.tokens"] == m["tokenizer.ggml.tokens"] and meta["llama.context_length"] == 77
    assert not any(k.startswith("GGUF.") for k in meta)
    files = gguf_vocab.tokenizer_files(meta)
    assert json.loads(files["tokenizer_config.json"])["model_max_length"] == 77
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)
    with pytest.raises(ConvertError, match="cannot read GGUF file"):
        gguf_vocab.read_metadata(tmp_path / "bad.gguf")


# --- sentencepiece (llama-type) -------------------------------------------------------------

def spm_meta_from_model(model_path, **kw) -> dict:
    """What convert_hf_to_gguf.py writes for a sentencepiece model: pieces, scores, types."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    n = sp.get_piece_size()
    types = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 5 if sp.IsUnused(i) else 1
             for i in range(n)]
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    meta.update(kw)
    return meta, sp


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return build_sentencepiece_dir(tmp_path_factory.mktemp("sp")) / "tokenizer.model"


def test_spm_ids_equal_sentencepiece_with_dummy_prefix(tmp_path, sp_model):
    meta, sp = spm_meta_from_model(sp_model)
    tok = load(meta, tmp_path)
    assert tok.add_bos and tok.bos_token_id == 1  # llama.cpp's default for SPM
    for text in HARD_STRINGS:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


def test_spm_without_space_prefix_and_with_user_defined_tokens(tmp_path, sp_model):
    # Gemma-style: no dummy prefix; user-defined "\n" and "  " are split out of the raw text first
    meta, sp = spm_meta_from_model(sp_model, **{"tokenizer.ggml.add_space_prefix": False,
                                                "tokenizer.ggml.add_bos_token": False})
    n = len(meta["tokenizer.ggml.tokens"])
    meta["tokenizer.ggml.tokens"] += ["\n", "  ", "<start_of_turn>"]
    meta["tokenizer.ggml.scores"] += [-1000.0] * 3
    meta["tokenizer.ggml.token_type"] += [4, 4, 3]
    tok = load(meta, tmp_path)
    word = tok.encode("the")
    assert tok.id_to_piece(word[0]).startswith("t")  # no "▁" prepended
    assert tok.encode("the\nthe  the") == [*word, n, *word, n + 1, *word]
    assert tok.encode("<start_of_turn>the", parse_special=True) == [n + 2, *word]
    assert n + 2 not in tok.encode("<start_of_turn>the")
    assert tok.decode(tok.encode("the\nthe  the")) == "the\nthe  the"
