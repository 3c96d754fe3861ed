"""Output that cannot be written is one line on stderr and a non-zero exit, never a traceback:
stdout on a full disk (/dev/full) and a stdout encoding that cannot hold the text (issue 9)."""

from __future__ import annotations

import os

import pytest

from cli_fixtures import chat_model, llmsh_home  # noqa: F401
from test_cli_subprocess import ROOT, env, llmsh  # noqa: F401


def _one_line(r, fragment):
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(b"llmsh: error: ") and r.stderr.count(b"\n") == 1, r.stderr
    assert fragment in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("args, stdin", [
    (["generate", "-n", "20", "hi"], b""),
    (["tokenize", "hello"], b""),
    (["ppl", "--each-line"], b"hello world\n"),
])
def test_stdout_on_a_full_disk(args, stdin, chat_model, env):
    with open("/dev/full", "wb") as full:
        import subprocess
        import sys
        r = subprocess.run([sys.executable, "-m", "llmsh", args[0], "-m", str(chat_model), *args[1:]],
                           input=stdin, stdout=full, stderr=subprocess.PIPE, env=env, cwd=ROOT, timeout=120)
    _one_line(r, b"No space left on device")


def test_stdout_encoding_that_cannot_hold_the_text(chat_model, env):
    r = llmsh(["tokenize", "-m", str(chat_model), "--pieces", "你好"], env=dict(env, PYTHONIOENCODING="latin-1"))
    _one_line(r, b"PYTHONIOENCODING=utf-8")


def test_each_line_ignores_crlf_and_refuses_empty_input(chat_model, llmsh_home):  # noqa: F811
    import json

    from test_cli import ok, one_line_error, run

    m = ["ppl", "-m", str(chat_model), "--each-line", "--json"]
    lf = [json.loads(x) for x in ok(m, input="hello world\nthe quick fox\n").stdout.splitlines()]
    crlf = [json.loads(x) for x in ok(m, input="hello world\r\nthe quick fox\r\n").stdout.splitlines()]
    assert [r["n_tokens"] for r in crlf] == [r["n_tokens"] for r in lf]
    assert [r["perplexity"] for r in crlf] == pytest.approx([r["perplexity"] for r in lf])
    one_line_error(run(m, input=""), "<stdin>: empty input")


@pytest.mark.parametrize("cmd", [["generate", "hi"], ["tokenize", "hi"]])
def test_a_bad_model_from_llmsh_model_says_so(cmd, llmsh_home, tmp_path):  # noqa: F811
    from test_cli import one_line_error, run

    bad = str(tmp_path / "no-such-model")
    one_line_error(run(cmd, env={"LLMSH_MODEL": bad}), bad, "came from LLMSH_MODEL")
    line = one_line_error(run([cmd[0], "-m", bad, *cmd[1:]]), bad)
    assert "LLMSH_MODEL" not in line


def test_the_chat_history_location_is_documented():
    from test_cli import ok

    from llmsh.cli.repl import history_path

    text = " ".join(ok(["chat", "--help"]).stdout.split())
    assert history_path().name in text and "~/.local/share/llmsh/chat_history" in text
    page = (ROOT / "man" / "llmsh.1").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "chat_history" in page and "~/.local/share/llmsh/chat_history" in readme


def test_the_man_page_says_what_decode_prints(chat_model, llmsh_home):  # noqa: F811
    from test_cli import ok

    ids = ok(["tokenize", "-m", str(chat_model), "--no-bos", "Hello world"]).stdout
    out = ok(["tokenize", "-m", str(chat_model), "--decode"], input=ids).stdout
    assert out == "Hello world"                      # exact: no newline added in a pipe
    page = " ".join((ROOT / "man" / "llmsh.1").read_text(encoding="utf-8").split())
    assert "except for tokenize \\-\\-decode, which prints the decoded text exactly" in page


class _Tty(__import__("io").StringIO):
    def isatty(self):
        return True


def test_prefill_progress_only_on_a_terminal_and_only_for_long_prompts(monkeypatch):
    """Issue 9 item 12: "prefill DONE/TOTAL tokens" on a terminal's stderr while a long prompt is
    prefilled, gone (transient) when it is done; nothing on a pipe or for a one-chunk prompt."""
    import io

    from llmsh.cli import output

    monkeypatch.setenv("NO_COLOR", "1")
    tty = _Tty()
    bar = output.PrefillProgress(tty)
    for done in (0, 512, 1024, 1500):
        bar(done, 1500)
    assert "prefill" in tty.getvalue() and "/1500" in tty.getvalue() and "tokens" in tty.getvalue()
    assert bar._bar is None  # closed at the end
    short = _Tty()
    for done in (0, 400):
        output.PrefillProgress(short)(done, 400)
    assert short.getvalue() == ""
    pipe = io.StringIO()
    piped = output.PrefillProgress(pipe)
    for done in (0, 512, 1500):
        piped(done, 1500)
    assert pipe.getvalue() == ""
