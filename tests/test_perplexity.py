"""Perplexity protocols against transformers computations of the same protocol, on tiny models
and on a decoder with uniform logits (perplexity == vocabulary size)."""

import math

import pytest
import torch
from torch import nn

from llmsh.errors import InputError
from llmsh.perplexity import PerplexityResult, combine, perplexity_lines, perplexity_llamacpp, perplexity_sliding
from cli_fixtures import bos_model, llmsh_home  # noqa: F401  (fixtures)
from tiny_models import make_tiny_model, our_decoder, random_tokens


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    path, hf = make_tiny_model(request.param, tmp_path_factory.mktemp("ppl"))
    return hf, our_decoder(hf, path)


def stats_of(nll: torch.Tensor):
    """(ppl, stderr, mean nll) from per-token NLLs, with llama-perplexity's formulas."""
    nll = nll.double()
    n = nll.numel()
    mean = nll.mean().item()
    ppl = math.exp(mean)
    var = (nll * nll).mean().item() - mean * mean
    return ppl, (ppl * math.sqrt(var / (n - 1)) if n > 1 else math.nan), mean


def rel(a, b):
    return abs(a - b) / abs(b)


def hf_nll(hf, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-label NLL (float64) of a (T,) window, labels -100 where not scored (HF label shift)."""
    with torch.no_grad():
        logits = hf(ids[None]).logits[0].double()
    lab = labels[1:]
    nll = torch.nn.functional.cross_entropy(logits[:-1], lab, ignore_index=-100, reduction="none")
    return nll[lab != -100]


@pytest.mark.parametrize("all_tokens", [False, True])
def test_llamacpp_protocol_equals_transformers(model, all_tokens):
    hf, dec = model
    n_ctx, bos = 32, 1
    ids = random_tokens(hf.config.vocab_size, 3 * n_ctx + 20, seed=2)[0]   # 3 windows, tail dropped
    ref = []
    for w in range(3):
        x = ids[w * n_ctx:(w + 1) * n_ctx].clone()
        x[0] = bos
        labels = x.clone()
        labels[: 1 if all_tokens else n_ctx // 2 + 1] = -100
        ref.append(hf_nll(hf, x, labels))
    ref = torch.cat(ref)
    ppl, err, mean = stats_of(ref)
    r = perplexity_llamacpp(dec, ids.tolist(), n_ctx, bos_id=bos, all_tokens=all_tokens, batch_size=2,
                            per_token=True)
    assert r.n_tokens == ref.numel() == 3 * (n_ctx - 1 if all_tokens else n_ctx - 1 - n_ctx // 2)
    assert rel(r.perplexity, ppl) < 1e-4 and rel(r.stderr, err) < 1e-4 and rel(r.nll, mean) < 1e-4
    assert r.protocol == ("llamacpp-all" if all_tokens else "llamacpp") and r.n_ctx == n_ctx
    torch.testing.assert_close(torch.tensor(r.token_nll, dtype=torch.float64), ref, rtol=1e-4, atol=1e-5)
    assert r.token_ids == [int(ids[p]) for p in r.token_positions]
    # Batching windows does not change the numbers.
    one = perplexity_llamacpp(dec, ids, n_ctx, bos_id=bos, all_tokens=all_tokens, batch_size=1)
    assert rel(one.perplexity, r.perplexity) < 1e-6


def test_llamacpp_without_bos_keeps_window_tokens(model):
    hf, dec = model
    n_ctx = 16
    ids = random_tokens(hf.config.vocab_size, 2 * n_ctx, seed=8)[0]
    ref = []
    for w in range(2):
        x = ids[w * n_ctx:(w + 1) * n_ctx]
        labels = x.clone()
        labels[: n_ctx // 2 + 1] = -100
        ref.append(hf_nll(hf, x, labels))
    ppl, _, _ = stats_of(torch.cat(ref))
    assert rel(perplexity_llamacpp(dec, ids, n_ctx).perplexity, ppl) < 1e-4


@pytest.mark.parametrize("stride", [7, 16, 32])
def test_sliding_protocol_equals_transformers(model, stride):
    # The loop of Hugging Face's "Perplexity of fixed-length models", counting exactly the scored labels.
    hf, dec = model
    n_ctx = 32
    ids = random_tokens(hf.config.vocab_size, 101, seed=6)[0]
    seq_len, prev_end, ref = ids.numel(), 0, []
    for begin in range(0, seq_len, stride):
        end = min(begin + n_ctx, seq_len)
        trg_len = end - prev_end
        x = ids[begin:end]
        labels = x.clone()
        labels[:-trg_len] = -100
        ref.append(hf_nll(hf, x, labels))
        prev_end = end
        if end == seq_len:
            break
    ref = torch.cat(ref)
    ppl, err, _ = stats_of(ref)
    r = perplexity_sliding(dec, ids.tolist(), n_ctx, stride, batch_size=3, per_token=True, n_bytes=400)
    assert r.n_tokens == ref.numel()
    assert rel(r.perplexity, ppl) < 1e-4 and rel(r.stderr, err) < 1e-4
    if stride < n_ctx:
        assert r.token_positions == list(range(1, seq_len))   # every token after the first, once
        assert math.isclose(r.bits_per_byte, r.nll_sum / (math.log(2) * 400))


def test_lines_each_scored_alone(model):
    hf, dec = model
    n_ctx = 24
    g = torch.Generator().manual_seed(4)
    lengths = [5, 1, 12, 2, 40, 9, 12, 3]
    texts = [torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    results = perplexity_lines(dec, texts, n_ctx, batch_size=3, n_bytes=[10 * n for n in lengths])
    assert len(results) == len(texts)
    for t, r in zip(texts, results):
        assert r.protocol == "line"
        if len(t) < 2:
            assert r.n_tokens == 0 and math.isnan(r.perplexity)
            continue
        assert r.n_tokens == len(t) - 1
        if len(t) <= n_ctx:
            labels = torch.tensor(t)
            labels[0] = -100
            ppl, _, _ = stats_of(hf_nll(hf, torch.tensor(t), labels))
        else:
            ppl = perplexity_sliding(dec, t, n_ctx, n_ctx // 2).perplexity
        assert rel(r.perplexity, ppl) < 1e-4


# --- a decoder whose logits are all zero --------------------------------------------------------

class Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.batches = []

    def forward(self, tokens, cache=None, last_only=False, logits_from=0):
        assert cache is None
        self.batches.append(tuple(tokens.shape))
        return torch.zeros(tokens.shape[0], 1 if last_only else tokens.shape[1] - logits_from, self.vocab)


def test_uniform_logits_give_vocab_size():
    dec = Uniform(37)
    ids = list(range(5)) * 220   # 1100 tokens: two windows of 512
    r = perplexity_llamacpp(dec, ids, 512, bos_id=0, batch_size=4)
    assert r.n_tokens == 2 * 255
    assert math.isclose(r.perplexity, 37, rel_tol=1e-6) and math.isclose(r.nll, math.log(37), rel_tol=1e-6)
    assert r.stderr == 0.0
    assert dec.batches == [(2, 512)]
    s = perplexity_sliding(dec, ids, 512, 256, n_bytes=2000)
    assert s.n_tokens == 1099 and math.isclose(s.perplexity, 37, rel_tol=1e-6)
    assert math.isclose(s.bits_per_byte, 1099 * math.log2(37) / 2000, rel_tol=1e-6)
    # llamacpp scores a sample; bits per byte extrapolates it to the whole text.
    r = perplexity_llamacpp(dec, ids, 512, n_bytes=2000)
    assert math.isclose(r.bits_per_byte, s.bits_per_byte, rel_tol=1e-6)


def test_too_short_inputs_raise_input_error_with_the_count_needed():
    dec = Uniform(10)
    with pytest.raises(InputError, match="1000 tokens .* needs at least 1024"):
        perplexity_llamacpp(dec, [1] * 1000, 512)
    with pytest.raises(InputError, match="at least 2"):
        perplexity_sliding(dec, [1], 512, 256)
    with pytest.raises(InputError, match="stride"):
        perplexity_sliding(dec, [1] * 10, 8, 9)
    with pytest.raises(InputError, match="stride"):
        perplexity_sliding(dec, [1] * 10, 8, 0)


def test_progress_and_combine():
    dec = Uniform(10)
    calls = []
    a = perplexity_llamacpp(dec, [1] * 100, 10, batch_size=4, progress=lambda d, t: calls.append((d, t)), n_bytes=50)
    assert calls == [(4, 10), (8, 10), (10, 10)]
    b = perplexity_sliding(dec, [2] * 30, 10, 5, n_bytes=20)
    total = combine([a, b])
    assert total.n_tokens == a.n_tokens + b.n_tokens and total.n_bytes == 70
    assert math.isclose(total.perplexity, 10, rel_tol=1e-6)
    d = total.to_dict()
    assert {"perplexity", "stderr", "nll", "bits_per_byte", "n_tokens", "n_ctx", "protocol"} <= set(d)
    assert "token_nll" not in d
    assert math.isnan(PerplexityResult(0.0, 0, 0.0, "line", 8).perplexity)


class _CtrlCAt:
    """Wraps a decoder: the ``at``-th forward pass raises KeyboardInterrupt (a Ctrl-C mid-run)."""

    def __init__(self, dec, at):
        self.dec, self.at, self.calls = dec, at, 0
        self.config = dec.config

    def parameters(self):
        return self.dec.parameters()

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.dec(*a, **kw)


@pytest.mark.parametrize("protocol", ["llamacpp", "sliding"])
def test_ctrl_c_keeps_the_batches_scored_so_far(model, protocol):
    from llmsh.perplexity import ScoringInterrupted

    hf, dec = model
    n_ctx = 16
    ids = random_tokens(hf.config.vocab_size, 6 * n_ctx, seed=4)[0].tolist()
    run = {"llamacpp": lambda d, x: perplexity_llamacpp(d, x, n_ctx, bos_id=1, batch_size=2, per_token=True),
           "sliding": lambda d, x: perplexity_sliding(d, x, n_ctx, n_ctx // 2, batch_size=2, per_token=True)}[protocol]
    full = run(dec, ids)
    with pytest.raises(ScoringInterrupted) as e:
        run(_CtrlCAt(dec, 3), ids)          # two batches done, the third interrupted
    part, planned = e.value.partial, e.value.planned
    assert isinstance(e.value, KeyboardInterrupt) and planned == full.n_tokens
    assert 0 < part.n_tokens < full.n_tokens
    k = part.n_tokens                        # the same tokens, the same numbers as the full run's start
    assert part.token_positions == full.token_positions[:k] and part.token_ids == full.token_ids[:k]
    assert part.token_nll == pytest.approx(full.token_nll[:k], abs=1e-9)
    ppl, err, mean = stats_of(torch.tensor(full.token_nll[:k]))
    assert part.perplexity == pytest.approx(ppl, rel=1e-9) and part.stderr == pytest.approx(err, rel=1e-6)
    with pytest.raises(ScoringInterrupted) as e:
        run(_CtrlCAt(dec, 1), ids)
    assert e.value.partial.n_tokens == 0


def test_ctrl_c_in_lines_keeps_the_finished_lines(model):
    from llmsh.perplexity import ScoringInterrupted

    hf, dec = model
    texts = [random_tokens(hf.config.vocab_size, n, seed=n)[0].tolist() for n in (5, 9, 7, 12)]
    full = perplexity_lines(dec, texts, 32, batch_size=2)
    with pytest.raises(ScoringInterrupted) as e:
        perplexity_lines(_CtrlCAt(dec, 2), texts, 32, batch_size=2)
    part = e.value.partial
    assert e.value.planned == sum(len(t) - 1 for t in texts)
    assert [r is None for r in part] == [False, True, False, True]     # the two shortest were batch 1
    assert part[0].perplexity == pytest.approx(full[0].perplexity, rel=1e-9)


# --- the command after Ctrl-C (a decoder whose k-th forward pass is the Ctrl-C) -----------------

@pytest.fixture
def ctrl_c_at(monkeypatch):
    """ctrl_c_at(k): the next `llmsh ppl` gets a decoder interrupted at its k-th forward pass."""
    import llmsh.cli.score as score

    real = score.load

    def arm(k):
        def load(*a, **kw):
            lm = real(*a, **kw)
            lm.decoder = _CtrlCAt(lm.decoder, k)
            return lm
        monkeypatch.setattr(score, "load", load)
    return arm


def _ppl(args):
    from click.testing import CliRunner

    from llmsh.cli import cli

    res = CliRunner().invoke(cli, ["ppl", *args])
    assert res.exit_code == 130, (res.exit_code, res.output)
    return res


def test_ppl_json_after_ctrl_c_reports_the_finished_files_and_the_partial_one(bos_model, llmsh_home, tmp_path,
                                                                              ctrl_c_at):
    import json

    from cli_fixtures import LONG_TEXT

    a, b, rows = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "rows.jsonl"
    a.write_text(LONG_TEXT[:300])                       # a few windows of 16: one forward pass
    b.write_text(LONG_TEXT)
    m = ["-m", str(bos_model), "-c", "16", "--json"]
    from click.testing import CliRunner

    from llmsh.cli import cli

    whole = [json.loads(line) for line in CliRunner().invoke(cli, ["ppl", *m, str(a), str(b)]).stdout.splitlines()]
    ctrl_c_at(3)                                        # a: pass 1; b: pass 2 done, pass 3 interrupted
    out = [json.loads(line) for line in _ppl(m + ["--per-token", str(rows), str(a), str(b)]).stdout.splitlines()]
    assert len(out) == 3 and out[0] == whole[0] and "interrupted" not in out[0]
    part = out[1]
    assert part["interrupted"] is True and part["n_tokens_planned"] == whole[1]["n_tokens"]
    assert part["n_tokens"] == 16 * (16 - 1 - 8)          # one batch of 16 windows, 7 tokens each
    assert out[2]["total"] and out[2]["interrupted"] and out[2]["n_tokens"] == out[0]["n_tokens"] + part["n_tokens"]
    assert len(rows.read_text().splitlines()) == out[2]["n_tokens"]


def test_ppl_after_ctrl_c_each_line_and_kl_base(bos_model, llmsh_home, tmp_path, ctrl_c_at):
    import json

    from cli_fixtures import LONG_TEXT

    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(LONG_TEXT.split(". ")[:40]))
    ctrl_c_at(2)                                        # 16 lines per pass: the first 16 are done
    res = _ppl(["-m", str(bos_model), "--each-line", "--json", str(lines)])
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(out) == 16 and all("interrupted" not in r for r in out)
    assert "interrupted: " in res.stderr
    ref = tmp_path / "ref.kl"
    ctrl_c_at(2)
    res = _ppl(["-m", str(bos_model), "-c", "16", "--kl-base", str(ref), str(lines)])
    assert "[interrupted: 112 of " in res.stdout and "no reference saved" in res.stderr
    assert not ref.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lines.txt", "llmsh-home"]


def test_ctrl_c_before_any_token_leaves_the_per_token_file_alone(bos_model, llmsh_home, tmp_path, ctrl_c_at):
    from cli_fixtures import LONG_TEXT

    a, rows = tmp_path / "a.txt", tmp_path / "rows.tsv"
    a.write_text(LONG_TEXT)
    rows.write_text("kept\n")
    ctrl_c_at(1)                                        # the first forward pass: nothing scored
    res = _ppl(["-m", str(bos_model), "-c", "16", "--per-token", str(rows), str(a)])
    assert "no tokens scored" in res.stdout and "rows are in" not in res.stderr
    assert rows.read_text() == "kept\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "llmsh-home", "rows.tsv"]
