"""KL divergence of a model (or a quantization of it) from a reference run, as llama-perplexity's
``--kl-divergence-base`` / ``--kl-divergence`` pair (llama.cpp tools/perplexity).

The reference run keeps, for every position a perplexity protocol scores, the reference model's
``top_k`` most likely tokens with their log-probabilities (float16) and the log of the mass of
all other tokens (float32). llama.cpp keeps every logit (as 16-bit values): for a 49k-token
vocabulary that is ~98 KB per position, gigabytes for a book; the top 100 plus the rest's mass
is 600 bytes. The price: the KL computed is that of the two distributions over K + 1 outcomes
(the top K tokens and "any other"), which by the data-processing inequality is at most the full
KL, and equal to it as K reaches the vocabulary (``top_k`` >= V stores everything, rest -inf).
The report says how much mass the rest held, so a user can tell how tight the bound is.

File: safetensors; tensors ``tokens`` (n,) int64 (the text as the reference tokenized it),
``targets`` (N,) int64, ``nll`` (N,) float32 (nats), ``top_ids`` (N, K) int32, ``top_logprobs``
(N, K) float16, ``rest_logprob`` (N,) float32; metadata: format, version, protocol, n_ctx,
stride, vocab_size, top_k, model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError

FORMAT = "llmsh-kl-base"
DEFAULT_TOP_K = 100


class KLBase:
    """An ``observe`` callback (:mod:`llmsh.perplexity`) that records the reference run."""

    def __init__(self, top_k: int = DEFAULT_TOP_K):
        self.top_k = top_k
        self.parts: dict[str, list[Tensor]] = {k: [] for k in
                                               ("targets", "nll", "top_ids", "top_logprobs", "rest_logprob")}

    def __call__(self, logits: Tensor, targets: Tensor) -> None:
        logp = torch.log_softmax(logits.double(), -1)                         # (N, V)
        k = min(self.top_k, logp.shape[-1])
        top, ids = torch.topk(logp, k, dim=-1)
        rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)             # -inf when k == V
        self.parts["targets"].append(targets.cpu().long())
        self.parts["nll"].append((-logp.gather(-1, targets[:, None]).squeeze(-1)).float().cpu())
        self.parts["top_ids"].append(ids.int().cpu())
        self.parts["top_logprobs"].append(top.half().cpu())
        self.parts["rest_logprob"].append(rest.float().cpu())

    def save(self, path, tokens, meta: dict) -> None:
        """Write the reference to ``path`` (see the module docstring). Raises OSError."""
        from safetensors.torch import save_file

        tensors = {k: torch.cat(v) if v else torch.empty(0) for k, v in self.parts.items()}
        tensors["tokens"] = torch.as_tensor(list(tokens), dtype=torch.long)
        md = {"format": FORMAT, "version": "1", "top_k": str(self.top_k),
              **{k: str(v) for k, v in meta.items()}}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=md)


def load_base(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by :meth:`KLBase.save`.

    Raises InputError when the file cannot be read or is not such a file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise InputError(f"{path} is not a --kl-base file (written by llmsh ppl --kl-base)")
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except InputError:
        raise
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise InputError(f"cannot read {path} as a --kl-base file: {e}") from None


def kl_rows(top_ids: Tensor, top_logprobs: Tensor, rest_logprob: Tensor, logits: Tensor) -> Tensor:
    """KL(P || Q) in nats per row, P the reference kept as top-K plus the rest's mass.

    top_ids (N, K) int, top_logprobs (N, K), rest_logprob (N,): P; logits (N, V): Q's logits.
    KL = Σ_k P_k (log P_k − log Q_k) + P_rest (log P_rest − log Q_rest), with Q_rest Q's mass
    outside P's top K; the rest term is 0 when P_rest is 0. Returns (N,) float64.
    """
    logq = torch.log_softmax(logits.double(), -1)
    ids = top_ids.long().to(logq.device)
    lp = top_logprobs.double().to(logq.device)
    r = rest_logprob.double().to(logq.device)
    lq_top = logq.gather(-1, ids)
    kl = (lp.exp() * (lp - lq_top)).sum(-1)
    lq_rest = logq.scatter(-1, ids, float("-inf")).logsumexp(-1)
    rest = torch.where(torch.isfinite(r), r.exp() * (r - lq_rest), torch.zeros_like(r))
    return kl + rest


class KLCompare:
    """An ``observe`` callback comparing the run being made with a reference from :func:`load_base`;
    rows must arrive in the reference's order (the same protocol over the same tokens)."""

    def __init__(self, base: dict[str, Tensor]):
        self.base = base
        self.i = 0
        self.kl: list[Tensor] = []
        self.same: list[Tensor] = []
        self.nll: list[Tensor] = []

    def __call__(self, logits: Tensor, targets: Tensor) -> None:
        n = logits.shape[0]
        b = {k: self.base[k][self.i: self.i + n] for k in ("targets", "top_ids", "top_logprobs", "rest_logprob")}
        if b["targets"].shape[0] != n or not torch.equal(b["targets"], targets.cpu().long()):
            raise InputError("the scored tokens differ from the reference run's (same protocol, "
                             "--n-ctx and tokenizer needed)")
        self.kl.append(kl_rows(b["top_ids"], b["top_logprobs"], b["rest_logprob"], logits).cpu())
        self.same.append((logits.argmax(-1).cpu() == b["top_ids"][:, 0].long()))
        logq = torch.log_softmax(logits.double(), -1)
        self.nll.append((-logq.gather(-1, targets[:, None]).squeeze(-1)).cpu())
        self.i += n

    def result(self) -> "KLResult":
        """The summary. Raises InputError when fewer positions were scored than the reference has."""
        total = self.base["targets"].shape[0]
        if self.i != total:
            raise InputError(f"scored {self.i} positions but the reference has {total}")
        kl = torch.cat(self.kl) if self.kl else torch.empty(0, dtype=torch.float64)
        same = torch.cat(self.same).double() if self.same else torch.empty(0, dtype=torch.float64)
        d = (torch.cat(self.nll) if self.nll else torch.empty(0, dtype=torch.float64)) - self.base["nll"].double()
        return KLResult.from_values(kl, same, d, self.base["nll"].double(),
                                    self.base["rest_logprob"].double().exp())


def _mean_err(x: Tensor) -> tuple[float, float]:
    """Mean and standard error (llama-perplexity's ±: sqrt((mean(x²) − mean²)/(N − 1)))."""
    n = x.numel()
    if n == 0:
        return math.nan, math.nan
    m = float(x.mean())
    if n < 2:
        return m, math.nan
    return m, math.sqrt(max(float((x * x).mean()) - m * m, 0.0) / (n - 1))


@dataclass
class KLResult:
    """KL divergence summary (nats), as llama-perplexity's "KL divergence statistics".

    n: positions; kl_mean ± kl_stderr, kl_median, kl_p99, kl_max; same_top (share of positions
    whose most likely token is the reference's) ± same_top_stderr; ln_ppl_ratio ± its stderr
    (mean of NLL − reference NLL), ppl_ratio = exp(ln_ppl_ratio), ppl_base; rest_mass_mean: the
    reference's mean probability outside its stored top-K (0 when all were kept).
    """

    n: int
    kl_mean: float
    kl_stderr: float
    kl_median: float
    kl_p99: float
    kl_max: float
    same_top: float
    same_top_stderr: float
    ln_ppl_ratio: float
    ln_ppl_ratio_stderr: float
    ppl_ratio: float
    ppl_base: float
    rest_mass_mean: float

    @classmethod
    def from_values(cls, kl: Tensor, same: Tensor, dnll: Tensor, base_nll: Tensor,
                    rest_mass: Tensor) -> "KLResult":
        n = kl.numel()
        if n == 0:
            raise InputError("no positions to compare")
        km, ke = _mean_err(kl)
        p = float(same.mean())
        lm, le = _mean_err(dnll)
        q = torch.quantile(kl, torch.tensor([0.5, 0.99], dtype=kl.dtype)).tolist()
        return cls(n=n, kl_mean=km, kl_stderr=ke, kl_median=q[0], kl_p99=q[1], kl_max=float(kl.max()),
                   same_top=p, same_top_stderr=math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan,
                   ln_ppl_ratio=lm, ln_ppl_ratio_stderr=le, ppl_ratio=math.exp(lm),
                   ppl_base=math.exp(float(base_nll.mean())), rest_mass_mean=float(rest_mass.mean()))
