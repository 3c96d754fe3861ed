"""The conversation log: the SQLite store (llmsh.logstore), the chat and generate hooks, ``llmsh logs``
and ``chat -c``. Every test points LLMSH_LOG_PATH at its own tmp_path (the ``log`` fixture)."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli_fixtures import chat_model  # noqa: F401  (fixture)
from llmsh.cli import cli
from llmsh.logstore import (SCHEMA_VERSION, Exchange, LogError, LogStore, fts5_available, log_path,
                            logging_state)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def log(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "data" / "logs.db"
    monkeypatch.setenv("LLMSH_LOG_PATH", str(path))
    monkeypatch.delenv("LLMSH_LOG", raising=False)
    return path


def rows(path: Path) -> list[dict]:
    with LogStore.open(path, create=False) as s:
        return [e.to_dict() for e in s.query(None)]


def run(args, input=None, env=None):
    r = CliRunner().invoke(cli, args, input=input, env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def ok(args, input=None, env=None):
    r = run(args, input=input, env=env)
    assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
    return r


# --- the store ------------------------------------------------------------------------------------

def test_location_follows_llmsh_home_then_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMSH_LOG_PATH", raising=False)
    monkeypatch.setenv("LLMSH_HOME", str(tmp_path / "home"))
    assert log_path() == tmp_path / "home" / "logs.db"
    monkeypatch.delenv("LLMSH_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert log_path() == tmp_path / "xdg" / "llmsh" / "logs.db"


def test_new_log_is_private_wal_and_versioned(log):
    with LogStore.open() as s:
        s.record(Exchange("c1", "chat", "hello", "hi"))
        assert s.con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        for side in ("logs.db-wal", "logs.db-shm"):  # SQLite gives them the database's mode
            assert stat.S_IMODE(log.with_name(side).stat().st_mode) == 0o600
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    assert [r["reply"] for r in rows(log)] == ["hi"]


@pytest.mark.parametrize("content", [b"not a database at all\n" * 50, b"SQLite format 3\x00" + b"\xff" * 200])
def test_corrupt_file_is_an_error_and_is_not_touched(log, content):
    log.parent.mkdir()
    log.write_bytes(content)
    with pytest.raises(LogError, match="cannot use the log"):
        LogStore.open()
    assert log.read_bytes() == content
    assert not log.with_name("logs.db-wal").exists()


def test_newer_schema_is_refused(log):
    LogStore.open().close()
    con = sqlite3.connect(log)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(LogError, match="newer than this llmsh"):
        LogStore.open()


def _fill(store):
    a = store.record(Exchange("c1", "chat", "What is the capital of France?", "Paris, of course."))
    store.record(Exchange("c1", "chat", "And of Italy?", "Rome.", parent_id=a))
    store.record(Exchange("c2", "generate", "Tell me about 100% cotton_wool", "It is \"soft\": very."))


@pytest.mark.parametrize("fts", [True, False])
def test_search(log, fts):
    if fts and not fts5_available():
        pytest.skip("no FTS5 in this SQLite")
    with LogStore.open(fts=fts) as s:
        assert s.fts is fts
        _fill(s)
        assert [e.reply for e in s.query(text="capital")] == ["Paris, of course."]
        assert [e.reply for e in s.query(text="CAPITAL france")] == ["Paris, of course."]
        assert s.query(text="capital rome") == []            # all words must match
        assert [e.prompt for e in s.query(text="rome")] == ["And of Italy?"]  # the reply counts too
        # Characters that are FTS5 syntax or LIKE wildcards are plain text.
        assert [e.conversation_id for e in s.query(text='"soft": 100%')] == ["c2"]
        assert s.query(text="c_tton") == []
        if not fts:  # substrings: "%" is a character, not a wildcard (FTS5 has no such token)
            assert [e.conversation_id for e in s.query(text="%")] == ["c2"]
        assert [e.reply for e in s.query(2)] == ["Rome.", 'It is "soft": very.']  # latest, oldest first
        assert [e.reply for e in s.query(None, conversation="c1")] == ["Paris, of course.", "Rome."]


def test_search_falls_back_to_like_with_a_notice(log, monkeypatch):
    import llmsh.cli.logs as cli_logs

    with LogStore.open(fts=False) as s:
        _fill(s)
    monkeypatch.setattr(cli_logs, "fts5_available", lambda: False)
    r = ok(["logs", "-q", "italy", "--json"])
    assert [json.loads(ln)["reply"] for ln in r.stdout.splitlines()] == ["Rome."]
    assert "FTS5) is not available" in r.stderr


def test_conversation_ids_by_prefix(log):
    with LogStore.open() as s:
        s.record(Exchange("abc123", "chat", "p", "r"))
        s.record(Exchange("abd456", "chat", "p", "r"))
        assert s.resolve_conversation("abc") == "abc123"
        with pytest.raises(LogError, match="ambiguous"):
            s.resolve_conversation("ab")
        with pytest.raises(LogError, match="no conversation 'x%'"):
            s.resolve_conversation("x%")


def test_interrupted_write_rolls_back(log):
    with LogStore.open() as s:
        s.record(Exchange("c1", "chat", "one", "1"))
        with pytest.raises(KeyboardInterrupt):
            with s._transaction():
                s.con.execute("INSERT INTO responses (conversation_id, kind, prompt, reply, created) "
                              "VALUES ('c1', 'chat', 'two', '2', 0)")
                raise KeyboardInterrupt
        s.record(Exchange("c1", "chat", "three", "3"))
    assert [r["prompt"] for r in rows(log)] == ["one", "three"]


_WRITER = """
import os, sys, time
from llmsh.logstore import Exchange, LogStore
# A barrier, not a clock: on a loaded machine one interpreter may start seconds after the other.
barrier = sys.argv[2]
open(os.path.join(barrier, sys.argv[1]), "w").close()
while len(os.listdir(barrier)) < 2:
    time.sleep(0.001)
with LogStore.open() as s:
    for i in range(300):
        s.record(Exchange(sys.argv[1], "chat", f"prompt {i}", f"reply {i}"))
        time.sleep(0.002)  # spread the writes, so that the two processes overlap
"""


def test_two_processes_log_at_once(log, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # Both create the (missing) database and then write, at the same time.
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, cid, str(barrier)], env=env,
                              stderr=subprocess.PIPE, text=True) for cid in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    got = rows(log)
    assert len(got) == 600
    assert sorted(r["conversation_id"] for r in got) == ["a"] * 300 + ["b"] * 300
    assert len({r["conversation_id"] for r in got[:300]}) == 2  # they did write at the same time


# --- the hooks and the command ----------------------------------------------------------------------

def test_generate_is_logged_and_listed(log, chat_model):  # noqa: F811
    r = ok(["generate", "-m", str(chat_model), "-n", "4", "--temperature", "0", "--json",
            "--system", "Be brief.", "Hello there"])
    out = json.loads(r.stdout)
    (row,) = rows(log)
    assert row["kind"] == "generate" and row["prompt"] == "Hello there" and row["system"] == "Be brief."
    assert row["reply"] == out["text"] and row["finish_reason"] == out["finish_reason"]
    assert row["prompt_tokens"] == out["prompt_tokens"]
    assert row["completion_tokens"] == out["completion_tokens"]
    assert row["options"]["temperature"] == 0.0 and row["options"]["max_tokens"] == 4
    assert row["model"] == chat_model.name and row["model_path"] == str(chat_model)
    ok(["generate", "-m", str(chat_model), "-n", "3", "--raw", "Once upon a time"])
    listed = ok(["logs"]).stdout
    assert listed.index("> Hello there") < listed.index("> Once upon a time")
    assert "· generate ·" in listed and "· raw ·" in listed and "system: Be brief." in listed
    lines = ok(["logs", "--json", "-n", "1"]).stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["prompt"] == "Once upon a time"
    assert json.loads(lines[0])["datetime_utc"].endswith("Z")
    assert [json.loads(ln)["prompt"] for ln in ok(["logs", "--json", "-q", "upon"]).stdout.splitlines()] \
        == ["Once upon a time"]
    r = ok(["logs", "-q", "nowhere-to-be-found"])
    assert r.stdout == "" and "no matching exchanges" in r.stderr


def test_no_log_env_and_logs_off(log, chat_model):  # noqa: F811
    gen = ["generate", "-m", str(chat_model), "-n", "2", "hi"]
    ok(gen + ["--no-log"])
    ok(gen, env={"LLMSH_LOG": "off"})
    assert not log.exists()  # nothing was even created
    assert "Logging is off" in ok(["logs", "off"]).stdout
    assert (log.parent / "logs-off").exists() and logging_state() == (False, "llmsh logs off")
    ok(gen)
    assert "Logging is off (llmsh logs off)" in ok(["logs", "status"]).stdout
    ok(gen, env={"LLMSH_LOG": "on"})  # the environment wins over the marker
    assert len(rows(log)) == 1
    assert "Logging is on" in ok(["logs", "on"]).stdout
    ok(gen)
    assert len(rows(log)) == 2
    status = ok(["logs", "status"]).stdout
    assert "Logging is on" in status and "2 exchanges in 2 conversations" in status
    assert ok(["logs", "path"]).stdout.strip() == str(log)


def test_unusable_log_is_a_warning_and_generate_and_chat_still_work(log, chat_model):  # noqa: F811
    log.parent.mkdir()
    junk = b"precious, not a database\n" * 100
    log.write_bytes(junk)
    r = ok(["generate", "-m", str(chat_model), "-n", "8", "hi"])    # (3 tokens may be one cut character)
    assert r.stdout.strip() and r.stderr.count("\n") == 1
    assert r.stderr.startswith("llmsh: warning: not logging this run: cannot use the log")
    r = ok(["chat", "-m", str(chat_model), "-n", "8", "-t", "0"], input="hello\n")
    assert r.stdout.strip() and "warning: not logging" in r.stderr
    assert log.read_bytes() == junk
    r = run(["logs"])
    assert r.exit_code == 1 and r.stderr.startswith("llmsh: error: cannot use the log")


def test_interrupted_generate_is_recorded_as_such(log, chat_model, monkeypatch):  # noqa: F811
    import llmsh.generate as g

    def fake(*a, **kw):  # two pieces, then Ctrl-C (stats untouched: no finish reason)
        yield "Hel"
        yield "lo"
        raise KeyboardInterrupt

    monkeypatch.setattr(g, "generate_text", fake)
    r = run(["generate", "-m", str(chat_model), "-n", "8", "--temperature", "0", "hi"])
    assert r.exit_code == 130
    (row,) = rows(log)
    assert row["finish_reason"] == "interrupted" and row["reply"] == "Hello"


# --- chat: turns, the tree of /regen and /undo, continuing ------------------------------------------

def drive(lm, keys: str, **kw):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from llmsh.cli.repl import run_chat
    from llmsh.sampling import SamplingParams

    out, err = io.StringIO(), io.StringIO()
    with create_pipe_input() as inp:
        inp.send_text(keys)
        rc = run_chat(lm, input=inp, output=DummyOutput(), stdout=out, stderr=err, history=False,
                      params=SamplingParams(temperature=0.0), max_tokens=4, **kw)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def lm(chat_model):  # noqa: F811
    from llmsh.loader import load_model

    return load_model(str(chat_model), device="cpu", dtype="float32")


def test_chat_turns_regen_undo_clear_and_load(log, lm, tmp_path):
    from llmsh.cli.logs import ChatLogger

    saved = tmp_path / "c.json"
    saved.write_text(json.dumps({"format": "llmsh-chat", "version": 1, "system": None, "messages": [
        {"role": "user", "content": "from a file"}, {"role": "assistant", "content": "ok"}]}))
    store = LogStore.open()
    keys = f"one\ntwo\n/regen\nthree\n/undo\nfour\n/clear\nfresh\n/load! {saved}\nafter load\n/exit\n"
    rc, out, err = drive(lm, keys, log=ChatLogger(store, print))
    store.close()
    got = rows(log)
    assert [r["prompt"] for r in got] == ["one", "two", "two", "three", "four", "fresh", "after load"]
    ids = [r["id"] for r in got]
    parents = [r["parent_id"] for r in got]
    # /regen answers "two" again (a sibling); "four" follows the kept reply to "two" after /undo.
    assert parents == [None, ids[0], ids[0], ids[2], ids[2], None, None]
    cids = [r["conversation_id"] for r in got]
    assert len(set(cids[:5])) == 1 and len({cids[0], cids[5], cids[6]}) == 3
    assert got[6]["context"] == [{"role": "user", "content": "from a file"},
                                 {"role": "assistant", "content": "ok"}]
    assert all(r["kind"] == "chat" and r["finish_reason"] in ("stop", "length") for r in got)
    with LogStore.open() as s:
        conv = s.conversation(cids[0])
        assert [m["content"] for m in conv.messages if m["role"] == "user"] == ["one", "two", "four"]
        assert conv.messages[3]["content"] == got[2]["reply"]  # the regenerated reply
        latest = s.conversation()
        assert latest.id == cids[6]
        assert [m["content"] for m in latest.messages][::2] == ["from a file", "after load"]


def test_chat_interrupted_reply_is_logged_as_interrupted(log, lm, monkeypatch):
    import llmsh.generate as g
    from llmsh.cli.logs import ChatLogger

    real, calls = g.generate_tokens, []

    def fake(*a, **kw):
        calls.append(1)
        for i, t in enumerate(real(*a, **kw)):
            if i == 2 and len(calls) == 1:
                raise KeyboardInterrupt
            yield t

    monkeypatch.setattr(g, "generate_tokens", fake)
    with LogStore.open() as store:
        drive(lm, "first\nsecond\n/exit\n", log=ChatLogger(store, print))
    got = rows(log)
    assert [r["finish_reason"] for r in got][0] == "interrupted" and got[0]["completion_tokens"] == 2
    assert got[1]["parent_id"] == got[0]["id"]  # the partial reply stays in the conversation


def test_chat_continue_and_cid(log, chat_model):  # noqa: F811
    base = ["chat", "-m", str(chat_model), "-n", "3", "--temperature", "0"]
    ok(base, input="first question\n")
    ok(base, input="another conversation\n")
    r = ok(base + ["-c"], input="follow-up\n")
    assert "continuing conversation" in r.stderr and "(2 messages)" in r.stderr
    got = rows(log)
    assert got[2]["conversation_id"] == got[1]["conversation_id"]
    assert got[2]["parent_id"] == got[1]["id"]
    # The whole conversation was re-encoded through the template: a longer prompt than alone.
    alone = ok(base + ["--no-log"], input="follow-up\n")
    assert got[2]["prompt_tokens"] > got[1]["prompt_tokens"]
    first = got[0]["conversation_id"]
    r = ok(base + ["--cid", first[:6], "--stats"], input="back to the first\n")
    got = rows(log)
    assert got[3]["conversation_id"] == first and got[3]["parent_id"] == got[0]["id"]
    with LogStore.open() as s:
        conv = s.conversation(first)
    assert [m["content"] for m in conv.messages][::2] == ["first question", "back to the first"]
    listed = ok(["logs", "--conversation", first]).stdout
    assert "> first question" in listed and "> back to the first" in listed and "follow-up" not in listed
    r = run(base + ["--cid", "nope"], input="x\n")
    assert r.exit_code == 1 and "no conversation 'nope'" in r.stderr and "Traceback" not in r.stderr
    assert alone.exit_code == 0


def test_chat_continue_without_a_log_is_an_error(log, chat_model):  # noqa: F811
    r = run(["chat", "-m", str(chat_model), "-c"], input="x\n")
    assert r.exit_code == 1 and r.stderr.startswith("llmsh: error: no log yet")


def test_logs_does_not_import_torch(log):
    check = ("import sys\nfrom llmsh.cli import cli\ncli.main(['logs', 'status'], standalone_mode=False)\n"
             "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert "Logging is on" in r.stdout and "nothing logged yet" in r.stdout


def test_logs_without_a_log_and_bad_arguments(log):
    r = ok(["logs"])
    assert r.stdout == "" and "nothing logged yet" in r.stderr and not log.exists()
    r = run(["logs", "-q", "  "])
    assert r.exit_code == 1 and r.stderr.startswith("llmsh: error: empty -q/--query")
    r = run(["logs", "sideways"])
    assert r.exit_code == 2 and "Traceback" not in r.stderr
