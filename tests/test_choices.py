"""``llmsh score --choices`` / ``--hellaswag``: rankings against a hand computation with
transformers' logits and its tokenizer (lm-evaluation-harness's boundary), and the input errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from cli_fixtures import bos_model, chat_model, hf_tokenizer, llmsh_home  # noqa: F401
from llmsh.choice_tasks import wilson
from llmsh.cli import cli

ITEMS = [
    {"context": "The quick brown fox", "choices": ["jumps over the lazy dog.", "naïve café", "is"], "label": 0},
    {"context": "Hello, how are you ", "choices": ["today?", "thank you very much, I am fine.", "🙂"], "label": 2},
    {"context": "", "choices": ["Tell me a story.", "def main():"]},
    {"context": "Name three colors.", "choices": ["sea", "a small robot that learns to paint pictures", "Café"],
     "label": 1, "id": "x7"},
]


def run(args, input=None):
    r = CliRunner().invoke(cli, args, input=input)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def ok(args, input=None):
    r = run(args, input)
    assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
    return [json.loads(ln) for ln in r.stdout.splitlines()]


def one_line_error(r, *fragments, code=1):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmsh: error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def hand_scores(path, item, delimiter=" "):
    """Each choice's (logprob, n_tokens) by transformers, tokenized as lm-eval's _encode_pair."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = hf_tokenizer(path)
    context = item["context"]
    n_sp = len(context) - len(context.rstrip())
    ctx, moved = context[: len(context) - n_sp], context[len(context) - n_sp:]
    ctx_ids = tok(ctx).input_ids or [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    out = []
    for c in item["choices"]:
        whole = tok(ctx + moved + delimiter + c).input_ids
        cont = whole[len(tok(ctx).input_ids):]
        ids = ctx_ids + cont
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        total = sum(float(lp[len(ctx_ids) - 1 + j, t]) for j, t in enumerate(cont))
        out.append((total, len(cont)))
    return out


def argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


@pytest.mark.parametrize("fixture", ["chat_model", "bos_model"])
def test_rankings_match_a_hand_computation(fixture, request, llmsh_home):
    path = request.getfixturevalue(fixture)
    text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in ITEMS)
    rows = ok(["score", "-m", str(path), "--choices"], input=text)
    assert len(rows) == len(ITEMS) + 1
    norm_differs = False
    hits = {"acc": 0, "acc_norm": 0, "acc_per_token": 0}
    for item, row in zip(ITEMS, rows):
        want = hand_scores(path, item)
        got = row["choices"]
        assert [c["text"] for c in got] == item["choices"]
        for (lp, n), c, text_ in zip(want, got, item["choices"]):
            assert c["logprob"] == pytest.approx(lp, abs=1e-4) and c["n_tokens"] == n
            assert c["n_bytes"] == len(text_.encode())
            assert c["logprob_per_byte"] == pytest.approx(lp / len(text_.encode()), abs=1e-4)
            assert c["logprob_per_token"] == pytest.approx(lp / n, abs=1e-4)
        pred = argmax([lp for lp, _ in want])
        pred_norm = argmax([lp / len(t.encode()) for (lp, _), t in zip(want, item["choices"])])
        pred_tok = argmax([lp / n for lp, n in want])
        assert (row["pred"], row["pred_norm"], row["pred_per_token"]) == (pred, pred_norm, pred_tok)
        norm_differs |= pred != pred_norm
        assert row["label"] == item.get("label")
        if "label" in item:
            assert row["acc"] == int(pred == item["label"]) and row["acc_norm"] == int(pred_norm == item["label"])
            hits["acc"] += pred == item["label"]
            hits["acc_norm"] += pred_norm == item["label"]
            hits["acc_per_token"] += pred_tok == item["label"]
        else:
            assert "acc" not in row
    assert [r["line"] for r in rows[:-1]] == [1, 2, 3, 4] and rows[3]["id"] == "x7"
    assert norm_differs, "the items should tell the total from the per-byte ranking apart"
    total = rows[-1]
    assert total["total"] is True and total["n_items"] == 4 and total["n_labelled"] == 3
    for k, h in hits.items():
        assert total[k] == pytest.approx(h / 3)
        assert total[f"{k}_stderr"] == pytest.approx(math.sqrt((h / 3) * (1 - h / 3) / 2))


def test_hellaswag_format_is_the_same_as_jsonl(chat_model, tmp_path, llmsh_home):
    tasks = [("A man is sitting on a roof. he", 3, ["is using wrap.", "is ripping tiles off.",
                                                     "is holding a cube.", "starts pulling up roofing."]),
             ("The quick brown fox", 0, ["jumps.", "sleeps.", "is red.", "runs away from the dog."])]
    hs = tmp_path / "hs.txt"
    hs.write_text("".join(f"{c}\n{label}\n" + "".join(e + "\n" for e in ends) for c, label, ends in tasks))
    a = ok(["score", "-m", str(chat_model), "--hellaswag", str(hs)])
    jl = "".join(json.dumps({"context": c, "choices": e, "label": label}) + "\n" for c, label, e in tasks)
    b = ok(["score", "-m", str(chat_model), "--choices", "-", "--batch-size", "1"], input=jl)
    assert [r.get("line") for r in a[:-1]] == [1, 7] and [r["line"] for r in b[:-1]] == [1, 2]
    for x, y in zip(a[:-1], b[:-1]):     # one batch of 4 against one choice at a time
        assert [c["logprob"] for c in x["choices"]] == pytest.approx([c["logprob"] for c in y["choices"]], abs=1e-4)
        assert [x[k] for k in ("pred", "pred_norm", "label")] == [y[k] for k in ("pred", "pred_norm", "label")]
    assert a[-1] == b[-1]
    limited = ok(["score", "-m", str(chat_model), "--hellaswag", str(hs), "--limit", "1"])
    assert len(limited) == 2 and limited[-1]["n_items"] == 1


def test_delimiter_and_a_boundary_inside_a_word(chat_model, llmsh_home):
    # Cut inside a word, the choice's tokens are the whole text's after the context's count
    # (lm-eval), not the choice encoded alone ("wn" + " fox" ...).
    tok = hf_tokenizer(chat_model)
    for item in ({"context": "Hello, how are", "choices": [" you today?", " you"]},
                 {"context": "The quick bro", "choices": ["wn fox jumps over", "ther"]}):
        want = hand_scores(chat_model, item, delimiter="")
        row = ok(["score", "-m", str(chat_model), "--choices", "--delimiter", ""], input=json.dumps(item))[0]
        assert [c["logprob"] for c in row["choices"]] == pytest.approx([lp for lp, _ in want], abs=1e-4)
        assert [c["n_tokens"] for c in row["choices"]] == [n for _, n in want]
    assert want[0][1] != len(tok("wn fox jumps over").input_ids)


@pytest.mark.parametrize("text, fragments", [
    ('{"context": "a", "choices": ["b"]}\n{"context": "a", "choices": ["b"]\n', ["<stdin>:2:", "not valid JSON"]),
    ('\n\n{"context": "a", "choices": ["b", "c"], "label": 2}\n', ["<stdin>:3:", "label 2 is out of range"]),
    ('{"context": "a", "choices": ["b"], "label": true}\n', ["<stdin>:1:", "label"]),
    ('{"context": "a", "choices": []}\n', ["<stdin>:1:", "non-empty list"]),
    ('{"context": "a", "choices": ["b", ""]}\n', ["<stdin>:1:", "choice 1 is empty"]),
    ('{"context": "a", "choices": ["b", 3]}\n', ["choice 1 is not a string"]),
    ('{"context": 1, "choices": ["b"]}\n', ['"context" must be a string']),
    ('{"context": "a", "choices": ["b"], "labels": 0}\n', ["unknown key 'labels'"]),
    ('[1, 2]\n', ["expected a JSON object"]),
    ('\n', ["no items"]),
])
def test_bad_jsonl_is_one_line_naming_the_line(chat_model, llmsh_home, text, fragments):
    one_line_error(run(["score", "-m", str(chat_model), "--choices"], input=text), *fragments)


def test_other_errors(chat_model, tmp_path, llmsh_home):
    m = ["score", "-m", str(chat_model)]
    one_line_error(run(m + ["--hellaswag"], input="ctx\n1\na\nb\n"), "4 lines, not a multiple of 6")
    one_line_error(run(m + ["--hellaswag"], input="ctx\nx\na\nb\nc\nd\n"), "<stdin>:2:", "label must be 0..3")
    one_line_error(run(m + ["--hellaswag"], input="ctx\n4\na\nb\nc\nd\n"), "<stdin>:2:", "out of range")
    long = json.dumps({"context": "The quick brown fox jumps over the lazy dog. " * 40, "choices": ["a", "b"]})
    one_line_error(run(m + ["--choices"], input='{"context": "a", "choices": ["b"]}\n' + long), "<stdin>:2:",
                   "more than the model's context")
    one_line_error(run(m + ["--choices", str(tmp_path / "nope.jsonl")]), "nope.jsonl")
    one_line_error(run(m), "give one of --choices", code=2)
    one_line_error(run(m + ["--choices", "--hellaswag"], input="x"), "give one of", code=2)


def test_wilson_interval():
    # Textbook Wilson bounds (p + z²/2n ∓ z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.96.
    lo, hi = wilson(30, 100)
    assert lo == pytest.approx(0.2189, abs=1e-4) and hi == pytest.approx(0.3958, abs=1e-4)
    assert wilson(0, 1)[0] == 0.0
