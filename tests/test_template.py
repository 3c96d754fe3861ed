"""llmsh.template.render_chat against transformers' apply_chat_template(..., tokenize=False)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmsh.errors import TemplateError
from llmsh.template import BUILTIN_TEMPLATES, FALLBACK_TEMPLATE, NoChatTemplateError, render_chat
from tiny_tokenizers import build_bytelevel_dir

transformers = pytest.importorskip("transformers")
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "smollm2-chat.json"

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2 chat template as published with meta-llama/Llama-2-7b-chat-hf
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# exercises tojson (no HTML escaping, indent), namespace, loop controls, strftime_now and
# whitespace control (trim_blocks / lstrip_blocks)
FEATURES = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ m['role'] }}>{{ m['content'] | tojson }}|{{ m | tojson(indent=2) }}
    {% if ns.n >= 3 %}{% break %}{% endif %}
{% endfor %}
{{ 'year:' + strftime_now('%Y') }}{% if add_generation_prompt %}GO{% endif %}"""

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}],
    "hard": [{"role": "user", "content": "  <b>café</b> & 'quotes' \"dq\" 中文 😀\n\ttab "}],
}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    d = build_bytelevel_dir(tmp_path_factory.mktemp("tpl") / "bl")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(bos_token="<s>", eos_token="</s>")  # strings only matter for the template variables
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return transformers.AutoTokenizer.from_pretrained(d)


def _hf(tok, template, messages, gen):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA2, FEATURES, FALLBACK_TEMPLATE], ids=["chatml", "llama2", "features",
                                                                                      "fallback"])
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_render_matches_transformers(hf_tokenizer, template, conv, gen):
    messages = CONVERSATIONS[conv]
    ours = render_chat(template, messages, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>",
                       unk_token="<|endoftext|>", pad_token="<|im_end|>")
    assert ours == _hf(hf_tokenizer, template, messages, gen)


def test_no_template_is_refused_and_chatml_is_builtin():
    # A base model is never prompted with markup it never saw: None is an error, ChatML is asked for.
    messages = CONVERSATIONS["system"]
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        render_chat(None, messages)
    assert NoChatTemplateError.exit_code == 2
    chatml = render_chat(BUILTIN_TEMPLATES["chatml"], messages)
    assert chatml.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_raise_exception_becomes_template_error(hf_tokenizer):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja_error()):
        _hf(hf_tokenizer, LLAMA2, bad, True)  # transformers refuses the same conversation
    with pytest.raises(TemplateError, match="roles must alternate"):
        render_chat(LLAMA2, bad, bos_token="<s>", eos_token="</s>")


def jinja_error():
    import jinja2

    return jinja2.exceptions.TemplateError


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}",
    "{{ messages.append({'role': 'x'}) }}",  # immutable sandbox: no mutation of the caller's data
])
def test_sandbox_blocks_attribute_abuse(template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError):
        render_chat(template, messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_sandbox_hides_unsafe_attributes():
    # as in transformers: an unsafe attribute reads as undefined (prints nothing, leaks nothing)
    assert render_chat("[{{ raise_exception.__globals__ }}][{{ strftime_now.__code__ }}]", []) == "[][]"


def test_errors_are_one_line_template_errors():
    with pytest.raises(TemplateError, match="syntax error"):
        render_chat("{% for m in messages %}", [{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError):
        render_chat(SMOLLM2, ["not a dict"])


def test_none_values_dropped_and_extra_variables():
    tpl = "{{ messages[0].get('name', 'anon') }}:{{ enable_thinking }}:{{ bos_token is defined }}:{{ tools is none }}"
    out = render_chat(tpl, [{"role": "user", "content": "x", "name": None}], enable_thinking=False)
    assert out == "anon:False:False:True"


def test_smollm2_reference_renders():
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} is absent (../shared/reference not available)")
    ref = json.loads(REFERENCE.read_text())
    for name, expected in ref["template_renders"].items():
        assert render_chat(SMOLLM2, ref["conversations"][name], add_generation_prompt=True) == expected
