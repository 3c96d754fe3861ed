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
    # without a command, chat's defaults (repetition penalty 1.1): the same as generate's here
    a = ok(["-m", str(chat_model), "-t", "0", "--repetition-penalty", "1", "-n", "8", "hello", "there"]).stdout
    b = ok(["generate", "-m", str(chat_model), "-t", "0", "-n", "8", "hello there"]).stdout
    assert a == b and a.strip() and not chats


def test_options_only_with_empty_stdin_is_generate(chat_model, llmsh_home):  # noqa: F811
    r = run(["-m", str(chat_model), "-t", "0.7"], input="")
    assert r.exit_code == 1 and "empty prompt" in r.stderr


# --- item 4: a command name after leading options runs that command ------------------------------

def test_command_name_after_options_runs_the_command(chat_model, llmsh_home, terminal, chats,
                                                    tmp_path):  # noqa: F811
    import json

    a = json.loads(ok(["-m", str(chat_model), "info", "--json"]).stdout)
    b = json.loads(ok(["info", "-m", str(chat_model), "--json"]).stdout)
    a.pop("load_seconds"), b.pop("load_seconds")
    assert a == b
    ok(["-m", str(chat_model), "--temperature", "0.5", "chat", "--no-history"])
    assert len(chats) == 1 and chats[0]["params"].temperature == 0.5 and chats[0]["history"] is False
    (tmp_path / "a.txt").write_text("hello world " * 20)
    r = ok(["-m", str(chat_model), "ppl", "--n-ctx", "8", "--json", str(tmp_path / "a.txt")])
    assert json.loads(r.stdout)["n_ctx"] == 8  # an alias too


@pytest.mark.parametrize("word,command", [("chta", "chat"), ("genrate", "generate"), ("tokenise", "tokenize"),
                                          ("pul", "pull"), ("modls", "models")])
def test_near_miss_of_a_command_name_is_an_error_with_a_suggestion(chat_model, llmsh_home, terminal, word,
                                                                 command):  # noqa: F811
    from test_cli import one_line_error

    one_line_error(run([word]), f"no such command '{word}'", f"did you mean '{command}'", code=2)
    one_line_error(run(["-m", str(chat_model), word]), f"did you mean '{command}'", code=2)


@pytest.mark.parametrize("words", [["info about cats"], ["what", "is", "up"], ["hello"], ["cats"], ["what"],
                                   ["--", "info"]])
def test_genuine_prompts_still_generate(chat_model, llmsh_home, terminal, chats, words):  # noqa: F811
    r = ok(["-m", str(chat_model), "-t", "0", "-n", "2", *words])
    prompt = " ".join(w for w in words if w != "--")
    assert r.stdout == ok(["generate", "-m", str(chat_model), "-t", "0", "-n", "2", prompt]).stdout
    assert not chats


def test_an_option_value_is_not_a_command_name(tmp_path, llmsh_home, terminal):  # noqa: F811
    # `-m info`: a model called "info" (not found), not the info command.
    r = run(["-m", str(tmp_path / "info"), "-n", "2", "hello"])
    assert r.exit_code == 1 and "info" in r.stderr and "llmsh: error:" in r.stderr
