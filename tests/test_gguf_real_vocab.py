"""Tokenizers built by llmsh.gguf_vocab from real GGUF files, against llama.cpp's token ids.

References (../shared/reference, see its README): llama.cpp's ``llama_tokenize`` ids for hard
strings, the three greedy prompts (with BOS where the model adds one) and the token count of
gpl-3.txt in its perplexity run, for Qwen2.5-Coder-0.5B (gpt2-type, pre-tokenizer ``qwen2``),
Gemma 3 270M (llama-type: sentencepiece scores, byte fallback, no dummy prefix) and SmolLM2-135M
(``smollm``). The files are found by tests/real_models.py (or the test is skipped).
"""

from __future__ import annotations

import json

import pytest

from llmsh import gguf_vocab
from llmsh.tokenizer import Tokenizer
from real_models import REFERENCE, SHARED, gguf_file, reference

REAL = {"qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b.json", "gemma-3-270m": "gemma-3-270m.json"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            path = gguf_file(name, tmp_path_factory.mktemp("fetch"))
            meta = gguf_vocab.read_metadata(path)
            folder = gguf_vocab.write_tokenizer(meta, tmp_path_factory.mktemp("tok") / name)
            cache[name] = (meta, Tokenizer.from_dir(folder))
        return cache[name]
    return get


def _gpl3() -> str:
    p = SHARED / "data" / "gpl-3.txt"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    text = p.read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text  # llama-perplexity drops one trailing newline


@pytest.mark.parametrize("name", list(REAL))
def test_token_ids_equal_llamacpp(built, name):
    ref = reference(REAL[name])["llamacpp"]
    _, tok = built(name)
    assert (tok.bos_token_id, tok.eos_token_ids[0], tok.add_bos) == (ref["bos"], ref["eos"], ref["add_bos"])
    for case in ref["tokenize"]:  # llama.cpp's ids here are without BOS
        assert tok.encode(case["text"], add_bos=False, parse_special=case["parse_special"]) == case["ids"], case
    for g in ref["greedy"]:  # with BOS when the model adds one (Gemma)
        assert tok.encode(g["prompt"]) == g["prompt_ids"], g["prompt"]


@pytest.mark.parametrize("name", list(REAL))
def test_gpl3_token_count_equals_llamacpp_perplexity_run(built, name):
    ref = reference(REAL[name])["llamacpp"]["perplexity_c512"]["gpl-3"]
    _, tok = built(name)
    ids = tok.encode(_gpl3())  # BOS included where the model adds one, as llama-perplexity does
    assert len(ids) == ref["tokens"]
    assert tok.decode(ids, skip_special=True) == _gpl3()


def test_gemma_chat_markup_and_end_of_turn(built):
    meta, tok = built("gemma-3-270m")
    assert "tokenizer.chat_template" not in meta and tok.chat_template is None  # a base model
    sot, eot, nl = (tok.token_to_id(t) for t in ("<start_of_turn>", "<end_of_turn>", "\n"))
    markup = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.encode(markup, parse_special=True) == [
        tok.bos_token_id, sot, *tok.encode("user", add_bos=False), nl, *tok.encode("hi", add_bos=False), eot, nl,
        sot, *tok.encode("model", add_bos=False), nl]
    assert not {sot, eot} & set(tok.encode(markup))  # typed by a user: plain text
    assert eot in tok.eos_token_ids  # llama.cpp ends generation at <end_of_turn>


def test_qwen_chat_template_and_user_defined_tokens(built):
    meta, tok = built("qwen2.5-coder-0.5b-instruct")
    assert tok.chat_template == meta["tokenizer.chat_template"]
    call = tok.token_to_id("<tool_call>")  # user-defined (type 4): matched even in user text
    assert tok.encode("x<tool_call>y", add_bos=False)[1] == call
    assert set(tok.eos_token_ids) >= {151645, 151643}


@pytest.mark.default_model
def test_smollm2_gguf_tokenizes_as_llamacpp(built):
    path = REFERENCE / "smollm2-tokenize.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    _, tok = built("smollm2-135m-instruct")
    for line in path.read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        assert tok.encode(case["text"], parse_special=case["parse_special"]) == case["ids"], case
