"""Where llmsh writes a user's FILE (``--per-token FILE``, ``/save!``): a regular file is replaced
only at the end, anything else (devices, FIFOs, /dev/stdout) is written through, links are
followed, an input is never overwritten, ``-`` is stdout and ``""`` an error.

Devices are reached through symbolic links in tmp_path, so that a regression (renaming over the
path) replaces the link in tmp_path, never /dev/null or /dev/full themselves.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cli_fixtures import LONG_TEXT, chat_model, llmsh_home  # noqa: F401
from test_cli import ok, one_line_error, run

from llmsh.conversation_io import write_conversation
from llmsh.errors import InputError
from llmsh.files import PendingFile

ROOT = Path(__file__).resolve().parent.parent
TEXT = "hello world " * 40


def ppl(chat_model, *args, input=None):
    return run(["ppl", "-m", str(chat_model), "-c", "32", *args], input=input)


def test_a_link_is_followed_and_kept(tmp_path):
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    os.chmod(target, 0o640)
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    p = PendingFile(link)
    p.write("new\n")
    p.commit()
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(x.name for x in tmp_path.iterdir()) == ["link.jsonl", "real.jsonl"]


def test_a_device_is_written_through(tmp_path):
    null = tmp_path / "null"
    null.symlink_to(os.devnull)
    p = PendingFile(null)
    p.write("x" * 100_000)
    p.commit()
    assert null.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert [x.name for x in tmp_path.iterdir()] == ["null"]       # no temporary beside it


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_device_is_a_one_line_error(tmp_path):
    full = tmp_path / "full"
    full.symlink_to("/dev/full")
    p = PendingFile(full)
    with pytest.raises(InputError, match="No space left on device"):
        p.write("x" * 100_000)
        p.commit()
    p.discard()
    assert full.is_symlink()


def test_a_fifo_is_written_through(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(Path(fifo).read_text()))
    reader.start()
    p = PendingFile(fifo)
    p.write("through the pipe\n")
    p.commit()
    reader.join(10)
    assert got == ["through the pipe\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_inputs_and_bad_names_are_refused(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("text\n")
    link = tmp_path / "alias.txt"
    link.symlink_to(src)
    for path in (src, link, tmp_path / "." / "input.txt"):
        with pytest.raises(InputError, match="one of the inputs"):
            PendingFile(path, inputs=[str(src)])
    with pytest.raises(InputError, match="empty"):
        PendingFile("")
    with pytest.raises(InputError, match="directory"):
        PendingFile(tmp_path)
    assert src.read_text() == "text\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["alias.txt", "input.txt"]


def test_per_token_refuses_an_input_file(chat_model, tmp_path, llmsh_home):
    src = tmp_path / "a.txt"
    src.write_text(TEXT)
    one_line_error(ppl(chat_model, "--per-token", str(src), str(src)), "one of the inputs")
    assert src.read_text() == TEXT
    link = tmp_path / "b.txt"
    link.symlink_to(src)
    one_line_error(ppl(chat_model, "--per-token", str(link), str(src)), "one of the inputs")
    assert src.read_text() == TEXT and link.is_symlink()


def test_per_token_dash_is_stdout_and_empty_is_an_error(chat_model, tmp_path, llmsh_home):
    r = ppl(chat_model, "--json", "--per-token", "-", input=TEXT)
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert {"position", "id", "logprob"} <= set(rows[0]) and rows[-1]["source"] == "<stdin>"
    assert "perplexity" in rows[-1] and len(rows) == rows[-1]["n_tokens"] + 1
    assert not (tmp_path / "-").exists() and not os.path.exists("-")
    one_line_error(ppl(chat_model, "--per-token", "", input=TEXT), "empty")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_per_token_on_a_full_device_exits_non_zero(chat_model, tmp_path, llmsh_home):
    full = tmp_path / "full"
    full.symlink_to("/dev/full")
    one_line_error(ppl(chat_model, "--per-token", str(full), input=TEXT), "No space left on device")
    assert full.is_symlink()


def test_per_token_to_dev_stdout_is_the_same_stream(chat_model, tmp_path, llmsh_home):
    work = tmp_path / "work"
    work.mkdir()
    src = work / "a.txt"
    src.write_text(TEXT)
    out = work / "out.txt"
    env = {k: v for k, v in os.environ.items() if k != "LLMSH_MODEL"}
    env.update(LLMSH_HOME=str(llmsh_home), PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    with open(out, "w") as f:
        r = subprocess.run([sys.executable, "-m", "llmsh", "ppl", "-m", str(chat_model), "-c", "32",
                            "--per-token", "/dev/stdout", str(src)], stdout=f, stderr=subprocess.PIPE,
                           env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    # Both the result line and the rows are in the file the shell opened, which is still a file.
    assert lines[0].startswith(f"{src}: PPL") and json.loads(lines[-1])["source"] == str(src)
    assert stat.S_ISREG(out.stat().st_mode) and sorted(x.name for x in work.iterdir()) == ["a.txt", "out.txt"]


def test_save_bang_writes_through_a_device(tmp_path):
    null = tmp_path / "null"
    null.symlink_to(os.devnull)
    data = {"format": "llmsh-chat", "version": 1, "system": None, "messages": []}
    with pytest.raises(InputError, match="not a saved llmsh conversation"):
        write_conversation(null, data)
    write_conversation(null, data, force=True)                 # /save! FILE
    assert null.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)
