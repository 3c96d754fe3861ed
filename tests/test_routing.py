"""``llmsh ARGS`` without a command first: which command runs (issue 9, items 3 and 4).

The documented examples themselves (``llmsh -m ./model --temperature 0.7`` from --help and the
man page), on the click version installed, with stdin a terminal: in CliRunner (stdin patched
to be a terminal) and once in a real pseudo-terminal.
"""

from __future__ import annotations

import pytest

from cli_fixtures import chat_model, llmsh_home  # noqa: F401  (fixtures)
from test_cli import ok, run
from llmsh.cli import output


@pytest.fixture
def terminal(monkeypatch):
    """stdin is a terminal (nothing piped in)."""
    monkeypatch.setattr(output, "stdin_is_terminal", lambda: True)


@pytest.fixture
def chats(monkeypatch):
    """run_chat replaced by a recorder: the keyword arguments of each chat started."""
    seen = []

    def fake_chat(lm, **kw):
        seen.append(kw)
        return 0
    monkeypatch.setattr("llmsh.cli.repl.run_chat", fake_chat)
    return seen


@pytest.mark.parametrize("args", [["--temperature", "0.7"], ["-t", "0.7"], [], ["--seed", "3"]])
def test_options_only_on_a_terminal_start_chat(chat_model, llmsh_home, terminal, chats, args):  # noqa: F811
    """`llmsh -m DIR --temperature 0.7` (the --help example), `llmsh -t 0.7`, `llmsh -m DIR`: chat,
    with those options (click >= 8.3 reports the absent prompt as a truthy UNSET sentinel)."""
    r = ok(["-m", str(chat_model), *args])
    assert len(chats) == 1 and "empty prompt" not in r.stderr
    if args[:1] in (["--temperature"], ["-t"]):
        assert chats[0]["params"].temperature == 0.7


def test_model_from_the_environment_and_sampling_option_only(chat_model, llmsh_home, terminal, chats):  # noqa: F811
    ok(["-t", "0.7"], env={"LLMSH_MODEL": str(chat_model)})
    assert len(chats) == 1 and chats[0]["params"].temperature == 0.7


def test_the_help_example_is_the_one_tested():
    from llmsh.cli.main import cli

    assert "llmsh -m ./my-model --temperature 0.7" in cli.help


def test_documented_example_in_a_real_terminal(chat_model, tmp_path):  # noqa: F811
    """The example exactly as documented, in a pseudo-terminal: a chat prompt, not an error."""
    from test_repl import Terminal, _env, needs_pty

    if needs_pty.args[0]:
        pytest.skip(needs_pty.kwargs["reason"])
    t = Terminal(["-m", str(chat_model), "--temperature", "0.7"], _env(tmp_path))
    try:
        t.wait_for(b">>>")
        t.type(b"/exit\r")
        assert t.proc.wait(timeout=60) == 0
    finally:
        t.close()
    assert b"empty prompt" not in t.seen


def test_options_then_words_generate(chat_model, llmsh_home, terminal, chats):  # noqa: F811
    a = ok(["-m", str(chat_model), "-t", "0", "-n", "3", "hello", "there"]).stdout
    b = ok(["generate", "-m", str(chat_model), "-t", "0", "-n", "3", "hello there"]).stdout
    assert a == b and a.strip() and not chats


def test_options_only_with_empty_stdin_is_generate(chat_model, llmsh_home):  # noqa: F811
    r = run(["-m", str(chat_model), "-t", "0.7"], input="")
    assert r.exit_code == 1 and "empty prompt" in r.stderr
