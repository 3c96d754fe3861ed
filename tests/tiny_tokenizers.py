"""Tiny tokenizer folders trained inside the tests (offline, well under a second each).

* ``build_sentencepiece_dir``: a Llama-style folder (tokenizer.model + tokenizer_config.json)
  whose model is trained by sentencepiece's own trainer with Llama's settings (BPE, byte
  fallback, digits split, no whitespace normalisation, dummy prefix).
* ``build_bytelevel_dir``: a byte-level BPE tokenizer.json (GPT-2 / SmolLM style) trained by
  ``tokenizers`` with ChatML special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``.
* ``build_metaspace_json_dir``: a Llama-style tokenizer.json (Metaspace, byte fallback,
  TemplateProcessing adding ``<s>``) converted by transformers from the sentencepiece folder.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

HARD_STRINGS = [
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "Hello  world",
    "tabs\tand\nnewlines\n",
    "\n\n\tindent",
    "trailing ",
    " ",
    "",
    "café naïve façade",
    "Ωμέγα ☃ 𝄞 ẞ",  # characters absent from the corpora: byte fallback / raw bytes
    "😀 emoji 🇫🇷 flags",
    "中文分词测试",
    "1234567890 3.14",
    "don't won't can't",
    "a b",
    "<|im_start|>user\nhi<|im_end|>",
    "a<|im_end|>b",
    "<s>Hello</s>",
]

_WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
          "by word but not what all were we when your can said there use an each which she do how their if will "
          "up other about out many then them these so some her would make like him into time has look two more "
          "write go see number no way could people my than first water been call who oil its now find long down "
          "day did get come made may part").split()


def corpus() -> list[str]:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(300)]
    lines += [
        "The quick brown fox jumps over the lazy dog. Hello world! Hello, world.",
        "  Leading spaces and  double  spaces.\tTabs\tand newlines.",
        "café naïve façade résumé. 中文分词测试 日本語 한국어. Numbers 1234567890 and 3.14159.",
        "Emoji 😀 🇫🇷 are rare. don't won't can't. <s> </s> <|im_start|> tokens.",
    ] * 3
    return lines


def _added(content: str) -> dict:
    return {"content": content, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False}


def build_sentencepiece_dir(path: Path, *, legacy: bool | None = True) -> Path:
    import sentencepiece as spm

    path.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(path / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (path / "tokenizer.vocab").unlink()
    cfg = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>")},
    }
    if legacy is not None:
        cfg["legacy"] = legacy
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def build_bytelevel_dir(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    return path


def build_metaspace_json_dir(path: Path, sp_dir: Path) -> Path:
    """tokenizer.json from transformers' conversion of ``sp_dir``; loaded back as PreTrainedTokenizerFast
    (transformers' LlamaTokenizer class would rebuild the pre-tokenizer from its ``legacy`` flag)."""
    from transformers import AutoTokenizer

    tmp = path.with_name(path.name + "-save")
    AutoTokenizer.from_pretrained(sp_dir).save_pretrained(tmp)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp / "tokenizer.json", path / "tokenizer.json")
    shutil.rmtree(tmp)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
    }))
    return path
