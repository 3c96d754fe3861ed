"""A model without a chat template (a base model, like Gemma 3 270M) and ``--chat-template``.

Chat mode on such a model is refused in one line naming the way out (``generate --raw``,
``--chat-template FILE``), never run with ChatML markup the model never saw; ``generate --raw``
and ``perplexity`` keep working. ``--chat-template FILE`` (Jinja, or JSON with a
``chat_template`` key, or the built-in ``chatml``) is rendered as transformers renders it: the
prompt ids are transformers' ``apply_chat_template(..., chat_template=...)`` ids. The fixture
``bos_model`` has no template; ``chat_model`` has a ChatML one.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli_fixtures import CHATML_TEMPLATE, LONG_TEXT, bos_model, chat_model, hf_tokenizer, llmsh_home  # noqa: F401
from llmsh.cli import cli
from llmsh.errors import TemplateError
from llmsh.template import CHATML_TEMPLATE as BUILTIN_CHATML, NoChatTemplateError, read_chat_template

# Gemma's markup, as google/gemma-3-*-it's template writes it (no system role: folded into the
# first user turn); trim_blocks/lstrip_blocks apply, as in transformers.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

REFUSAL = "has no chat template (it is a base model?): "


def run(args, input=None):
    r = CliRunner().invoke(cli, args, input=input)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def ok(args, input=None):
    r = run(args, input)
    assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
    return r


def one_line_error(r, *fragments, code):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmsh: error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def hf_chat_ids(path, template, text):
    """transformers' prompt ids for one user message through ``template`` (the reference)."""
    tok = hf_tokenizer(path)
    out = tok.apply_chat_template([{"role": "user", "content": text}], chat_template=template,
                                  tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# --- refusal --------------------------------------------------------------------------------------


def test_chat_refuses_a_model_without_a_template(bos_model, llmsh_home):
    line = one_line_error(run(["chat", "-m", str(bos_model), "--no-history", "-n", "2"], input="Hi\n"), code=2)
    assert line == (f"llmsh: error: {bos_model} {REFUSAL}use --raw with generate, or give one with "
                    "--chat-template FILE")


@pytest.mark.parametrize("extra", [["--chat"], ["--system", "Be brief."]], ids=["chat", "system"])
def test_generate_chat_mode_refuses_a_model_without_a_template(bos_model, llmsh_home, extra):
    r = run(["generate", "-m", str(bos_model), "-n", "2", *extra, "hi"])
    line = one_line_error(r, REFUSAL, "use --raw", "--chat-template FILE", code=2)
    assert str(bos_model) in line and r.stdout == ""


def test_raw_generate_and_perplexity_still_work(bos_model, llmsh_home, tmp_path):
    r = ok(["generate", "-m", str(bos_model), "-n", "2", "--json", "hi"])   # default: --raw, quietly
    assert json.loads(r.stdout)["prompt_tokens"] == len(hf_tokenizer(bos_model)("hi").input_ids)
    assert r.stderr == ""
    f = tmp_path / "t.txt"
    f.write_text(LONG_TEXT)
    assert json.loads(ok(["ppl", "-m", str(bos_model), "-c", "32", "--json", str(f)]).stdout.splitlines()[0])["perplexity"] > 1


def test_library_refuses_too(bos_model):
    from llmsh.loader import load_model
    from llmsh.session import ChatSession, Message, encode_messages
    from llmsh.template import render_chat

    lm = load_model(str(bos_model), device="cpu", dtype="float32")
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        ChatSession(lm)
    with pytest.raises(NoChatTemplateError):
        encode_messages(lm, [Message("user", "hi")])
    with pytest.raises(NoChatTemplateError):
        render_chat(None, [{"role": "user", "content": "hi"}])


# --- --chat-template ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["jinja", "json", "json-named", "chatml"])
def test_generate_with_chat_template_matches_transformers(bos_model, llmsh_home, tmp_path, how):
    if how == "jinja":
        (tmp_path / "t.jinja").write_text(GEMMA_TEMPLATE, encoding="utf-8")
        arg, template = str(tmp_path / "t.jinja"), GEMMA_TEMPLATE
    elif how == "json":
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": GEMMA_TEMPLATE}))
        arg, template = str(tmp_path / "tokenizer_config.json"), GEMMA_TEMPLATE
    elif how == "json-named":
        (tmp_path / "c.json").write_text(json.dumps({"chat_template": [
            {"name": "tool_use", "template": "nope"}, {"name": "default", "template": CHATML_TEMPLATE}]}))
        arg, template = str(tmp_path / "c.json"), CHATML_TEMPLATE
    else:
        arg, template = "chatml", BUILTIN_CHATML
    text = "Hello, how are you today?"
    want = hf_chat_ids(bos_model, template, text)
    r = ok(["generate", "-m", str(bos_model), "--chat-template", arg, "-n", "2", "--json", text])
    assert json.loads(r.stdout)["prompt_tokens"] == len(want) and r.stderr == ""   # chat mode by default now
    # the prompt ids themselves, through the same path the command takes
    from llmsh.cli.common import encode_chat, use_chat_template
    from llmsh.loader import load_model

    lm = load_model(str(bos_model), device="cpu", dtype="float32")
    use_chat_template(lm, (arg, read_chat_template(arg)))
    assert encode_chat(lm, [{"role": "user", "content": text}]) == want


def test_bare_prompt_and_chat_take_the_template(bos_model, llmsh_home, tmp_path):
    t = tmp_path / "gemma.jinja"
    t.write_text(GEMMA_TEMPLATE, encoding="utf-8")
    # a bare prompt samples as chat does: pin the same decoding on both sides
    same = ["-n", "3", "-t", "0", "--repetition-penalty", "1", "--json", "hi"]
    a = ok(["-m", str(bos_model), "--chat-template", str(t), *same]).stdout
    b = ok(["generate", "-m", str(bos_model), "--chat-template", str(t), *same]).stdout
    assert json.loads(a)["tokens"] == json.loads(b)["tokens"]
    r = ok(["chat", "-m", str(bos_model), "--chat-template", str(t), "-n", "8", "-t", "0", "--no-history",
            "--no-log"],
           input="hi\n")
    assert r.stdout.strip() and "Traceback" not in r.stderr


def test_chat_template_replaces_the_models_own(chat_model, llmsh_home, tmp_path):
    t = tmp_path / "bare.txt"
    t.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    r = ok(["generate", "-m", str(chat_model), "--chat-template", str(t), "-n", "1", "--json", "Hello world"])
    assert json.loads(r.stdout)["prompt_tokens"] == len(hf_tokenizer(chat_model)("Hello world").input_ids)


@pytest.mark.parametrize("content, fragment", [
    (None, "cannot read the chat template"),
    (b"\xff\xfe{{ x }}", "is not UTF-8"),
    (b"{% for m in messages %}\n{{ m.content }\n{% endfor %}", "syntax error on line 2"),
    (b"  \n", "is empty"),
], ids=["missing", "not-utf8", "syntax", "empty"])
@pytest.mark.parametrize("command", ["chat", "generate", "serve"])
def test_bad_template_file_is_one_line_before_any_load(tmp_path, llmsh_home, content, fragment, command):
    f = tmp_path / "t.jinja"
    if content is not None:
        f.write_bytes(content)
    # -m names nothing: the template is checked at parse time, before the model would fail to load
    r = run([command, "-m", str(tmp_path / "no-such-model"), "--chat-template", str(f)] + (["hi"] if command == "generate" else []))
    line = one_line_error(r, "--chat-template", fragment, code=2)
    assert str(f) in line


@pytest.mark.parametrize("text, fragment", [
    ("{ not json", "is not valid JSON (line 1"),
    ('{"bos_token": "<s>"}', 'has no "chat_template" string'),
])
def test_bad_json_template(tmp_path, text, fragment):
    f = tmp_path / "tokenizer_config.json"
    f.write_text(text)
    with pytest.raises(TemplateError, match=fragment.replace("(", r"\(")):
        read_chat_template(str(f))


def test_builtin_name_and_a_file_of_that_name(tmp_path, monkeypatch):
    assert read_chat_template("chatml") == BUILTIN_CHATML
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chatml").write_text("{{ messages[0]['content'] }}")
    assert read_chat_template("./chatml") == "{{ messages[0]['content'] }}"


def test_chat_template_and_server_do_not_combine():
    for cmd in (["chat"], ["generate", "hi"]):
        r = run([*cmd, "--server", "http://127.0.0.1:9", "--chat-template", "chatml"], input="hi\n")
        one_line_error(r, "--chat-template", "llmsh serve", code=2)


# --- the server ---------------------------------------------------------------------------------


def test_server_refuses_chat_without_a_template_and_takes_one(bos_model):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from llmsh.cli.common import use_chat_template
    from llmsh.loader import load_model
    from llmsh.server import create_app

    lm = load_model(str(bos_model), device="cpu", dtype="float32")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with TestClient(create_app(lm)) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
        assert "--chat-template" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    lm2 = load_model(str(bos_model), device="cpu", dtype="float32")
    use_chat_template(lm2, ("chatml", BUILTIN_CHATML))
    with TestClient(create_app(lm2)) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(hf_chat_ids(bos_model, BUILTIN_CHATML, "hi"))


def test_readme_gemma_template_renders_gemma_markup():
    import re
    from pathlib import Path

    from llmsh.template import render_chat

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"```jinja\n(.*?)```", readme, re.S).group(1)
    conv = [{"role": "user", "content": "Hi "}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]
    for gen in (True, False):
        assert render_chat(snippet, conv, add_generation_prompt=gen, bos_token="<bos>") == \
            render_chat(GEMMA_TEMPLATE, conv, add_generation_prompt=gen, bos_token="<bos>")


def test_repl_show_names_the_template_file(bos_model, tmp_path):
    from test_repl import drive

    from llmsh.cli.common import use_chat_template
    from llmsh.loader import load_model

    t = tmp_path / "gemma.jinja"
    t.write_text(GEMMA_TEMPLATE, encoding="utf-8")
    lm = load_model(str(bos_model), device="cpu", dtype="float32")
    use_chat_template(lm, (str(t), read_chat_template(str(t))))
    rc, out, err = drive(lm, "hi\n/show\n/exit\n")
    assert rc == 0 and f"template: --chat-template {t}: {{{{ bos_token }}}}" in err + out
