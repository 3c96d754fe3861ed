"""Top logprobs, KL divergence and choice scoring against transformers' logits on tiny models."""

import pytest
import torch

from llmsh.kl import KLBase, KLCompare, kl_rows
from llmsh.perplexity import perplexity_llamacpp
from llmsh.scoring import TopLogprobs, score_choices
from cli_fixtures import bos_model, llmsh_home  # noqa: F401  (fixtures)
from tiny_models import make_tiny_model, our_decoder, random_tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, hf = make_tiny_model("llama", tmp_path_factory.mktemp("scoring"))
    return hf, our_decoder(hf, path)


def hf_logp(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.as_tensor(ids)[None]).logits[0].double(), -1)


def test_top_logprobs_match_transformers(model):
    hf, dec = model
    ids = random_tokens(hf.config.vocab_size, 64, seed=3)[0]
    top = TopLogprobs(5)
    r = perplexity_llamacpp(dec, ids, 32, all_tokens=True, per_token=True, observe=top)
    ref = hf_logp(hf, ids[:32])          # the first window, positions 0..30
    for row, pos in zip(top.rows[:31], r.token_positions[:31]):
        want_lp, want_ids = ref[pos - 1].topk(5)
        assert [i for i, _ in row] == want_ids.tolist()
        assert [lp for _, lp in row] == pytest.approx(want_lp.tolist(), abs=1e-4)


def test_kl_full_vocabulary_equals_the_formula_and_self_kl_is_zero(model):
    hf, dec = model
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(6, 40), torch.randn(6, 40)
    base = KLBase(top_k=40)
    base(p_logits, torch.zeros(6, dtype=torch.long))
    got = kl_rows(base.parts["top_ids"][0], base.parts["top_logprobs"][0], base.parts["rest_logprob"][0], q_logits)
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    want = (lp.exp() * (lp - lq)).sum(-1)
    assert torch.allclose(got, want, atol=2e-3)          # float16 storage of log P
    # Top-k with the rest's mass: the KL of the coarsened distributions, at most the full KL.
    small = KLBase(top_k=4)
    small(p_logits, torch.zeros(6, dtype=torch.long))
    coarse = kl_rows(small.parts["top_ids"][0], small.parts["top_logprobs"][0], small.parts["rest_logprob"][0], q_logits)
    assert (coarse <= want + 2e-3).all() and (coarse > 0).all()

    ids = random_tokens(hf.config.vocab_size, 64, seed=4)[0]
    ref = KLBase(top_k=hf.config.vocab_size)
    perplexity_llamacpp(dec, ids, 16, observe=ref)
    tensors = {k: torch.cat(v) for k, v in ref.parts.items()}
    cmp = KLCompare(tensors)
    perplexity_llamacpp(dec, ids, 16, observe=cmp)
    res = cmp.result()
    assert abs(res.kl_mean) < 1e-3 and res.same_top == 1.0 and res.ppl_ratio == pytest.approx(1.0, abs=1e-6)


def test_choices_batched_equal_one_at_a_time_and_transformers(model):
    hf, dec = model
    ctx = random_tokens(hf.config.vocab_size, 12, seed=5)[0].tolist()
    tails = [[5, 9, 11], [7], [5, 9, 30, 31, 2]]
    seqs = [ctx + t for t in tails]
    batched = score_choices(dec, seqs, context_len=len(ctx))
    single = [score_choices(dec, [s], context_len=len(ctx))[0] for s in seqs]
    for s, b, one, t in zip(seqs, batched, single, tails):
        lp = hf_logp(hf, s)
        want = sum(float(lp[len(ctx) - 1 + j, t[j]]) for j in range(len(t)))
        assert b.logprob == pytest.approx(want, abs=1e-4)
        assert b.logprob == pytest.approx(one.logprob, abs=1e-4) and b.n_tokens == len(t)
    small_batches = score_choices(dec, seqs, context_len=len(ctx), batch_size=2)
    assert [c.logprob for c in small_batches] == pytest.approx([c.logprob for c in batched], abs=1e-4)


def test_generate_top_logprobs_are_the_models_own_distribution(bos_model, llmsh_home):
    """generate --json --top-logprobs: each token's logprob and the top K at its position equal
    transformers' log-softmax of the raw logits, also when sampling with a temperature, a
    repetition penalty and top-k (the distribution reported is the model's, as OpenAI's)."""
    import json

    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from cli_fixtures import hf_tokenizer
    from llmsh.cli import cli

    base = ["generate", "-m", str(bos_model), "--raw", "--json", "-n", "8", "--no-compile"]
    hf = AutoModelForCausalLM.from_pretrained(bos_model, attn_implementation="eager").eval()
    tok = hf_tokenizer(bos_model)
    prompt = tok("Hello world").input_ids
    for sampling in (["--temperature", "0"],
                     ["--temperature", "1.7", "--top-k", "5", "--repetition-penalty", "1.3", "--seed", "3"]):
        res = CliRunner().invoke(cli, base + sampling + ["--top-logprobs", "3", "Hello world"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        assert out["prompt_tokens"] == len(prompt) and len(out["logprobs"]) == len(out["tokens"]) > 0
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([prompt + out["tokens"]])).logits[0].double(), -1)
        for j, (t, e) in enumerate(zip(out["tokens"], out["logprobs"])):
            row = logp[len(prompt) - 1 + j]                   # the position that predicted token j
            assert e["id"] == t and e["token"] == tok.decode([t])
            assert e["logprob"] == pytest.approx(float(row[t]), abs=1e-4)
            want_lp, want_ids = row.topk(3)
            assert [x["id"] for x in e["top_logprobs"]] == want_ids.tolist()
            assert [x["logprob"] for x in e["top_logprobs"]] == pytest.approx(want_lp.tolist(), abs=1e-4)
            assert [x["token"] for x in e["top_logprobs"]] == [tok.decode([i]) for i in want_ids.tolist()]
    res = CliRunner().invoke(cli, base + ["--top-logprobs", "0", "Hello world"])
    assert res.exit_code == 0 and all(e["top_logprobs"] == [] for e in json.loads(res.stdout)["logprobs"])
    res = CliRunner().invoke(cli, base[:-4] + ["--top-logprobs", "2", "Hello world"])   # no --json
    assert res.exit_code == 2 and "give --json" in res.stderr
