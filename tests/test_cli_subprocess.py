"""The command line as a real process: pipes, a pseudo-terminal, signals, exit codes.

Each run starts a Python interpreter and imports torch (a second or two), so the cases here are
the ones CliRunner cannot show: real stdin/stdout pipes, isatty, NO_COLOR, SIGINT, a reader that
goes away (``| head``), and the default model end to end (marked ``default_model``).
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_fixtures import DEFAULT_MODEL_HOME, LONG_TEXT, chat_model, hf_tokenizer  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if k not in ("LLMSH_MODEL", "NO_COLOR", "TERM")}
    e["LLMSH_HOME"] = str(tmp_path / "home")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def llmsh(args, *, input=b"", env, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "llmsh", *args], input=input, capture_output=True,
                          env=env, cwd=ROOT, timeout=timeout, **kw)


def test_generate_through_pipes(chat_model, env):
    m = ["-m", str(chat_model), "--raw", "-n", "5"]
    arg = llmsh(["generate", *m, "--json", "notes: the fox\n\nSummarize."], env=env)
    both = llmsh(["generate", *m, "--json", "Summarize."], input=b"notes: the fox\n", env=env)
    assert arg.returncode == both.returncode == 0, (arg.stderr, both.stderr)
    a, b = json.loads(arg.stdout), json.loads(both.stdout)
    assert a == {**b, "timings": a["timings"]}
    n = len(hf_tokenizer(chat_model)("notes: the fox\n\nSummarize.").input_ids)
    assert a["prompt_tokens"] == n
    plain = llmsh(["generate", *m], input=b"Hello there\n", env=env)
    assert plain.returncode == 0 and plain.stderr == b""
    assert plain.stdout.endswith(b"\n") and b"\x1b" not in plain.stdout


def test_bad_input_exit_codes(chat_model, env):
    for args, stdin, code, words in [
        (["generate", "-m", str(chat_model)], b"", 1, b"empty prompt"),
        (["tokenize", "-m", str(chat_model)], b"\xc3\x28 bad", 1, b"UTF-8"),
        (["generate", "-m", "/no/such/dir", "hi"], b"", 1, b"/no/such/dir"),
        (["generate", "--top-p", "2", "hi"], b"", 2, b"0<=x<=1"),
        (["chat", "-m", str(chat_model)], b"", 1, b"empty"),
    ]:
        r = llmsh(args, input=stdin, env=env)
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.startswith(b"llmsh: error: ") and r.stderr.count(b"\n") == 1, r.stderr
        assert words in r.stderr and b"Traceback" not in r.stderr and r.stdout == b""


def test_chat_and_plain_llmsh_with_piped_stdin(chat_model, env):
    # greedy: a sampled reply of a few tokens from random weights may be one cut character (held back)
    for args in (["chat", "-m", str(chat_model), "-n", "8", "-t", "0", "--no-history"],
                 ["-m", str(chat_model), "-n", "8", "-t", "0"]):
        r = llmsh(args, input=b"Hello!\n", env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.endswith(b"\n") and b"\x1b" not in r.stdout and r.stdout.strip()


def run_in_pty(args, env):
    """Run with stdout on a pseudo-terminal (stdin and stderr piped); return what it printed."""
    leader, follower = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "llmsh", *args], stdin=subprocess.DEVNULL,
                         stdout=follower, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert p.wait(timeout=60) == 0, p.stderr.read()
    return out


def test_colour_only_on_a_terminal_and_never_with_no_color(chat_model, env):
    args = ["tokenize", "-m", str(chat_model), "--pieces", "Hello world"]
    piped = llmsh(args, env=env)
    assert piped.returncode == 0 and b"\x1b" not in piped.stdout
    assert b"\x1b[" in run_in_pty(args, dict(env, TERM="xterm"))
    assert b"\x1b" not in run_in_pty(args, dict(env, TERM="xterm", NO_COLOR="1"))


def test_closed_pipe_ends_quietly(chat_model, env):
    # Far more output than a pipe buffer holds, so the writer is still writing when we leave.
    p = subprocess.Popen([sys.executable, "-m", "llmsh", "tokenize", "-m", str(chat_model), "--pieces"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, cwd=ROOT)
    p.stdin.write((LONG_TEXT * 20).encode())
    p.stdin.close()
    assert p.stdout.readline()
    p.stdout.close()
    assert p.wait(timeout=60) == 141
    assert p.stderr.read() == b""


def test_ctrl_c_exits_130_without_traceback(chat_model, env):
    p = subprocess.Popen([sys.executable, "-m", "llmsh", "generate", "-m", str(chat_model), "--raw",
                          "-n", "250", "Hello"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and not select.select([p.stdout], [], [], 0.1)[0]:
        pass
    os.read(p.stdout.fileno(), 1)  # it is streaming now
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
    assert out.endswith(b"\n")


@pytest.mark.default_model
def test_default_model_answers(env):
    env = dict(env)
    # The suite's own cache (never the user's): pulled once, shared with the other default-model tests.
    env["LLMSH_HOME"] = str(DEFAULT_MODEL_HOME)
    r = llmsh(["generate", "What is the capital of France?"], env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert b"Paris" in r.stdout and r.stdout.endswith(b"\n")
    r = llmsh(["generate", "-n", "40"], input=b"Name three colors.\n", env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


# --- Ctrl-C keeps what was computed (ppl's running result, generate --json's partial object) ----

@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A tiny model with a long context and enough width that scoring a long text or writing a
    long reply takes seconds, so that a Ctrl-C lands in the middle."""
    from cli_fixtures import ENDOFTEXT, IM_END, vocab_size, write_tokenizer
    from tiny_models import make_tiny_model

    path, _ = make_tiny_model("llama", tmp_path_factory.mktemp("slow"), vocab_size=vocab_size(),
                              hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                              max_position_embeddings=32768, bos_token_id=ENDOFTEXT,
                              eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
    write_tokenizer(path, bos=True, template=None)
    # No end-of-sequence token: a reply runs to its -n, so a Ctrl-C lands in it however fast the
    # machine decodes (with one, greedy decoding of these random weights ends within ~300 tokens).
    for name, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id"),
                      ("generation_config.json", "eos_token_id")):
        cfg = json.loads((path / name).read_text(encoding="utf-8"))
        cfg[key] = None
        (path / name).write_text(json.dumps(cfg), encoding="utf-8")
    return path


def _interrupt_when(p, stream, ready, timeout=300):
    """Read ``stream`` (a file descriptor) until ``ready(text so far)``, then send SIGINT."""
    seen = b""
    deadline = time.time() + timeout
    while time.time() < deadline and not ready(seen.decode(errors="replace")):
        if select.select([stream], [], [], 0.2)[0]:
            try:
                chunk = os.read(stream, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    assert p.poll() is None, "finished before the interruption: make the input longer"
    p.send_signal(signal.SIGINT)
    return seen


def _sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # a shell's `cmd &` would leave it ignored


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_in_perplexity_prints_the_running_result(slow_model, env, tmp_path, as_json):
    import re

    text = tmp_path / "long.txt"
    text.write_text(LONG_TEXT * 60, encoding="utf-8")        # ~100 windows of 256 tokens
    rows = tmp_path / "rows.jsonl"
    # stderr on a terminal, so that the progress bar shows when the first batch is done.
    leader, follower = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "llmsh", "ppl", "-m", str(slow_model), "-c", "256",
                          "--per-token", str(rows), str(text)] + (["--json"] if as_json else []),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower, env=env,
                         cwd=ROOT, preexec_fn=_sigint_default)
    os.close(follower)
    _interrupt_when(p, leader, lambda s: re.search(r"\b[1-9]\d*/\d+", s))
    out, _ = p.communicate(timeout=120)
    os.close(leader)
    assert p.returncode == 130
    scored = [json.loads(line) for line in rows.read_text().splitlines()]
    if as_json:
        r = json.loads(out)
        assert r["interrupted"] is True and 0 < r["n_tokens"] < r["n_tokens_planned"]
        assert r["perplexity"] > 1 and r["stderr"] > 0
    else:
        m = re.fullmatch(rb".*: PPL [\d.]+ \xc2\xb1 [\d.]+, .* (\d+) tokens scored .* "
                         rb"\[interrupted: (\d+) of (\d+) tokens\]\n", out)
        assert m, out
        n = int(m.group(1))
        assert n == int(m.group(2)) and 0 < n < int(m.group(3))
        r = {"n_tokens": n}
    # --per-token keeps exactly the rows of the tokens counted.
    assert len(scored) == r["n_tokens"] and all(row["logprob"] <= 0 for row in scored)


def test_ctrl_c_in_generate_json_prints_the_partial_object(slow_model, env):
    args = [sys.executable, "-m", "llmsh", "generate", "-m", str(slow_model), "--raw", "--json",
            "--temperature", "0", "--no-compile", "Hello"]
    t0 = time.time()
    short = subprocess.run(args + ["-n", "4"], capture_output=True, env=env, cwd=ROOT, timeout=300)
    assert short.returncode == 0, short.stderr
    start_up = time.time() - t0             # loading and a 4-token reply: well before 20000 tokens
    p = subprocess.Popen(args + ["-n", "20000"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, cwd=ROOT, preexec_fn=_sigint_default)
    time.sleep(2 * start_up + 2)
    assert p.poll() is None, "finished before the interruption"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    r = json.loads(out)
    assert r["finish_reason"] == "interrupted" and b"Traceback" not in err
    assert 0 < r["completion_tokens"] == len(r["tokens"]) < 20000
    assert isinstance(r["text"], str) and r["text"]       # what was streamed of those tokens
    assert r["tokens"][:4] == json.loads(short.stdout)["tokens"]
@pytest.mark.default_model
def test_a_character_cut_by_the_length_limit_is_not_printed(env):
    """Issue 9 item 8: two tokens of a Chinese continuation end inside a character; neither
    stdout nor --json text shows U+FFFD, and --json tokens keep both ids."""
    env = dict(env, LLMSH_HOME=str(DEFAULT_MODEL_HOME))
    args = ["generate", "--raw", "-n", "2", "中文：人工智能是"]
    r = llmsh(args, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "\ufffd" not in r.stdout.decode("utf-8") and r.stdout.strip()
    r = llmsh(args + ["--json"], env=env, timeout=600)
    obj = json.loads(r.stdout)
    assert "\ufffd" not in obj["text"] and len(obj["tokens"]) == 2 and obj["finish_reason"] == "length"
