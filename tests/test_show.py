"""``llmsh ppl --show``: each token's surprisal against transformers' logits, the plain, colour
and JSON renderings, and the options it refuses."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from click.testing import CliRunner

from cli_fixtures import LONG_TEXT, bos_model, chat_model, hf_tokenizer, llmsh_home  # noqa: F401
from llmsh.cli import cli
from llmsh.cli.show import annotated, display_units, style_of

TEXT = "The quick brown fox jumps over the lazy dog.\nCafé, naïve — 日本語 🙂 and ünïcödé."
ANNOTATION = re.compile(r"\[\d+\.\d\]")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(args, input=None, env=None):
    r = CliRunner().invoke(cli, args, input=input, env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def ok(args, input=None, env=None):
    r = run(args, input, env)
    assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
    return r.stdout


def one_line_error(r, *fragments, code=1):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmsh: error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def hf_bits(path, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    return [None] + [-float(lp[i - 1, ids[i]]) / math.log(2) for i in range(1, len(ids))]


@pytest.mark.parametrize("fixture", ["chat_model", "bos_model"])
def test_json_bits_match_transformers_and_rebuild_the_text(fixture, request, tmp_path, llmsh_home):
    path = request.getfixturevalue(fixture)
    f = tmp_path / "t.txt"
    f.write_text(TEXT + "\n", encoding="utf-8")
    ids = hf_tokenizer(path)(TEXT).input_ids
    want = hf_bits(path, ids)           # one window: n_ctx 128 holds the whole text
    rows = [json.loads(ln) for ln in ok(["ppl", "--show", "--json", "-m", str(path), "-c", "128", str(f)]).splitlines()]
    tokens, summary = rows[:-1], rows[-1]
    assert [t["id"] for t in tokens] == ids and [t["position"] for t in tokens] == list(range(len(ids)))
    assert "".join(t["text"] for t in tokens) == TEXT      # BOS (bos_model) shows as ""
    assert tokens[0]["bits"] is None and tokens[0]["logprob"] is None
    for t, w in zip(tokens[1:], want[1:]):
        assert t["bits"] == pytest.approx(w, abs=1e-4)
        assert t["logprob"] == pytest.approx(-w * math.log(2), abs=1e-4)
    assert summary["source"] == str(f) and summary["n_tokens"] == len(ids) - 1
    assert summary["nll"] == pytest.approx(sum(want[1:]) * math.log(2) / (len(ids) - 1), abs=1e-5)


def test_plain_output_is_the_text_with_annotations(chat_model, tmp_path, llmsh_home):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    ids = hf_tokenizer(chat_model)(TEXT).input_ids
    want = hf_bits(chat_model, ids)
    out = ok(["ppl", "--show", "-m", str(chat_model), "-c", "128", str(f)])
    assert "\x1b[" not in out                      # not a terminal: plain
    body, summary = out.rsplit("\n\n", 1)
    assert ANNOTATION.sub("", body) == TEXT
    assert summary.startswith(f"{f}: PPL ") and "sliding, stride 64, n_ctx 128" in summary
    # Characters split over tokens carry their tokens' sum, so there are fewer annotations than
    # scored tokens; their total is the text's.
    shown = [float(x[1:-1]) for x in ANNOTATION.findall(body)]
    assert len(shown) < len(ids) - 1
    assert sum(shown) == pytest.approx(sum(want[1:]), abs=0.05 * len(shown))
    assert body.count("\n") == TEXT.count("\n")
    first = hf_tokenizer(chat_model).decode(ids[:1])
    assert body.startswith(first) and body[len(first)] != "["      # the first token is not scored


def test_colour_always_and_never(chat_model, tmp_path, llmsh_home):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    m = ["ppl", "--show", "-m", str(chat_model), "-c", "128", str(f)]
    out = ok(m + ["--color", "always"])
    assert "\x1b[" in out and "surprisal (bits)" in out
    plain = ANSI.sub("", out)
    assert plain.startswith(TEXT + "\n") and ANNOTATION.search(plain) is None
    assert plain.rstrip().splitlines()[-1].startswith(f"{f}: PPL ")
    assert ok(m + ["--color", "never"]) == ok(m)


def test_sliding_windows_score_every_token_as_ppl_does(chat_model, tmp_path, llmsh_home):
    f = tmp_path / "long.txt"
    f.write_text(LONG_TEXT, encoding="utf-8")
    rows = [json.loads(ln) for ln in ok(["ppl", "--show", "--json", "-m", str(chat_model), "-c", "32",
                                         str(f)]).splitlines()]
    per = [json.loads(ln) for ln in ok(["ppl", "-m", str(chat_model), "-c", "32", "--stride", "16",
                                        "--per-token", "-", "--json", str(f)]).splitlines()[:-1]]
    assert [t["logprob"] for t in rows[1:-1]] == pytest.approx([p["logprob"] for p in per], abs=1e-6)
    assert rows[-1]["protocol"] == "sliding" and rows[-1]["stride"] == 16
    allt = json.loads(ok(["ppl", "--show", "--json", "--all-tokens", "-m", str(chat_model), "-c", "32",
                          str(f)]).splitlines()[-1])
    assert allt["protocol"] == "llamacpp-all"


def test_units_and_annotations():
    # Two tokens of one character ("" then the completing piece): one unit, bits summed.
    units = display_units(["", "A", "", "é", "\n", "b"], [None, 1.0, 0.5, 0.25, 2.0, None])
    ln2 = math.log(2)
    assert [u[0] for u in units] == ["A", "é", "\n", "b"]
    assert units[0][1] == pytest.approx(1 / ln2) and units[1][1] == pytest.approx(0.75 / ln2)
    assert units[3][1] is None
    assert annotated([("a", None), (" b\n", 1.04), ("\n", 3.0), ("c", 16.0)]) == "a b[1.0]\n[3.0]\nc[16.0]"
    assert style_of(None) == "" and style_of(0.5) == "blue" and style_of(16) == "bold magenta"


def test_refused_combinations(chat_model, tmp_path, llmsh_home):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    m = ["ppl", "-m", str(chat_model), str(f)]
    for extra, word in ((["--each-line"], "--each-line"), (["--per-token", "-"], "--per-token"),
                        (["--kl-base", str(tmp_path / "k")], "--kl-base"), (["--kl-top-k", "3"], "--kl-top-k")):
        one_line_error(run(m + ["--show"] + extra), "--show does not take " + word, code=2)
    one_line_error(run(m + ["--color", "always"]), "--color goes with --show", code=2)
    one_line_error(run(m + ["--show", "--stride", "8", "--all-tokens"]), code=2)
    one_line_error(run(["ppl", "--show", "-m", str(chat_model)], input="a"), "<stdin>", "at least 2")
    one_line_error(run(["ppl", "--show", "-m", str(chat_model), str(tmp_path / "nope")]), "nope")


def test_a_carriage_return_is_not_printed():
    """A CRLF file's \\r would return the terminal's cursor and overwrite the line's start."""
    from llmsh.cli.show import annotated, display_units

    units = display_units(["Hello", " world", ".", "\r", "\n", "Next"], [None, 1.0, 1.0, 2.0, 0.5, 1.0])
    text = annotated(units)
    assert "\r" not in text and text.startswith("Hello world[1.4].[1.4][2.9][0.7]\nNext")
