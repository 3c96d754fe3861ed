"""The command line through click's CliRunner, on tiny random models with a real tokenizer.

Reference values come from transformers on the same folders (greedy ids, token ids, perplexity
with the same protocol), never from our own output.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from cli_fixtures import IM_END, LONG_TEXT, bos_model, chat_model, hf_tokenizer, llmsh_home  # noqa: F401
from llmsh.cli import cli

RANGE_CASES = [
    (["--temperature", "-1"], "x>=0"),
    (["--top-p", "1.5"], "0<=x<=1"),
    (["--min-p", "-0.1"], "0<=x<=1"),
    (["--top-k", "-1"], "x>=0"),
    (["--repetition-penalty", "0"], "x>0"),
    (["-n", "0"], "x>=1"),
    (["--seed", "-3"], "0 .. 2**63-1"),
    (["--seed", "abc"], "not an integer"),
    (["--n-ctx", "1"], "x>=2"),
    (["--device", "tpu"], "auto, cpu, cuda"),
    (["--dtype", "int8"], "auto"),
]


def run(args, input=None, env=None):
    result = CliRunner().invoke(cli, args, input=input, env=env)
    # Anything but SystemExit escaping the command is a bug (a traceback for the user).
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def ok(args, input=None, env=None):
    r = run(args, input=input, env=env)
    assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
    return r


def one_line_error(r, *fragments, code=1):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmsh: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def hf_chat(chat_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(chat_model, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_bos(bos_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bos_model, attn_implementation="eager").eval()


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=IM_END, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return new[:-1] if new and new[-1] == IM_END else new


# --- help, version, lazy imports ------------------------------------------------------------------


def test_help_lists_every_command_with_examples():
    r = ok(["--help"])
    for name in ("chat", "generate", "perplexity", "tokenize", "info", "models", "pull", "convert"):
        assert f"\n  {name} " in r.stdout
    assert "Examples" in r.stdout
    for name in ("generate", "chat", "perplexity", "ppl", "tokenize", "info", "models", "pull", "convert"):
        sub = ok([name, "--help"]).stdout
        assert "Examples" in sub and "Usage: llmsh" in sub, name
    assert "--parse-special" in ok(["tokenize", "-h"]).stdout


def test_version():
    from llmsh import __version__

    assert ok(["--version"]).stdout == f"llmsh {__version__}\n"


@pytest.mark.parametrize("code", [
    "import llmsh.cli",
    "from llmsh.cli import cli; cli.main(['--help'], standalone_mode=False)",
    "from llmsh.cli import cli; cli.main(['generate', '--help'], standalone_mode=False)",
    "from llmsh.cli import cli; cli.main(['perplexity', '--help'], standalone_mode=False)",
])
def test_help_does_not_import_torch(code):
    check = f"import sys\n{code}\nassert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --- generate ---------------------------------------------------------------------------------------


def test_generate_raw_matches_transformers_greedy(chat_model, hf_chat, llmsh_home):
    prompt = "The quick brown fox"
    r = ok(["generate", "-m", str(chat_model), "--raw", "-n", "6", "--json", prompt])
    out = json.loads(r.stdout)
    ids = hf_tokenizer(chat_model)(prompt).input_ids
    want = hf_greedy(hf_chat, ids, 6)
    assert out["tokens"] == want
    assert out["prompt_tokens"] == len(ids)
    assert out["completion_tokens"] == len(want)
    assert out["finish_reason"] == ("length" if len(want) == 6 else "stop")
    assert out["text"] == hf_tokenizer(chat_model).decode(want, skip_special_tokens=True)
    assert set(out["timings"]) >= {"ttft_s", "prefill_s", "decode_s", "total_s"}
    assert r.stdout.count("\n") == 1 and r.stdout.endswith("}\n")
    # The streamed text is the same text, ending with a newline.
    plain = ok(["generate", "-m", str(chat_model), "--raw", "-n", "6", prompt]).stdout
    assert plain == out["text"] + ("" if out["text"].endswith("\n") else "\n")


def test_generate_chat_uses_the_template(chat_model, hf_chat, llmsh_home):
    tok = hf_tokenizer(chat_model)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(ids, add_special_tokens=False).input_ids
    r = ok(["generate", "-m", str(chat_model), "-n", "5", "--json", "--system", "Be brief.",
            "Name", "three", "colors."])
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] == len(ids)
    assert out["tokens"] == hf_greedy(hf_chat, ids, 5)
    raw = json.loads(ok(["generate", "-m", str(chat_model), "--raw", "-n", "1", "--json",
                         "Name three colors."]).stdout)
    assert raw["prompt_tokens"] == len(tok("Name three colors.").input_ids)


@pytest.mark.parametrize("stdin,args,prompt", [
    ("The quick brown\n", [], "The quick brown"),
    ("notes: the fox\n\n", ["Summarize", "the", "notes."], "notes: the fox\n\nSummarize the notes."),
    ("", ["Hello", "world"], "Hello world"),
])
def test_generate_prompt_from_stdin_and_arguments(chat_model, hf_chat, llmsh_home, stdin, args, prompt):
    out = json.loads(ok(["generate", "-m", str(chat_model), "--raw", "-n", "3", "--json", *args],
                        input=stdin).stdout)
    ids = hf_tokenizer(chat_model)(prompt).input_ids
    assert out["prompt_tokens"] == len(ids)
    assert out["tokens"] == hf_greedy(hf_chat, ids, 3)


def test_generate_stop_strings_and_stats(chat_model, llmsh_home):
    base = ["generate", "-m", str(chat_model), "--raw", "-n", "12", "--json", "Hello, how"]
    full = json.loads(ok(base).stdout)["text"]
    assert len(full) > 3
    stop = full[2:4]
    cut = full[: full.index(stop)]
    out = json.loads(ok(base + ["--stop", "\x00never", "--stop", stop]).stdout)
    assert out["text"] == cut and out["finish_reason"] == "stop"
    r = ok(["generate", "-m", str(chat_model), "--raw", "-n", "4", "--stats", "Hello"])
    assert "tokens/s" in r.stderr and "tokens/s" not in r.stdout
    # context: what the cache holds (prompt + generated - the last, never fed back) / the context
    # size (the model's 256 here, not prompt + -n).
    n_prompt = len(hf_tokenizer(chat_model)("Hello").input_ids)
    assert f"context {n_prompt + 4 - 1}/256," in r.stderr and "finish: length" in r.stderr


def test_generate_sampling_options(chat_model, llmsh_home):
    base = ["generate", "-m", str(chat_model), "--raw", "-n", "8", "--json", "Hello"]
    greedy = json.loads(ok(base).stdout)["tokens"]
    assert json.loads(ok(base + ["--temperature", "0"]).stdout)["tokens"] == greedy
    # top_p 0 keeps only the most likely token: greedy whatever the temperature and seed.
    assert json.loads(ok(base + ["--temperature", "1.5", "--top-p", "0", "--seed", "3"]).stdout)["tokens"] == greedy
    a = json.loads(ok(base + ["--temperature", "2", "--seed", "7"]).stdout)["tokens"]
    b = json.loads(ok(base + ["--temperature", "2", "--seed", "7"]).stdout)["tokens"]
    assert a == b


@pytest.mark.parametrize("opts,allowed", RANGE_CASES)
def test_out_of_range_options_are_rejected_at_parsing(opts, allowed, llmsh_home):
    r = run(["generate", "-m", "/nonexistent", *opts, "hi"])
    line = one_line_error(r, allowed, code=2)
    assert opts[0] in line and "--help" in line
    assert r.stdout == ""


def test_generate_bad_input(chat_model, tmp_path, llmsh_home):
    one_line_error(run(["generate", "-m", str(chat_model)], input=""), "empty prompt")
    one_line_error(run(["generate", "-m", str(chat_model)], input="  \n"), "empty prompt")
    one_line_error(run(["generate", "-m", str(tmp_path / "missing"), "hi"]), "missing")
    one_line_error(run(["generate", "-m", "no-such-model-name", "hi"]), "no-such-model-name")
    broken = tmp_path / "broken"
    shutil.copytree(chat_model, broken)
    (broken / "config.json").write_text("{ not json")
    one_line_error(run(["generate", "-m", str(broken), "hi"]), "config.json")
    one_line_error(run(["generate", "-m", str(chat_model), "--raw", "word " * 300]), "context")
    one_line_error(run(["generate", "-m", str(chat_model)], input=b"caf\xe9\n"), "UTF-8")
    r = run(["generate", "-m", str(chat_model), "--raw", "--system", "x", "hi"])
    assert r.exit_code == 2 and "--system" in r.stderr


def test_model_from_environment_and_no_template(bos_model, llmsh_home):
    r = ok(["generate", "-n", "2", "--json", "hi"], env={"LLMSH_MODEL": str(bos_model)})
    assert json.loads(r.stdout)["prompt_tokens"] == len(hf_tokenizer(bos_model)("hi").input_ids)
    assert r.stderr == ""  # no template: --raw by default, quietly
    # --chat: refused, never ChatML the model never saw (tests/test_chat_template.py)
    r = run(["generate", "--chat", "-n", "2", "hi"], env={"LLMSH_MODEL": str(bos_model)})
    one_line_error(r, "has no chat template", "--chat-template FILE", code=2)


def test_no_command_with_piped_stdin_generates(chat_model, llmsh_home):
    # without a command, chat's sampling defaults (issue 9 item 6): greedy and no penalty here
    a = ok(["-m", str(chat_model), "-n", "3", "-t", "0", "--repetition-penalty", "1"], input="Hello\n").stdout
    b = ok(["generate", "-m", str(chat_model), "-n", "3", "Hello"]).stdout
    assert a == b and a.endswith("\n")


def test_chat_with_piped_stdin(chat_model, llmsh_home):
    r = ok(["chat", "-m", str(chat_model), "-n", "8", "-t", "0", "--no-history"], input="Hello\n")
    assert r.stdout.endswith("\n") and "\x1b" not in r.stdout
    one_line_error(run(["chat", "-m", str(chat_model)], input=""), "empty")


# --- tokenize ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["chat", "bos"])
def test_tokenize_matches_transformers(which, chat_model, bos_model, llmsh_home):
    path = {"chat": chat_model, "bos": bos_model}[which]
    tok = hf_tokenizer(path)
    text = "Hello wörld 🙂 <|im_end|>"
    want = tok(text).input_ids  # transformers does not parse special text inside... check below
    r = ok(["tokenize", "-m", str(path), text])
    ids = [int(x) for x in r.stdout.split()]
    assert IM_END not in ids  # special-token text is ordinary text by default
    assert ids == tok(text, split_special_tokens=True).input_ids
    parsed = [int(x) for x in ok(["tokenize", "-m", str(path), "--parse-special", text]).stdout.split()]
    assert parsed == want and IM_END in parsed
    nobos = [int(x) for x in ok(["tokenize", "-m", str(path), "--no-bos", text]).stdout.split()]
    assert nobos == tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert (len(ids) - len(nobos)) == (1 if which == "bos" else 0)


def test_tokenize_stdin_exactly_as_given(chat_model, llmsh_home):
    tok = hf_tokenizer(chat_model)
    for text in ["two lines\nhere\n", "\n\n", " spaced  "]:
        ids = [int(x) for x in ok(["tokenize", "-m", str(chat_model)], input=text).stdout.split()]
        assert ids == tok(text).input_ids, text
    assert ok(["tokenize", "-m", str(chat_model), "--count"], input="a\n").stdout == \
        f"{len(tok('a' + chr(10)).input_ids)}\n"


def test_tokenize_json_pieces_decode(chat_model, llmsh_home):
    tok = hf_tokenizer(chat_model)
    text = "Hello world"
    data = json.loads(ok(["tokenize", "-m", str(chat_model), "--json", text]).stdout)
    assert set(data) == {"ids", "pieces", "count"}
    assert data["ids"] == tok(text).input_ids and data["count"] == len(data["ids"])
    assert "".join(data["pieces"]) == text
    lines = ok(["tokenize", "-m", str(chat_model), "--pieces", text]).stdout.splitlines()
    assert [int(ln.split("\t")[0]) for ln in lines] == data["ids"]
    assert [json.loads(ln.split("\t")[1]) for ln in lines] == data["pieces"]
    ids = ok(["tokenize", "-m", str(chat_model), text]).stdout
    assert ok(["tokenize", "-m", str(chat_model), "--decode"], input=ids).stdout == text
    assert ok(["tokenize", "-m", str(chat_model), "--decode", ",".join(ids.split())]).stdout == text
    one_line_error(run(["tokenize", "-m", str(chat_model), "--decode", "1 x 2"]), "'x'")
    one_line_error(run(["tokenize", "-m", str(chat_model), "--decode", "99999"]), "99999")


def test_tokenize_invalid_utf8(chat_model, llmsh_home):
    one_line_error(run(["tokenize", "-m", str(chat_model)], input=b"ok \xff\xfe"), "UTF-8", "--errors replace")
    r = ok(["tokenize", "-m", str(chat_model), "--errors", "replace", "--json"], input=b"ok \xff")
    assert "".join(json.loads(r.stdout)["pieces"]) == "ok \ufffd"


# --- perplexity -------------------------------------------------------------------------------------


def hf_llamacpp_ppl(model, ids, n_ctx, bos_id):
    """llama-perplexity's protocol, written directly against transformers."""
    nlls = []
    for c in range(len(ids) // n_ctx):
        window = list(ids[c * n_ctx:(c + 1) * n_ctx])
        if bos_id is not None:
            window[0] = bos_id
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0].double(), -1)
        for i in range(n_ctx // 2, n_ctx - 1):
            nlls.append(-float(logp[i, ids[c * n_ctx + i + 1]]))
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


def test_perplexity_matches_transformers(bos_model, hf_bos, tmp_path, llmsh_home):
    f = tmp_path / "long.txt"
    f.write_text(LONG_TEXT + "\n", encoding="utf-8")
    ids = hf_tokenizer(bos_model)(LONG_TEXT).input_ids  # one trailing newline removed
    want, n = hf_llamacpp_ppl(hf_bos, ids, 32, bos_id=0)
    r = ok(["perplexity", "-m", str(bos_model), "--n-ctx", "32", "--json", str(f)])
    out = json.loads(r.stdout)
    assert set(out) >= {"source", "perplexity", "stderr", "nll", "bits_per_byte", "n_tokens", "n_ctx", "protocol"}
    assert out["n_tokens"] == n and out["n_ctx"] == 32 and out["protocol"] == "llamacpp"
    assert abs(out["perplexity"] / want - 1) < 1e-4
    assert abs(out["nll"] - math.log(want)) < 1e-4
    text = ok(["ppl", "-m", str(bos_model), "--n-ctx", "32", str(f)]).stdout
    assert text.startswith(f"{f}: PPL {out['perplexity']:.4f} ± ")
    # stdin and "-" give the same numbers as the file.
    same = json.loads(ok(["perplexity", "-m", str(bos_model), "-c", "32", "--json", "-"],
                         input=LONG_TEXT + "\n").stdout)
    assert same["perplexity"] == out["perplexity"] and same["source"] == "<stdin>"


def test_perplexity_several_files_protocols_and_per_token(chat_model, tmp_path, llmsh_home):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(LONG_TEXT)
    b.write_text(LONG_TEXT[::-1])
    per = tmp_path / "tokens.jsonl"
    r = ok(["ppl", "-m", str(chat_model), "-c", "32", "--json", "--per-token", str(per), str(a), str(b)])
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [x["source"] for x in rows[:2]] == [str(a), str(b)] and rows[2]["total"] is True
    assert rows[2]["n_tokens"] == rows[0]["n_tokens"] + rows[1]["n_tokens"]
    toks = [json.loads(ln) for ln in per.read_text().splitlines()]
    assert len(toks) == rows[2]["n_tokens"] and set(toks[0]) >= {"id", "text", "logprob"}
    mean = -sum(t["logprob"] for t in toks if t["source"] == str(a)) / rows[0]["n_tokens"]
    assert abs(mean - rows[0]["nll"]) < 1e-6
    text = ok(["ppl", "-m", str(chat_model), "-c", "32", str(a), str(b)]).stdout.splitlines()
    assert len(text) == 3 and text[2].startswith("total: PPL ")
    allt = json.loads(ok(["ppl", "-m", str(chat_model), "-c", "32", "--json", "--all-tokens", str(a)]).stdout)
    assert allt["protocol"] == "llamacpp-all" and allt["n_tokens"] > rows[0]["n_tokens"]
    sl = json.loads(ok(["ppl", "-m", str(chat_model), "-c", "32", "--stride", "16", "--json", str(a)]).stdout)
    n_ids = len(hf_tokenizer(chat_model)(LONG_TEXT).input_ids)
    assert sl["protocol"] == "sliding" and sl["n_tokens"] == n_ids - 1


def test_perplexity_each_line(chat_model, llmsh_home):
    lines = ["Hello, how are you today?", "The quick brown fox.", "", "Tell me a story."]
    r = ok(["ppl", "-m", str(chat_model), "--each-line", "--json"], input="\n".join(lines) + "\n")
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [x["source"] for x in rows] == [f"<stdin>:{i}" for i in range(1, 5)]
    tok = hf_tokenizer(chat_model)
    assert [x["n_tokens"] for x in rows] == [max(len(tok(t).input_ids) - 1, 0) for t in lines]
    assert rows[2]["perplexity"] is None  # nothing to score: null, not NaN (valid JSON)


def test_perplexity_bad_input(chat_model, tmp_path, llmsh_home):
    short = tmp_path / "short.txt"
    short.write_text("Hello world")
    line = one_line_error(run(["ppl", "-m", str(chat_model), str(short)]), "short.txt", "needs at least")
    assert "256" in line  # the model's context (256) caps the default n_ctx; 2 windows are needed
    one_line_error(run(["ppl", "-m", str(chat_model), "-c", "1024", str(short)]), "1024")
    one_line_error(run(["ppl", "-m", str(chat_model), str(tmp_path / "nope.txt")]), "nope.txt")
    r = run(["ppl", "-m", str(chat_model), "-c", "32", "--stride", "64", str(short)])
    assert r.exit_code == 2 and "--stride" in r.stderr
    r = run(["ppl", "-m", str(chat_model), "--stride", "8", "--all-tokens", str(short)])
    assert r.exit_code == 2


# --- info, models, pull, convert --------------------------------------------------------------------


def test_info(chat_model, hf_chat, llmsh_home):
    data = json.loads(ok(["info", "-m", str(chat_model), "--json"]).stdout)
    assert data["parameters"] == hf_chat.num_parameters()
    assert data["architecture"] == "qwen2" and data["vocab_size"] == hf_chat.config.vocab_size
    assert data["context_length"] == 256 and data["chat_template"] is True
    assert data["eos_tokens"] == [{"id": IM_END, "text": "<|im_end|>"}]
    text = ok(["info", "-m", str(chat_model)]).stdout
    assert "qwen2" in text and f"{hf_chat.num_parameters():,}" in text


def test_models_and_pull(chat_model, llmsh_home):
    from llmsh.hub import DEFAULT_MODEL

    rows = [json.loads(ln) for ln in ok(["models", "--json"]).stdout.splitlines()]
    assert any(r["name"] == DEFAULT_MODEL and not r["downloaded"] for r in rows)
    shutil.copytree(chat_model, llmsh_home / "models" / "tiny")
    size = sum(p.stat().st_size for p in (llmsh_home / "models" / "tiny").iterdir())
    rows = [json.loads(ln) for ln in ok(["models", "--json"]).stdout.splitlines()]
    assert {"name": "tiny", "size_bytes": size, "downloaded": True}.items() <= next(
        r for r in rows if r["name"] == "tiny").items()
    assert "tiny" in ok(["models"]).stdout
    assert json.loads(ok(["tokenize", "-m", "tiny", "--json", "hi"]).stdout)["count"] > 0
    one_line_error(run(["pull", "no-such-model"]), "no-such-model")


def test_convert_errors(tmp_path, llmsh_home):
    r = run(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out")])
    assert r.exit_code == 2 and "missing.gguf" in r.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    one_line_error(run(["convert", str(bad), str(tmp_path / "out")]), "bad.gguf")
    assert not (tmp_path / "out").exists()
