"""Chat replies drawn as Markdown (llmsh.cli.markdown_view): what reaches a terminal, and what does not
change (piped output, /save, the conversation log).

The live drawing is checked by playing its output through :func:`screen`, a small model of a
terminal (carriage return, line feed, erase line, cursor up, which cannot go above the top of
the screen as on a real one): what is left on the screen must be the reply rendered in one go.
"""

from __future__ import annotations

import io
import json
import time
import os
import re
import signal

import pytest

from cli_fixtures import chat_model  # noqa: F401  (fixture)
from llmsh.cli import markdown_view
from llmsh.cli.markdown_view import MarkdownStream
from llmsh.sampling import SamplingParams

REPLY = ("Steps:\n\n- first item\n- second **bold** item\n\n```python\ndef f(x):\n    return x + 1\n```\n\n"
         "| name | value |\n|------|-------|\n| a    | 1     |\n\n1. one\n2. two\n\nDone.\n")


class Tty(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self):
        return True


def screen(data: str, height: int) -> list[str]:
    """The lines a terminal ``height`` rows tall shows (and has scrolled off) after ``data``;
    trailing blank lines and trailing spaces dropped. Colours and cursor visibility are ignored."""
    lines, row, col = [""], 0, 0
    for t in re.split(r"(\x1b\[[0-9;?]*[A-Za-z]|\x1b\]8;[^\x1b]*\x1b\\|\r|\n)", data):
        if not t:
            continue
        if t == "\r":
            col = 0
        elif t == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif t.startswith("\x1b["):
            arg, cmd = t[2:-1], t[-1]
            if cmd == "A":  # cursor up: not above the first row still on the screen
                row = max(row - int(arg or 1), len(lines) - height, 0)
            elif cmd == "K" and arg == "2":
                lines[row] = ""
            elif cmd not in "mlh":
                raise AssertionError(f"unexpected control {t!r}")
        elif t.startswith("\x1b]"):
            pass  # hyperlink
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + t + line[col + len(t):]
            col += len(t)
    lines = [ln.rstrip() for ln in lines]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def console(height=20, width=60):
    from rich.console import Console

    return Console(file=Tty(), width=width, height=height, force_terminal=True, color_system="standard")


def at_once(text: str, height=20, width=60) -> list[str]:
    """``text`` printed as one rich Markdown renderable, as the screen shows it."""
    from rich.markdown import Markdown

    c = console(height, width)
    c.print(Markdown(text))
    return screen(c.file.getvalue(), height)


def stream(text: str, height=20, width=60, step=3) -> str:
    """What MarkdownStream writes for ``text`` fed ``step`` characters at a time, a second apart
    (so that each is drawn)."""
    c = console(height, width)
    now = [0.0]
    view = MarkdownStream(c, clock=lambda: now[0])
    for i in range(0, len(text), step):
        now[0] += 1
        view.feed(text[i:i + step])
    assert not text or view._next_draw == now[0] + 1 / 8  # the last piece was drawn
    view.close()
    assert view.text == text
    return c.file.getvalue()


def test_a_streamed_reply_ends_as_the_markdown_rendered_at_once():
    out = stream(REPLY)
    shown = screen(out, 20)
    assert shown == at_once(REPLY)
    text = "\n".join(shown)
    assert "```" not in text and "**" not in text and "|---" not in text  # rendered, not raw
    assert " • first item" in text and " • second bold item" in text
    assert "def f(x):" in text and "return x + 1" in text
    assert "─" in text and "name" in text  # the table
    assert " 1 one" in text
    assert "\x1b[" in out  # styles: code highlighted, bold
    assert out.count("\x1b[?25l") == 1 and out.endswith("\x1b[?25h")  # the cursor is back


@pytest.mark.parametrize("step", [1, 7, 40])
def test_a_reply_taller_than_the_screen_is_drawn_once(step):
    """The live area never outgrows the screen: no block is drawn twice, none lost."""
    text = ("Intro paragraph that is long enough to wrap over more than one line of the terminal. " * 3
            + "\n\n" + "".join(f"- item {i}\n" for i in range(40)) + "\n```\n"
            + "".join(f"line {i}\n" for i in range(50)) + "```\n\nThe end.\n")
    out = stream(text, height=12, step=step)
    assert screen(out, 12) == at_once(text, 12)


def test_blocks_are_printed_once_and_only_the_last_is_redrawn():
    text = "".join(f"Paragraph {i}.\n\n" for i in range(30))
    out = stream(text, height=10, step=1)
    assert screen(out, 10) == at_once(text, 10)
    assert out.count("Paragraph 3.") <= 6  # redrawn while it was the last block (3 pieces), then never


def test_redraws_are_throttled(monkeypatch):
    now = [100.0]
    c = console()
    view = MarkdownStream(c, refresh_per_second=8, clock=lambda: now[0])
    draws = []
    real = view._draw
    monkeypatch.setattr(view, "_draw", lambda: (draws.append(now[0]), real()))
    for i in range(100):  # one second of tokens, 100 a second
        view.feed(f"word{i} ")
        now[0] += 0.01
    view.close()
    assert 7 <= len(draws) <= 9
    assert "word99" in "\n".join(screen(c.file.getvalue(), 20))  # close() draws the rest


def test_slow_redraws_are_rarer(monkeypatch):
    now = [100.0]
    view = MarkdownStream(console(), refresh_per_second=8, clock=lambda: now[0])
    draws = []

    def slow_draw():  # a redraw that takes 0.2 s (a long code block)
        draws.append(now[0])
        now[0] += 0.2

    monkeypatch.setattr(view, "_draw", slow_draw)
    for i in range(200):
        view.feed("x")
        now[0] += 0.01
    gaps = [b - a for a, b in zip(draws, draws[1:])]
    assert draws and min(gaps) >= 0.8 - 1e-9  # at most a quarter of the time spent drawing


def test_a_notice_mid_reply_lands_on_its_own_line(monkeypatch):
    """Printer.info while a reply is drawn (stdout and stderr on one terminal): the live area is
    blanked first, so the notice is not drawn over and nothing is drawn twice."""
    from llmsh.cli.repl_output import Printer

    now = [0.0]
    monkeypatch.setattr(markdown_view.time, "monotonic", lambda: now[0])  # a second per piece
    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setenv("LINES", "20")
    tty = Tty()
    p = Printer(tty, tty, markdown=True)
    half = REPLY.index("```python") + 20
    for ch in REPLY[:half]:
        now[0] += 1
        p.piece(ch)
    p.notice("something happened")
    for ch in REPLY[half:]:
        now[0] += 1
        p.piece(ch)
    p.end_reply(REPLY[-1])
    shown = screen(tty.getvalue(), 20)
    assert shown.count("llmsh: something happened") == 1
    rest = [ln for ln in shown if ln != "llmsh: something happened"]
    assert rest == at_once(REPLY, 20)  # the reply, each line once (the notice cut it in two)


@pytest.mark.parametrize("text", [
    "Intro.\n\n---\n\nAfter a rule.\n\n***\n- a list after a rule\n\n# Heading\n\n> quoted\n> text\n\nend\n",
    "# Title\n\n## Section\n\n    indented code\n\n<div>html</div>\n\n1. one\n1. two\n\n---\n",
])
def test_every_kind_of_block_ends_as_rendered_at_once(text):
    for step in (1, 5):
        assert screen(stream(text, step=step), 20) == at_once(text)


def test_carriage_returns_count_as_line_breaks():
    text = "First paragraph.\r\n\r\n- item\r\r- other\r\n\r\nLast.\n"
    assert screen(stream(text, step=1), 20) == at_once(text)
    assert [kind for _, kind in markdown_view._blocks(text)] == ["paragraph_open", "bullet_list_open",
                                                                 "paragraph_open"]


def test_a_rendering_failure_falls_back_to_the_raw_text(monkeypatch):
    from llmsh.cli.repl_output import Printer

    def broken(self, source):
        if len(self._text) > 30:
            raise RuntimeError("lexer bug")
        return real(self, source)

    real = MarkdownStream._lines
    monkeypatch.setattr(MarkdownStream, "_lines", broken)
    now = [0.0]
    monkeypatch.setattr(markdown_view.time, "monotonic", lambda: now[0])  # a second per piece
    out, err = Tty(), io.StringIO()
    p = Printer(out, err, markdown=True)
    for ch in REPLY:
        now[0] += 1
        p.piece(ch)
    p.end_reply(REPLY[-1])
    assert err.getvalue() == ("llmsh: cannot draw the reply as Markdown (RuntimeError: lexer bug); "
                              "the raw text follows\n")
    assert out.getvalue().endswith("\n" + REPLY) and out.getvalue().count("\x1b[?25h") == 1


def test_empty_and_blank_replies_draw_nothing():
    assert stream("") == "" and stream(" \n\n") == ""


def test_ctrl_c_during_a_redraw_waits_for_it():
    import os

    got = []
    with pytest.raises(KeyboardInterrupt):
        with markdown_view._sigint_held():
            os.kill(os.getpid(), signal.SIGINT)
            got.append("after the signal")  # still running: the interrupt is held
    assert got == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_switch_values():
    assert [markdown_view.parse_switch(v) for v in ("on", "OFF", "yes", "0")] == [True, False, True, False]
    with pytest.raises(ValueError):
        markdown_view.parse_switch("maybe")


def test_default_follows_the_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    assert markdown_view.default(Tty()) and not markdown_view.default(io.StringIO())
    monkeypatch.setenv("TERM", "dumb")
    assert not markdown_view.default(Tty())


# --- the chat shell ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm(chat_model):  # noqa: F811
    from llmsh.loader import load_model

    return load_model(str(chat_model), device="cpu", dtype="float32")


@pytest.fixture
def replies(lm, monkeypatch):
    """The model "generates" the token ids of REPLY (the text round-trips through its tokenizer);
    ``stop_after[0] = N`` makes the next reply raise KeyboardInterrupt after N tokens, as Ctrl-C."""
    import llmsh.generate as g

    ids = lm.tokenizer.encode(REPLY)
    assert lm.tokenizer.decode(ids, skip_special=True) == REPLY
    stop_after = [None]

    def fake(*a, **kw):
        n, stop_after[0] = stop_after[0], None
        for i, t in enumerate(ids):
            if i == n:
                raise KeyboardInterrupt
            yield t

    monkeypatch.setattr(g, "generate_tokens", fake)
    return stop_after


def drive(lm, keys: str, stdout, **kw) -> tuple[str, str]:
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from llmsh.cli.repl import run_chat

    err = io.StringIO()
    with create_pipe_input() as inp:
        inp.send_text(keys)
        rc = run_chat(lm, input=inp, output=DummyOutput(), stdout=stdout, stderr=err, history=False,
                      params=SamplingParams(temperature=0.0), **kw)
    assert rc == 0
    return stdout.getvalue(), err.getvalue()


def saved(path) -> list[str]:
    return [m["content"] for m in json.loads(path.read_text(encoding="utf-8"))["messages"]]


def test_chat_on_a_terminal_draws_markdown_and_saves_the_raw_text(lm, replies, tmp_path, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    f = tmp_path / "c.json"
    out, err = drive(lm, f"hi\n/show\n/save {f}\n/exit\n", Tty())  # markdown: the default on a terminal
    shown = "\n".join(screen(out, 25))
    assert "```" not in shown and " • first item" in shown and "return x + 1" in shown
    assert "markdown: on" in err
    assert saved(f) == ["hi", REPLY]  # the raw text, fences and all


def test_no_markdown_and_set_markdown_toggle(lm, replies, tmp_path):
    f = tmp_path / "c.json"
    out, err = drive(lm, f"hi\n/show\n/set markdown on\nagain\n/set markdown off\n/set markdown maybe\n"
                         f"third\n/save {f}\n/exit\n", Tty(), markdown=False)
    first, rest = out.split("\x1b[?25l", 1)  # the live display starts with the second reply
    assert first == REPLY  # raw, as it streamed
    assert rest.endswith("\x1b[?25h" + REPLY)  # drawn, then raw again
    assert "```" not in "\n".join(screen("\x1b[?25l" + rest[: -len(REPLY)], 25))
    assert "markdown: off" in err and "markdown: on" in err
    assert "error: /set markdown: 'maybe' is not a valid value" in err
    msgs = saved(f)  # (the tiny model's context may have dropped the first exchange)
    assert msgs[-2:] == ["third", REPLY] and set(msgs[1::2]) == {REPLY}


def test_piped_stdout_stays_raw_even_with_markdown_on(lm, replies):
    out, err = drive(lm, "hi\n/set markdown on\n/show\nagain\n/exit\n", io.StringIO(), markdown=True)
    assert out == REPLY + REPLY  # byte for byte what the model wrote
    assert "markdown: on, but stdout is not a terminal: replies are printed as raw text" in err


def test_piped_stdin_to_a_terminal_draws_markdown(lm, replies):
    from llmsh.cli.repl import run_chat

    out = Tty()
    rc = run_chat(lm, params=SamplingParams(temperature=0.0), stdin=io.StringIO("hi"), stdout=out,
                  stderr=io.StringIO(), interactive=False, markdown=True)
    assert rc == 0 and " • first item" in "\n".join(screen(out.getvalue(), 25))


def test_ctrl_c_mid_markdown_reply_keeps_the_partial_text(lm, replies, tmp_path):
    f = tmp_path / "c.json"
    n = len(lm.tokenizer.encode(REPLY.split("```python")[0] + "```python\ndef"))
    replies[0] = n  # the first reply stops inside the code block
    out, err = drive(lm, f"hi\nagain\n/save {f}\n/exit\n", Tty(), markdown=True)
    assert "[interrupted" in err
    msgs = saved(f)
    partial = msgs[1]
    assert REPLY.startswith(partial) and partial.endswith("```python\ndef")  # raw, fence open
    first, second = out.split("\x1b[?25h")[:2]
    shown = "\n".join(screen(first, 25))
    assert " • second bold item" in shown and "def" in shown and "return" not in shown
    assert "```" not in shown
    assert " • first item" in "\n".join(screen(second, 25))  # the next reply is drawn from scratch
    assert msgs[3] == REPLY


def test_logged_text_is_raw(lm, replies, tmp_path, monkeypatch):
    from llmsh.cli.logs import ChatLogger
    from llmsh.logstore import LogStore

    monkeypatch.setenv("LLMSH_LOG_PATH", str(tmp_path / "logs.db"))
    monkeypatch.delenv("LLMSH_LOG", raising=False)
    with LogStore.open() as store:
        drive(lm, "hi\n/exit\n", Tty(), markdown=True, log=ChatLogger(store, print))
    with LogStore.open(create=False) as store:
        (row,) = [e.to_dict() for e in store.query(None)]
    assert row["reply"] == REPLY


def test_chat_markdown_option(chat_model, tmp_path, monkeypatch):  # noqa: F811
    """--markdown with stdout piped (CliRunner): the reply is the model's raw text all the same."""
    from click.testing import CliRunner

    from llmsh.cli.main import cli

    monkeypatch.setenv("LLMSH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMSH_LOG", "off")
    runner = CliRunner()
    args = ["chat", "-m", str(chat_model), "--temperature", "0", "-n", "6"]
    plain = runner.invoke(cli, args + ["--no-markdown"], input="hi\n")
    md = runner.invoke(cli, args + ["--markdown"], input="hi\n")
    assert plain.exit_code == md.exit_code == 0
    assert md.stdout == plain.stdout and "\x1b" not in md.stdout
    assert "--markdown / --no-markdown" in runner.invoke(cli, ["chat", "--help"]).output


# --- under a real pseudo-terminal ------------------------------------------------------------------

from test_repl import Terminal, _env, needs_pty  # noqa: E402


FAKE_MODEL = """
import itertools, os, time
import llmsh.generate as g
import llmsh.session as s

_stream = s.ChatSession._stream


def slow_reply(self, ids, *args):  # the reply to every message: FAKE_REPLY, again and again
    reply = self.model.tokenizer.encode(os.environ["LLMSH_FAKE_REPLY"])

    def tokens(*a, **kw):
        for t in itertools.islice(itertools.cycle(reply), 100_000):  # the context is not filled
            time.sleep(0.01)
            yield t

    g.generate_tokens = tokens
    return _stream(self, ids, *args)


s.ChatSession._stream = slow_reply
"""


@needs_pty
@pytest.mark.parametrize("flag", ["--markdown", "--no-markdown"])
def test_ctrl_c_mid_reply_on_a_real_terminal(chat_model, tmp_path, flag):  # noqa: F811
    """``llmsh chat`` on a pty, its model replying REPLY over and over, slowly: Ctrl-C stops the
    reply, the prompt comes back, the partial reply is kept (raw) and the shell leaves with 0."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAKE_MODEL, encoding="utf-8")
    env = _env(tmp_path)
    env.update(LLMSH_FAKE_REPLY=REPLY, LLMSH_LOG="off",
               PYTHONPATH=os.pathsep.join([str(hook), env.get("PYTHONPATH", "")]))
    f = tmp_path / "c.json"
    t = Terminal(["chat", "-m", str(chat_model), "-n", "2000", "--no-compile", flag], env)
    try:
        t.wait_for(b">>>")
        t.type(b"hello\r")
        t.wait_for(b"Steps:")
        start = t.seen.rindex(b"\x1b[?2004l")  # prompt-toolkit is done with the line: the reply
        t.wait_for(b"Done.", 2)  # the second time round
        # With Markdown, live redraws repeat "Done." before the reply has gone round twice: give it
        # time to (about 0.3 s a round at 10 ms a token).
        time.sleep(1.5)
        t.type(b"\x03")
        t.wait_for(b"[interrupted")
        t.wait_for(b">>>", 2)
        t.type(f"/save {f}\r".encode())
        t.wait_for(b"saved to")
        t.type(b"/exit\r")
        assert t.proc.wait(timeout=60) == 0
    finally:
        t.close()
    reply = json.loads(f.read_text(encoding="utf-8"))["messages"][1]
    assert reply["interrupted"] and reply["content"].startswith(REPLY + REPLY[:-1])
    drawn = t.seen[start:].split(b"[interrupted")[0].decode("utf-8")
    if flag == "--markdown":
        assert "\x1b[2K" in drawn  # redrawn live
        assert drawn.count("\x1b[?25l") == drawn.count("\x1b[?25h")  # the cursor is shown again
        shown = screen(drawn.replace("\r\n", "\n"), 25)  # rich's size for a pty without one
        assert not any("```" in line for line in shown) and shown.count(" • first item") >= 2
    else:
        raw = drawn[len("\x1b[?2004l"):].replace("\r\n", "\n")
        assert raw.startswith(REPLY + REPLY[:-1]) and "\x1b" not in raw  # the raw text, as it came
