"""CLI behaviours from the QA pass: bare prompts, --n-ctx for generate, --errors everywhere,
argv that is not UTF-8, rejected option combinations, and the shared --stats line."""

import json
import os
import re

import pytest

from cli_fixtures import bos_model, chat_model, hf_tokenizer, llmsh_home  # noqa: F401
from test_cli import ok, one_line_error, run

from llmsh.cli import output
from llmsh.errors import InputError
from llmsh.files import PendingFile

BAD = "caf\udce9"  # what Python makes of the argv bytes b"caf\xe9" (surrogateescape)


@pytest.fixture
def terminal(monkeypatch):
    """stdin is a terminal (nothing piped in)."""
    monkeypatch.setattr(output, "stdin_is_terminal", lambda: True)


def gen_json(chat_model, *args, input=None):
    return json.loads(ok(["generate", "-m", str(chat_model), "--json", *args], input=input).stdout)


# --- routing without a command ----------------------------------------------------------------------

def test_bare_prompt_generates(chat_model, llmsh_home, terminal):
    # `llmsh PROMPT` is generate with chat's sampling defaults (issue 9 item 6), so it equals
    # generate given those values, and differs from generate's own greedy defaults.
    chat = ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--repetition-penalty", "1.1"]
    a = ok(["What is the capital of France?", "-m", str(chat_model), "-n", "8", "--seed", "1"]).stdout
    b = ok(["generate", "-m", str(chat_model), "-n", "8", "--seed", "1", *chat,
            "What is the capital of France?"]).stdout
    assert a == b and a.strip()
    greedy = ok(["generate", "-m", str(chat_model), "-n", "8", "--seed", "1", "What is the capital of France?"])
    assert greedy.stdout != a
    # options first, then the prompt, on a terminal: generate, not chat
    assert ok(["-m", str(chat_model), "-n", "8", "--seed", "1", "What is the capital of France?"]).stdout == b


def test_piped_prompt_without_a_command_has_chat_defaults(chat_model, llmsh_home, monkeypatch):
    chat = ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--repetition-penalty", "1.1"]
    q = "What is the capital of France?\n"
    want = ok(["generate", "-m", str(chat_model), "--seed", "2", *chat], input=q).stdout
    assert ok(["-m", str(chat_model), "--seed", "2"], input=q).stdout == want
    import llmsh.generate as g

    real, used = g.generate_text, []

    def spy(decoder, tokenizer, ids, cache, params, **kw):
        used.append(params)
        return real(decoder, tokenizer, ids, cache, params, **kw)

    monkeypatch.setattr(g, "generate_text", spy)
    monkeypatch.setenv("LLMSH_MODEL", str(chat_model))
    ok([], input=q)  # bare `llmsh` with a piped prompt
    ok(["generate", "-n", "2"], input=q)
    assert (used[0].temperature, used[0].repetition_penalty, used[0].seed) == (0.8, 1.1, None)
    assert used[1].greedy and used[1].repetition_penalty == 1.0  # generate keeps its own


def test_options_only_on_a_terminal_start_chat(chat_model, llmsh_home, terminal, monkeypatch):
    seen = {}

    def fake_chat(lm, **kw):
        seen.update(kw)
        return 0
    monkeypatch.setattr("llmsh.cli.repl.run_chat", fake_chat)
    ok(["-m", str(chat_model), "--n-ctx", "64", "--no-history"])
    assert seen["n_ctx"] == 64 and seen["history"] is False
    # chat's defaults (issue 9 item 6): sampling with a mild penalty, replies capped at 1024 tokens
    p = seen["params"]
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, seen["max_tokens"]) == (0.8, 40, 0.9, 1.1, 1024)
    ok(["chat", "-m", str(chat_model), "-n", "7", "-t", "0"])
    assert seen["max_tokens"] == 7 and seen["params"].greedy


def test_options_only_with_empty_stdin_is_generate(chat_model, llmsh_home):
    one_line_error(run(["-m", str(chat_model), "--n-ctx", "64"], input=""), "empty prompt")


def test_command_names_and_aliases_still_win(chat_model, llmsh_home):
    r = ok(["ppl", "-m", str(chat_model), "--n-ctx", "8", "--json"], input="hello world " * 20)
    assert json.loads(r.stdout)["n_ctx"] == 8


# --- generate --n-ctx ---------------------------------------------------------------------------------

def test_generate_n_ctx_stops_with_length_when_full(chat_model, llmsh_home):
    n_prompt = len(hf_tokenizer(chat_model)("Hello there").input_ids)
    out = gen_json(chat_model, "--raw", "-n", "50", "--n-ctx", str(n_prompt + 3), "Hello there")
    # cache of n_prompt+3 positions: the prompt, then 3 fed-back tokens, then one last sample.
    assert out["finish_reason"] == "length" and out["completion_tokens"] == 4 and out["n_ctx"] == n_prompt + 3
    ref = gen_json(chat_model, "--raw", "-n", "4", "Hello there")
    assert out["tokens"] == ref["tokens"]  # the same tokens: only the limit differs
    assert gen_json(chat_model, "--raw", "-n", "3", "Hello there")["n_ctx"] == 256  # the model's


def test_generate_prompt_must_fit_n_ctx(chat_model, llmsh_home):
    one_line_error(run(["generate", "-m", str(chat_model), "--raw", "--n-ctx", "4", "one two three four five"]),
                   "--n-ctx", "is 4 tokens")
    one_line_error(run(["generate", "-m", str(chat_model), "--n-ctx", "1000", "hi"]),
                   "--n-ctx 1000", "256")


# --- invalid UTF-8 and --errors ---------------------------------------------------------------------

@pytest.mark.parametrize("args", [["tokenize", BAD], ["generate", "-n", "3", BAD],
                                  ["generate", "-n", "3", "--system", BAD, "hi"], [BAD]])
def test_argv_that_is_not_utf8_is_one_line(args, chat_model, llmsh_home):
    one_line_error(run(args[:1] + ["-m", str(chat_model)] + args[1:] if args[0] != BAD
                       else ["-m", str(chat_model), "-n", "2", BAD]),
                   "not valid UTF-8", "--errors replace")


def test_errors_replace_for_argv_and_stdin(chat_model, llmsh_home):
    ids = ok(["tokenize", "-m", str(chat_model), "--errors", "replace", BAD]).stdout.split()
    assert list(map(int, ids)) == hf_tokenizer(chat_model)("caf\ufffd").input_ids
    a = gen_json(chat_model, "--raw", "-n", "2", "--errors", "replace", BAD)
    b = gen_json(chat_model, "--raw", "-n", "2", "caf\ufffd")
    assert a["tokens"] == b["tokens"] and a["prompt_tokens"] == b["prompt_tokens"]
    c = gen_json(chat_model, "--raw", "-n", "2", "--errors", "replace", input=b"caf\xe9")
    assert c["tokens"] == b["tokens"]
    r = ok(["chat", "-m", str(chat_model), "-n", "8", "-t", "0", "--no-history", "--errors", "replace"],
           input=b"caf\xe9")
    assert r.stdout.strip()
    one_line_error(run(["chat", "-m", str(chat_model), "--no-history"], input=b"caf\xe9"), "--errors replace")


# --- rejected combinations and clearer messages -------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["generate", "--stop", "", "hi"], "stop string cannot be empty"),
    (["tokenize", "--pieces", "--decode", "1 2"], "--decode"),
    (["tokenize", "--count", "--decode", "1 2"], "--decode"),
    (["ppl", "--each-line", "--stride", "4"], "--each-line"),
    (["ppl", "--each-line", "--all-tokens"], "--each-line"),
    (["ppl", "--n-ctx", "3"], "x>=4"),
    (["generate", "--stop"], "requires an argument"),
])
def test_conflicting_or_bad_options_are_usage_errors(args, fragment, chat_model, llmsh_home):
    r = run(args[:1] + ["-m", str(chat_model)] + args[1:], input="some text\n")
    line = one_line_error(r, fragment, code=2)
    assert f"'llmsh {args[0] if args[0] != 'ppl' else 'ppl'} --help'" in line or "--help" in line


def test_per_token_path_checked_before_the_model_loads(tmp_path, llmsh_home, monkeypatch):
    monkeypatch.setattr("llmsh.cli.score.load", lambda *a: pytest.fail("loaded the model first"))
    one_line_error(run(["ppl", "--per-token", str(tmp_path / "nonexist" / "x.jsonl")], input="text\n"),
                   "cannot write", "nonexist")


def test_per_token_file_is_replaced_only_by_a_run_that_succeeds(chat_model, tmp_path, llmsh_home):
    out = tmp_path / "out"
    out.mkdir()
    per = out / "keep.jsonl"
    per.write_text("earlier results\n")
    os.chmod(per, 0o640)
    # Too short for the default protocol: an error after the model loaded; the file is untouched.
    one_line_error(run(["ppl", "-m", str(chat_model), "-c", "32", "--per-token", str(per)], input="a b c\n"),
                   "needs at least")
    assert per.read_text() == "earlier results\n"
    ok(["ppl", "-m", str(chat_model), "-c", "32", "--per-token", str(per)], input="hello world " * 40)
    rows = [json.loads(line) for line in per.read_text().splitlines()]
    assert rows and {"source", "position", "id", "text", "logprob"} <= set(rows[0])
    assert os.stat(per).st_mode & 0o777 == 0o640
    assert [p.name for p in out.iterdir()] == ["keep.jsonl"]     # no temporary left behind


def test_one_scored_token_has_no_stderr(chat_model, llmsh_home):
    tok = hf_tokenizer(chat_model)
    line = next(w for w in ("ab", "a b", "hello", "x y") if len(tok(w).input_ids) == 2)
    r = ok(["ppl", "-m", str(chat_model), "--each-line"], input=line + "\n")
    assert "1 token scored" in r.stdout and "± n/a," in r.stdout and " nan" not in r.stdout
    assert json.loads(ok(["ppl", "-m", str(chat_model), "--each-line", "--json"], input=line).stdout)["stderr"] is None


def test_help_and_behaviour_of_ppl_n_ctx_agree(chat_model, llmsh_home):
    r = ok(["ppl", "--help"])
    assert "capped at the model's context" not in r.stdout and "error" in r.stdout
    one_line_error(run(["ppl", "-m", str(chat_model), "--n-ctx", "1024"], input="x " * 3000), "256")


def test_json_tokens_include_the_stop_string_ids(chat_model, llmsh_home):
    tok = hf_tokenizer(chat_model)
    ref = gen_json(chat_model, "--raw", "-n", "12", "Hello, how")
    full = ref["tokens"]
    # A stop string that token k completes: its text, appearing first when token k is added.
    for k in range(2, len(full) + 1):
        before, upto = tok.decode(full[: k - 1]), tok.decode(full[:k])
        stop = upto[len(before):]
        if upto.startswith(before) and stop.strip() and "\ufffd" not in stop and stop not in before:
            break
    else:
        pytest.skip("no clean token boundary in this greedy output")
    out = gen_json(chat_model, "--raw", "-n", "12", "--stop", stop, "Hello, how")
    assert out["finish_reason"] == "stop" and out["text"] == ref["text"][: ref["text"].index(stop)]
    # tokens: every id generated, through the one that completed the stop string.
    assert out["tokens"] == full[:k] and out["completion_tokens"] == k
    assert "completed a --stop string" in " ".join(ok(["generate", "--help"]).stdout.split())


def test_alternate_colors_skip_empty_pieces(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")

    class Tty:
        def isatty(self):
            return True
    shown = output.alternate_colors(["a", "", "b", "c"], Tty())
    assert shown == "\x1b[30;46ma\x1b[0m\x1b[30;43mb\x1b[0m\x1b[30;46mc\x1b[0m"


def test_stats_line_is_shared_with_chat_format():
    from types import SimpleNamespace

    st = SimpleNamespace(generated_tokens=5, decode_steps=4, decode_tokens_per_s=20.0, ttft_seconds=0.1,
                         reused_tokens=3, prompt_tokens=10, prefill_seconds=0.2, prefill_tokens_per_s=35.0,
                         decode_seconds=0.2, finish_reason="stop")
    line = output.stats_line(st, context_used=14, n_ctx=2048)
    assert line.startswith("5 tokens, 20.0 tokens/s, TTFT 0.10 s, context 14/2048, reused 3/10 prompt tokens")
    assert line.endswith("finish: stop")


# --- convert and the man page --------------------------------------------------------------------------

def test_convert_into_an_existing_empty_folder(tmp_path, llmsh_home, monkeypatch):
    calls = []
    monkeypatch.setattr("llmsh.convert.convert_gguf",
                        lambda g, out, **kw: calls.append((out, kw)) or out)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    empty = tmp_path / "empty"
    empty.mkdir()
    ok(["convert", str(gguf), str(empty)])
    assert calls and calls[0][1]["overwrite"] is False and not empty.exists()  # convert makes it
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    one_line_error(run(["convert", str(gguf), str(full)]), "not empty", "--force")
    # --force replaces only a folder llmsh wrote (issue 9: a typo must not be rm -rf ~/Documents).
    one_line_error(run(["convert", str(gguf), str(full), "--force"]), "not written by llmsh")
    assert (full / "x").read_text() == "x"
    (full / "llmsh-source.json").write_text("{}")
    ok(["convert", str(gguf), str(full), "--force"])
    monkeypatch.chdir(full)
    for d in (".", ".."):
        one_line_error(run(["convert", str(gguf), d, "--force"]), "current folder")
    assert (full / "x").read_text() == "x"


def test_chat_help_lists_the_repl_slash_commands():
    from llmsh.cli.repl import COMMANDS

    text = ok(["chat", "--help"]).stdout
    for name in COMMANDS:
        assert re.search(rf"^ +{re.escape(name)} ", text, re.M), name
    with open(os.path.join(os.path.dirname(__file__), "..", "man", "llmsh.1"), encoding="utf-8") as f:
        page = f.read()
    assert "/regen" in page and "/read FILE" in page


def test_pending_file_replaces_only_on_commit(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old\n")
    p = PendingFile(target)
    p.write("new\n")
    p.discard()                                       # as after an error: nothing changes
    assert target.read_text() == "old\n" and [x.name for x in tmp_path.iterdir()] == ["a.txt"]
    p = PendingFile(tmp_path / "private.json", new_mode=0o600)
    p.write("{}\n")
    p.commit()
    p.discard()                                       # a no-op after the commit
    assert (tmp_path / "private.json").read_text() == "{}\n"
    assert os.stat(tmp_path / "private.json").st_mode & 0o777 == 0o600
    umask = os.umask(0o022)
    try:
        p = PendingFile(tmp_path / "plain.txt")
        p.commit()
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "plain.txt").st_mode & 0o777 == 0o644
    with pytest.raises(InputError, match="cannot write"):
        PendingFile(tmp_path / "missing-dir" / "x")
