"""``perplexity --kl-base / --kl-divergence`` and ``--top-logprobs``: the observers the
perplexity protocols feed, and how their results are printed (part of :mod:`llmsh.cli.score`)."""

from __future__ import annotations

import math

from ..errors import InputError


def top_entries(tok, row) -> list[dict]:
    """``[(id, logprob), ...]`` as the JSON list of ``--top-logprobs`` (id, text, logprob)."""
    return [{"id": i, "text": tok.decode([i]), "logprob": lp} for i, lp in row]


def chain(*observers):
    """One ``observe`` callback calling each non-None observer (None when there is none)."""
    obs = [o for o in observers if o is not None]
    if not obs:
        return None

    def observe(logits, targets):
        for o in obs:
            o(logits, targets)
    return observe


def base_protocol(meta: dict) -> dict:
    """The protocol of a --kl-base file as perplexity's options: n_ctx, stride, all_tokens."""
    try:
        stride = int(meta["stride"]) if meta.get("stride") not in (None, "None", "") else None
        return {"n_ctx": int(meta["n_ctx"]), "stride": stride, "all_tokens": meta["protocol"] == "llamacpp-all"}
    except (KeyError, ValueError):
        raise InputError("the --kl-divergence file has no protocol metadata (written by another tool?)") from None


def check_vocab(meta: dict, vocab_size: int, path) -> None:
    """Raise InputError unless the reference was made with the same vocabulary size."""
    want = int(meta.get("vocab_size", vocab_size))
    if want != vocab_size:
        raise InputError(f"{path} was made with a vocabulary of {want} tokens, this model has "
                         f"{vocab_size}: KL divergence needs the same tokenizer")


def _f(x):
    return None if x is None or not math.isfinite(x) else x


def kl_dict(source, kl, ppl) -> dict:
    """The --json object of a --kl-divergence run."""
    return {"source": source, "kl_divergence": _f(kl.kl_mean), "kl_divergence_stderr": _f(kl.kl_stderr),
            "kl_median": _f(kl.kl_median), "kl_p99": _f(kl.kl_p99), "kl_max": _f(kl.kl_max),
            "same_top": _f(kl.same_top), "same_top_stderr": _f(kl.same_top_stderr),
            "ppl_ratio": _f(kl.ppl_ratio), "ln_ppl_ratio": _f(kl.ln_ppl_ratio),
            "ln_ppl_ratio_stderr": _f(kl.ln_ppl_ratio_stderr), "perplexity": _f(ppl.perplexity),
            "perplexity_base": _f(kl.ppl_base), "n_positions": kl.n,
            "reference_rest_mass": _f(kl.rest_mass_mean)}


def kl_lines(source, kl, ppl) -> list[str]:
    """The text report of a --kl-divergence run (nats; shares in %)."""
    rest = (f"; the reference's top-K held all but {100 * kl.rest_mass_mean:.2f} % of the probability "
            "(the KL is a lower bound by that much)" if kl.rest_mass_mean > 0 else "")
    return [
        f"{source}: KL divergence {kl.kl_mean:.6f} ± {kl.kl_stderr:.6f} nats/token "
        f"(median {kl.kl_median:.6f}, 99% {kl.kl_p99:.6f}, max {kl.kl_max:.6f}), {kl.n} positions",
        f"{source}: same top token {100 * kl.same_top:.2f} ± {100 * kl.same_top_stderr:.2f} %, "
        f"PPL {ppl.perplexity:.4f} vs {kl.ppl_base:.4f}, ratio {kl.ppl_ratio:.6f} "
        f"(ln {kl.ln_ppl_ratio:.6f} ± {kl.ln_ppl_ratio_stderr:.6f}){rest}",
    ]
