"""Tiny model folders with a real tokenizer for the command-line tests.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` trainer on a few sentences
(English plus multi-byte UTF-8), with the ChatML special tokens ``<|endoftext|>`` (0),
``<|im_start|>`` (1), ``<|im_end|>`` (2). Variants:

- ``chat``: qwen2 weights, ChatML ``chat_template`` in tokenizer_config.json, no BOS (like
  SmolLM2 / Qwen2 instruct models); EOS = ``<|im_end|>``.
- ``bos``: llama weights, no chat template, and the tokenizer adds BOS = ``<|endoftext|>``
  (post-processor and ``add_bos_token``), like Llama base models.

Weights come from :func:`tiny_models.make_tiny_model` with the vocabulary resized to the
tokenizer's. Folders are built once per test session (a random model and a trained tokenizer
take about a second) and must not be modified by tests.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The model cache of the test suite (never the user's ~/.cache/llmsh): the default model is pulled
# here once per checkout (CI: once per run) and shared by every default-model test, subprocesses
# included. tests/conftest.py points LLMSH_HOME here for the whole session.
DEFAULT_MODEL_HOME = Path(os.environ.get("LLMSH_TEST_HOME") or Path(__file__).resolve().parent.parent / ".llmsh-home")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENDOFTEXT, IM_START, IM_END = 0, 1, 2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Hello, how are you today? I am fine, thank you very much.",
    "The quick brown fox jumps over the lazy dog.",
    "system user assistant: you are a helpful assistant. Name three colors.",
    "Café, naïve, déjà vu — 日本語のテキスト, emoji 🙂🚀 and ünïcödé.",
    "Tell me a story about a small robot that learns to paint pictures of the sea.",
    "def main():\n    print('hello world')\n    return 0\n",
]

# A text long enough for perplexity windows of a few dozen tokens.
LONG_TEXT = " ".join(_CORPUS[i % 5] for i in range(40))


@functools.cache
def tokenizer_json(*, bos: bool = False) -> str:
    """Train the byte-level BPE (deterministic) and return its tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
            special_tokens=[("<|endoftext|>", ENDOFTEXT)],
        )
    return tok.to_str()


def vocab_size() -> int:
    return len(json.loads(tokenizer_json())["model"]["vocab"])


def write_tokenizer(path: Path, *, bos: bool = False, template: str | None = CHATML_TEMPLATE) -> None:
    """Write tokenizer.json and tokenizer_config.json into ``path``."""
    path = Path(path)
    (path / "tokenizer.json").write_text(tokenizer_json(bos=bos), encoding="utf-8")
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>" if bos else None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": bos,
        "add_eos_token": False,
        "model_max_length": 128,
    }
    if template is not None:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")


@functools.cache
def build(kind: str, base: str) -> Path:
    """Build the ``kind`` model folder ("chat" or "bos") under ``base`` once; return its path."""
    from tiny_models import make_tiny_model

    if kind == "chat":
        arch, bos, template, extra = "qwen2", False, CHATML_TEMPLATE, dict(bos_token_id=None)
    elif kind == "bos":
        arch, bos, template, extra = "llama", True, None, dict(bos_token_id=ENDOFTEXT)
    else:
        raise ValueError(kind)
    kwargs = dict(vocab_size=vocab_size(), eos_token_id=IM_END, pad_token_id=ENDOFTEXT,
                  max_position_embeddings=256, **extra)
    path, _ = make_tiny_model(arch, Path(base) / kind, **kwargs)
    write_tokenizer(path, bos=bos, template=template)
    return path


@functools.cache
def _base() -> str:
    base = tempfile.mkdtemp(prefix="llmsh-cli-test-")
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    return base


def hf_tokenizer(path: Path):
    """The transformers tokenizer of a fixture folder (the reference for tokenize tests)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def chat_model() -> Path:
    return build("chat", _base())


@pytest.fixture(scope="session")
def bos_model() -> Path:
    return build("bos", _base())


@pytest.fixture
def llmsh_home(tmp_path, monkeypatch) -> Path:
    """An empty model cache, so that no test touches the user's and nothing is pulled by accident."""
    home = tmp_path / "llmsh-home"
    home.mkdir()
    monkeypatch.setenv("LLMSH_HOME", str(home))
    monkeypatch.delenv("LLMSH_MODEL", raising=False)
    return home
