"""The chat REPL driven through prompt-toolkit's pipe input (and once under a real pseudo-terminal).

Replies come from a tiny random model, so tests check the conversation's structure (saved JSON,
statistics, notices) rather than the text; the text itself is checked against transformers in
test_session.py.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from cli_fixtures import chat_model  # noqa: F401  (fixture)
from llmsh.errors import InputError
from llmsh.cli.repl import EXIT_HINT, _completer, read_message, run_chat
from llmsh.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def lm(chat_model):  # noqa: F811
    from llmsh.loader import load_model

    return load_model(str(chat_model), device="cpu", dtype="float32")


def drive(lm, keys: str, **kw) -> tuple[int, str, str]:
    """Run the REPL on ``keys`` typed at the prompt; return (exit status, stdout, stderr)."""
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    out, err = io.StringIO(), io.StringIO()
    kw.setdefault("params", GREEDY)
    kw.setdefault("max_tokens", 5)
    kw.setdefault("history", False)
    with create_pipe_input() as inp:
        inp.send_text(keys)
        rc = run_chat(lm, input=inp, output=DummyOutput(), stdout=out, stderr=err, **kw)
    return rc, out.getvalue(), err.getvalue()


def saved(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["messages"]


def test_messages_multiline_input_and_save(lm, tmp_path):
    f = tmp_path / "c.json"
    keys = ('hello\nline1 \\\nline2\n"""\nblock a\n\nblock b\n"""\n"""one line"""\n'
            f"/save {f}\n/exit\n")
    rc, out, err = drive(lm, keys)
    assert rc == 0
    users = [m["content"] for m in saved(f) if m["role"] == "user"]
    assert users == ["hello", "line1 \nline2", "block a\n\nblock b", "one line"]
    replies = [m["content"] for m in saved(f) if m["role"] == "assistant"]
    assert out == "".join(r + "\n" for r in replies)  # streamed replies, each ending a line
    assert "\x1b" not in out + err  # not a terminal: no escape codes


def test_slash_commands(lm, tmp_path):
    f = tmp_path / "c.json"
    keys = ("/help\n/set temperature 0.5\n/set top_k 3\n/set max_tokens 3\n/set seed 42\n"
            "/set top_p 3\n/set temprature 1\n/set top_k x\n/system Talk like a pirate.\n/show\n"
            f"/foo\n/stats\nhi\n/save {f}\n/system\n/clear\n/show\n/quit\n")
    rc, out, err = drive(lm, keys)
    assert rc == 0
    for name in ("/undo", "/regen", "/save", "/read", "/set"):
        assert name in err  # /help
    assert "error: top_p must be in [0, 1], got 3.0" in err
    assert "error: usage: /set PARAM VALUE" in err
    assert "error: /set top_k: 'x' is not a valid value" in err
    assert "error: unknown command /foo" in err
    assert "temperature=0.5, top_k=3, top_p=1.0" in err and "seed=42" in err and "max_tokens=3" in err
    assert "system: 'Talk like a pirate.'" in err and "system: None" in err
    assert "context 0/" in err  # after /clear
    assert "3 tokens," in err or "finish: stop" in err  # the /stats line, max_tokens 3
    data = json.loads(f.read_text(encoding="utf-8"))
    assert data["system"] == "Talk like a pirate." and len(data["messages"]) == 2


def test_stats_line_and_show_count_the_same_context(lm):
    rc, out, err = drive(lm, "first message\n/show\n/exit\n", stats=True)
    stats = [ln for ln in err.splitlines() if "tokens/s" in ln][0]
    show = [ln for ln in err.splitlines() if ln.startswith("context ")][0]
    used = stats.split("context ")[1].split(",")[0]
    assert show.startswith(f"context {used} tokens")


def test_max_tokens_can_be_lifted_again(lm):
    for off in ("none", "off", "0", "OFF"):
        rc, out, err = drive(lm, f"/set max_tokens 3\n/set max_tokens {off}\n/show\n/exit\n")
        assert "max_tokens=None" in err and "error" not in err
    rc, out, err = drive(lm, "/set max_tokens -2\n/set seed off\n/show\n/exit\n")
    assert "error: max_tokens must be an integer >= 1" in err and "seed=None" in err


def test_save_refuses_to_overwrite_other_files_and_keeps_modes(lm, tmp_path):
    other, conv, new = tmp_path / "notes.txt", tmp_path / "c.json", tmp_path / "new.json"
    other.write_text("precious\n", encoding="utf-8")
    rc, out, err = drive(lm, f"hi\n/save {other}\n/save {conv}\n/exit\n")
    assert other.read_text(encoding="utf-8") == "precious\n"
    assert f"error: {other} exists and is not a saved llmsh conversation" in err and "/save! " in err
    os.chmod(conv, 0o644)
    rc, out, err = drive(lm, f"/load {conv}\nmore\n/save {conv}\n/save {new}\n/save! {other}\n/exit\n")
    assert len(saved(conv)) == 4 and len(saved(other)) == 4 and "error" not in err
    assert stat.S_IMODE(conv.stat().st_mode) == 0o644  # our own file, overwritten: mode kept
    assert stat.S_IMODE(new.stat().st_mode) == 0o600  # a new file is private


def test_load_refuses_to_discard_an_unsaved_conversation(lm, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    drive(lm, f"one\n/save {a}\n/exit\n")
    keys = (f"/load {a}\n"  # nothing to lose yet
            f"/load {a}\n"  # unchanged since the load
            f"two\n/load {a}\n/save {b}\n"  # changed: refused, then saved
            f"/load {a}\nthree\n/load! {a}\n/exit\n")  # changed: forced
    rc, out, err = drive(lm, keys)
    assert err.count("loaded 2 messages") == 4
    assert err.count("error: the current conversation (4 messages) is not saved") == 1
    assert "/load! " in err and len(saved(b)) == 4


def test_ctrl_d_ends_a_multiline_block_without_leaving(lm, tmp_path):
    f = tmp_path / "c.json"
    rc, out, err = drive(lm, f'"""\nblock a\nblock b\n\x04line \\\n\x04"""\n\x04/save {f}\n/exit\n')
    assert [m["content"] for m in saved(f) if m["role"] == "user"] == ["block a\nblock b", "line "]
    assert err.count("Ctrl-D ended the multi-line input") == 3 and "nothing to send" in err


def test_stats_line_shows_cache_reuse(lm):
    rc, out, err = drive(lm, "first message\nsecond message\n/exit\n", stats=True)
    lines = [ln for ln in err.splitlines() if "tokens/s" in ln]
    assert len(lines) == 2
    assert "reused 0/" in lines[0]
    reused, total = lines[1].split("reused ")[1].split(" ")[0].split("/")
    assert 0 < int(reused) < int(total)  # only the new turn was prefilled
    assert "TTFT" in lines[1] and "context " in lines[1]


def test_undo_and_regen(lm, tmp_path):
    f, g = tmp_path / "a.json", tmp_path / "b.json"
    rc, out, err = drive(lm, f"one\ntwo\n/undo\n/save {f}\n/regen\n/save {g}\n/undo\n/undo\n/regen\n/exit\n")
    assert [m["content"] for m in saved(f)][0] == "one" and len(saved(f)) == 2
    assert saved(f) == saved(g)  # greedy: /regen gives the same reply back
    assert "dropped the last exchange: 'two'" in err
    assert "error: nothing to undo" in err and "error: nothing to regenerate" in err
    assert out.count(saved(f)[1]["content"] + "\n") >= 2


def test_save_then_load_round_trip(lm, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    drive(lm, f"/system be brief\nhello <|im_end|> there\nsecond\n/save {a}\n/exit\n")
    rc, out, err = drive(lm, f"/load {a}\n/save {b}\n/load {tmp_path / 'missing.json'}\n/exit\n")
    assert json.loads(a.read_text())["messages"] == json.loads(b.read_text())["messages"]
    assert json.loads(b.read_text())["system"] == "be brief"
    assert "loaded 4 messages" in err and "error: cannot read" in err


def test_read_sends_a_file(lm, tmp_path):
    (tmp_path / "q.txt").write_text("Café question\nsecond line\n", encoding="utf-8")
    f = tmp_path / "c.json"
    rc, out, err = drive(lm, f"/read {tmp_path / 'q.txt'}\n/read {tmp_path / 'nope.txt'}\n/save {f}\n/exit\n")
    assert saved(f)[0]["content"] == "Café question\nsecond line\n"
    assert "'Café question' (2 lines, 26 chars)" in err  # the preview, before the reply
    assert len(saved(f)) == 2


def test_ctrl_c_at_the_prompt_and_ctrl_d(lm):
    rc, out, err = drive(lm, "\x03half typed\x03\x04")
    assert rc == 0 and err.count(EXIT_HINT) == 1 and out == ""  # text + Ctrl-C discards the line


def test_ctrl_c_mid_reply_returns_to_the_prompt(lm, tmp_path, monkeypatch):
    import llmsh.generate as g

    real, calls = g.generate_tokens, []

    def fake(*a, **kw):  # the first reply is interrupted after 2 tokens, as Ctrl-C would
        calls.append(1)
        for i, t in enumerate(real(*a, **kw)):
            if i == 2 and len(calls) == 1:
                raise KeyboardInterrupt
            yield t

    monkeypatch.setattr(g, "generate_tokens", fake)
    f = tmp_path / "c.json"
    rc, out, err = drive(lm, f"first\nsecond\n/save {f}\n/exit\n", max_tokens=6, stats=True)
    assert rc == 0 and "[interrupted" in err
    msgs = saved(f)
    assert [m.get("interrupted", False) for m in msgs] == [False, True, False, False]
    assert "finish: interrupted" in err
    reused = int(err.split("reused ")[2].split("/")[0])
    assert reused > 0  # the cache survived the interruption


def test_context_overflow_drops_old_turns(lm, tmp_path):
    f = tmp_path / "c.json"
    turns = "".join(f"this is message number {i}\n" for i in range(8))
    rc, out, err = drive(lm, f"/system keep me\n{turns}/save {f}\n{'long ' * 100}\n/exit\n",
                         n_ctx=64, max_tokens=4)
    assert rc == 0 and "dropped the" in err
    data = json.loads(f.read_text())
    assert data["system"] == "keep me"
    assert data["messages"][-2]["content"] == "this is message number 7"
    assert data["messages"][0]["content"] != "this is message number 0"
    assert "error: message with the system message too long for the context" in err


def test_completion_of_slash_commands():
    from prompt_toolkit.document import Document

    def complete(text):
        return [c.text for c in _completer().get_completions(Document(text), None)]

    assert complete("/re") == ["/regen", "/read"]
    assert complete("/set t") == ["temperature", "top_k", "top_p"]
    assert complete("hello /re") == []


def test_read_message_continuations():
    def feed(*lines):
        it = iter(lines)
        return read_message(lambda prompt: next(it))

    assert feed("a\\", "b\\", "c") == "a\nb\nc"
    assert feed('"""', "x", "", "y", '"""') == "x\n\ny"
    assert feed('"""first', 'last"""') == "first\nlast"
    assert feed("plain") == "plain"


def test_history_file_is_private(lm, tmp_path):
    h = tmp_path / "hist" / "chat_history"
    drive(lm, "remember me\n/exit\n", history=h)
    assert stat.S_IMODE(h.stat().st_mode) == 0o600
    assert "remember me" in h.read_text(encoding="utf-8")


def test_default_history_location_follows_xdg(monkeypatch, tmp_path):
    from llmsh.cli.repl import history_path

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    if sys.platform.startswith("linux"):
        assert history_path() == tmp_path / "llmsh" / "chat_history"


def test_piped_stdin_is_one_message(lm):
    out, err = io.StringIO(), io.StringIO()
    rc = run_chat(lm, params=GREEDY, max_tokens=4, stdin=io.StringIO("hi\nthere\n"), stdout=out,
                  stderr=err, interactive=False)
    assert rc == 0 and out.getvalue().endswith("\n") and err.getvalue() == ""
    with pytest.raises(InputError, match="no message on stdin"):
        run_chat(lm, params=GREEDY, stdin=io.StringIO(" \n"), stdout=out, stderr=err, interactive=False)


def test_piped_ctrl_c_propagates(lm, monkeypatch):
    import llmsh.generate as g

    real = g.generate_tokens

    def fake(*a, **kw):
        for i, t in enumerate(real(*a, **kw)):
            if i == 1:
                raise KeyboardInterrupt
            yield t

    monkeypatch.setattr(g, "generate_tokens", fake)
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):  # the command exits (130) instead of carrying on
        run_chat(lm, params=GREEDY, max_tokens=4, stdin=io.StringIO("hi"), stdout=out,
                 stderr=io.StringIO(), interactive=False)
    assert out.getvalue() == "" or out.getvalue().endswith("\n")


class Terminal:
    """A subprocess of ``llmsh chat`` with a pseudo-terminal as its controlling terminal, on stdin
    and stderr (and stdout, unless ``stdout`` is given, e.g. subprocess.PIPE)."""

    def __init__(self, args, env, stdout=None, program=None):
        import pty
        import subprocess

        self.main, child = pty.openpty()

        def controlling_terminal():  # as a login shell would: a new session with the pty as its tty
            import fcntl
            import termios

            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [*(program or [sys.executable, "-m", "llmsh.cli"]), *args], stdin=child,
            stdout=child if stdout is None else stdout, stderr=child, env=env,
            cwd=Path(__file__).parents[1], close_fds=True, preexec_fn=controlling_terminal)
        os.close(child)
        self.seen = b""

    def wait_for(self, needle: bytes, count: int = 1, timeout: float = 60) -> None:
        import select
        import time

        end = time.monotonic() + timeout
        while self.seen.count(needle) < count:
            left = end - time.monotonic()
            assert left > 0 and self.proc.poll() is None, f"waiting for {needle!r}, got {self.seen[-2000:]!r}"
            if select.select([self.main], [], [], min(left, 1.0))[0]:
                try:
                    data = os.read(self.main, 65536)
                except OSError:
                    break
                if b"\x1b[6n" in data:  # answer cursor-position requests as a terminal would
                    os.write(self.main, b"\x1b[1;1R")
                self.seen += data

    def type(self, keys: bytes) -> None:
        os.write(self.main, keys)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.main)


needs_pty = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs a POSIX pty")


def _env(tmp_path):
    return dict(os.environ, XDG_DATA_HOME=str(tmp_path), LLMSH_HOME=str(tmp_path / "home"),
                NO_COLOR="1", TERM="xterm")


@needs_pty
def test_chat_under_a_real_terminal(chat_model, tmp_path):  # noqa: F811
    """``llmsh chat`` in a subprocess on a pseudo-terminal: prompt, reply, /exit, exit status 0."""
    pytest.importorskip("llmsh.cli")
    t = Terminal(["chat", "-m", str(chat_model), "--temperature", "0", "-n", "4", "--stats"], _env(tmp_path))
    try:
        t.wait_for(b">>>")
        t.type(b"hello\r")
        t.wait_for(b"tokens/s")
        t.wait_for(b">>>", 2)
        t.type(b"\x03")  # Ctrl-C at an empty prompt
        t.wait_for(b"to leave")
        t.type(b"/exit\r")
        assert t.proc.wait(timeout=60) == 0
    finally:
        t.close()
    assert (tmp_path / "llmsh" / "chat_history").is_file()


@needs_pty
def test_chat_with_stdout_piped_keeps_the_prompt_on_the_terminal(chat_model, tmp_path):  # noqa: F811
    """``llmsh chat | tee log``: the prompt and line editor are drawn on the terminal (stderr),
    stdout gets the plain replies only, with no escape codes or prompt text."""
    import subprocess
    import threading

    pytest.importorskip("llmsh.cli")
    f = tmp_path / "c.json"
    t = Terminal(["chat", "-m", str(chat_model), "--temperature", "0", "-n", "4", "--stats"], _env(tmp_path),
                 stdout=subprocess.PIPE)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(t.proc.stdout.read()))
    reader.start()
    try:
        t.wait_for(b">>>")  # the prompt reached the terminal through stderr
        t.type(b"hello\r")
        t.wait_for(b"tokens/s")
        t.wait_for(b">>>", 2)
        t.type(f"/save {f}\r".encode())
        t.wait_for(b"saved to")
        t.type(b"/exit\r")
        assert t.proc.wait(timeout=60) == 0
    finally:
        t.close()
        reader.join(timeout=10)
    out = chunks[0].decode("utf-8")
    reply = saved(f)[1]["content"]
    assert out == (reply + "\n" if reply else "")
    assert "\x1b" not in out and ">>>" not in out and "\r" not in out


def test_double_slash_sends_a_message_that_starts_with_a_slash(lm, tmp_path):
    # issue 9 item 10: "/usr/bin is what?" is not a command; "//" escapes it, as /help says.
    f = tmp_path / "c.json"
    rc, out, err = drive(lm, f"/usr/bin is what?\n//usr/bin is what?\n/help\n/save {f}\n/exit\n")
    assert rc == 0
    assert "unknown command /usr/bin" in err and "type it as //usr/bin is what?" in err
    assert [m["content"] for m in saved(f) if m["role"] == "user"] == ["/usr/bin is what?"]
    assert "//usr/bin is what?" in err.split("/help", 1)[1]  # documented in /help


def _interrupt_before_the_first_token(monkeypatch):
    import llmsh.generate as g

    def fake(*a, **kw):  # Ctrl-C during the prefill: no token yet
        raise KeyboardInterrupt
        yield  # pragma: no cover

    monkeypatch.setattr(g, "generate_tokens", fake)


def test_ctrl_c_before_the_first_token_says_what_happened(lm, tmp_path, monkeypatch):
    # issue 9 item 9: nothing was generated, so nothing "partial" is kept; the message is dropped
    # and the marker says so (the prompt history still has it).
    f = tmp_path / "c.json"
    rc, out, err = drive(lm, f"one\n/regen\n/save {f}\n/exit\n")  # a reply to regenerate first
    assert saved(f)[0]["content"] == "one" and len(saved(f)) == 2
    _interrupt_before_the_first_token(monkeypatch)
    g = tmp_path / "g.json"
    rc, out, err = drive(lm, f"/load! {f}\ntwo\n/regen\n/save! {g}\n/exit\n")
    assert rc == 0 and "partial reply is kept" not in err
    assert "[interrupted before the reply began: your message was not kept; press Up to recall it]" in err
    assert "[interrupted before the new reply began: the previous reply is kept]" in err
    assert saved(g) == saved(f)  # "two" dropped, the old reply kept


def test_a_reply_cut_by_a_full_context_says_so(lm, monkeypatch):
    # issue 9 item 7: a marker as Ctrl-C's, naming what would change it; a max_tokens cut has none.
    monkeypatch.setattr(lm.tokenizer, "eos_token_ids", [])  # the reply runs until it is cut
    rc, out, err = drive(lm, "hello\n/exit\n", n_ctx=48, max_tokens=None)
    assert rc == 0 and "[context full: 48 tokens; raise --n-ctx or /clear]" in err
    rc, out, err = drive(lm, "hello\n/exit\n", n_ctx=48, max_tokens=3)
    assert rc == 0 and "context full" not in err


def drive_slowly(lm, chunks, pause=0.7, **kw) -> tuple[int, str, str]:
    """As :func:`drive`, typing ``chunks`` one by one with a pause before each: keys that recall
    history need the prompt (and its history, loaded in the background) to be there first."""
    import threading
    import time

    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    out, err = io.StringIO(), io.StringIO()
    kw.setdefault("params", GREEDY)
    kw.setdefault("max_tokens", 3)
    with create_pipe_input() as inp:
        def feed():
            for c in chunks:
                time.sleep(pause)
                inp.send_text(c)
        threading.Thread(target=feed, daemon=True).start()
        rc = run_chat(lm, input=inp, output=DummyOutput(), stdout=out, stderr=err, **kw)
    return rc, out.getvalue(), err.getvalue()


def test_a_multiline_message_is_one_history_entry(lm, tmp_path):
    # issue 9 item 11: Up recalls the whole message, not its last line; the file keeps it whole.
    from prompt_toolkit.history import FileHistory

    f, h = tmp_path / "c.json", tmp_path / "chat_history"
    rc, out, err = drive_slowly(lm, ['line1 \\\nline2\n', '"""\na\nb\n"""\n', "\x1b[A", "\n",
                                     f"/save {f}\n/exit\n"], history=h)
    assert rc == 0
    users = [m["content"] for m in saved(f) if m["role"] == "user"]
    assert users == ["line1 \nline2", "a\nb", "a\nb"]  # Up, Enter: the last message again
    entries = list(FileHistory(str(h)).load_history_strings())[::-1]  # oldest first
    assert entries == ["line1 \nline2", "a\nb", f"/save {f}", "/exit"]  # no repeat stored


# llmsh with a slow reply: each reply waits 2 s before its first token and 0.1 s per token, so
# that keys can be typed while it "streams".
SLOW_REPLY = """
import sys, time
import llmsh.generate as g
real = g.generate_tokens
def slow(*a, **kw):
    time.sleep(2)
    for t in real(*a, **kw):
        time.sleep(0.1)
        yield t
g.generate_tokens = slow
from llmsh.cli.main import main
sys.argv[0] = "llmsh"
main()
"""


@needs_pty
def test_keys_typed_during_a_reply_are_not_echoed_into_it(chat_model, tmp_path):  # noqa: F811
    """Issue 9 item 11: on a real terminal, keys typed while a reply streams do not appear in it;
    they reach the next prompt, as typeahead does in a shell."""
    import time

    f = tmp_path / "c.json"
    t = Terminal(["chat", "-m", str(chat_model), "--temperature", "0", "-n", "5", "--stats"],
                 _env(tmp_path), program=[sys.executable, "-c", SLOW_REPLY])
    try:
        t.wait_for(b">>>")
        t.type(b"hello\r")
        t.wait_for(b"hello")
        time.sleep(0.5)
        start = len(t.seen)
        t.type(b"zzzz\r")  # while the reply is on its way
        t.wait_for(b"tokens/s")  # the statistics line: the reply is over
        during = t.seen[start:t.seen.index(b"tokens/s")]
        t.wait_for(b"tokens/s", 2)  # "zzzz" was sent at the next prompt and answered
        t.wait_for(b">>>", t.seen.count(b">>>") + 1)
        time.sleep(0.5)
        t.type(f"/save {f}\r".encode())
        t.wait_for(b"saved to")
        t.type(b"/exit\r")
        assert t.proc.wait(timeout=60) == 0
    finally:
        t.close()
    assert b"zzzz" not in during
    assert [m["content"] for m in saved(f) if m["role"] == "user"] == ["hello", "zzzz"]
