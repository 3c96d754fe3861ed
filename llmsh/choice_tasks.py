"""Multiple-choice items (HellaSwag-style): reading them, tokenizing them, ranking and accuracy.

Engine code, no printing. The scoring itself is :func:`llmsh.scoring.score_choices` (the context
prefilled once into a KV cache shared by all choices, the choices then one right-padded batch).

Two input formats:

- JSONL, one item per line: ``{"context": str, "choices": [str, ...], "label": int?, "id": any?}``
  (blank lines are skipped).
- llama.cpp's ``llama-perplexity --hellaswag`` text: 6 lines per task, the context, the gold
  label (0..3), then 4 endings (tools/perplexity/perplexity.cpp, ``hellaswag_score``).

Tokenization and ranking follow EleutherAI's lm-evaluation-harness (multiple_choice tasks):
the continuation is ``delimiter + choice`` (its ``target_delimiter``, a space by default, which
is also how llama.cpp joins context and ending); trailing whitespace of the context moves to the
continuation; the context is encoded alone and context+continuation whole, and the
continuation's tokens are the whole's after the context's length (so the space goes with the
continuation). An empty context is the BOS token (EOS when there is none), as lm-eval's prefix
token. ``acc`` takes the choice with the highest total log-probability, ``acc_norm`` the highest
per byte of the choice text (lm-eval divides by characters: the same for ASCII); the per-token
mean is what llama-perplexity ranks by (it also leaves out ending tokens shared by all four).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import InputError
from .scoring import ChoiceScore

HELLASWAG_LINES = 6
HELLASWAG_CHOICES = 4


@dataclass
class ChoiceItem:
    """One item: ``line`` is where it starts in its input (1-based), for messages and output."""

    context: str
    choices: list[str]
    label: int | None = None
    line: int = 0
    id: object = None


def parse_jsonl(text: str, source: str = "<stdin>") -> list[ChoiceItem]:
    """Items of a JSONL text. Raises InputError naming ``source:line`` for a line that is not a
    JSON object with a string ``context``, a non-empty list of non-empty strings ``choices`` and an
    optional integer ``label`` in range."""
    items = []
    for n, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        where = f"{source}:{n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object with \"context\" and \"choices\"")
        unknown = set(obj) - {"context", "choices", "label", "id"}
        if unknown:
            raise InputError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                             "(keys: context, choices, label, id)")
        context, choices, label = obj.get("context"), obj.get("choices"), obj.get("label")
        if not isinstance(context, str):
            raise InputError(f"{where}: \"context\" must be a string")
        if not isinstance(choices, list) or not choices:
            raise InputError(f"{where}: \"choices\" must be a non-empty list of strings")
        items.append(_item(where, context, choices, label, n, obj.get("id")))
    if not items:
        raise InputError(f"{source}: no items (one JSON object per line)")
    return items


def parse_hellaswag(text: str, source: str = "<stdin>") -> list[ChoiceItem]:
    """Items of llama.cpp's hellaswag text (6 lines per task; CR of CRLF endings dropped).
    Raises InputError when the line count is not a multiple of 6 or a label is not 0..3."""
    lines = [ln.removesuffix("\r") for ln in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()             # the final newline ends the last line, it starts none
    if not lines:
        raise InputError(f"{source}: no tasks (6 lines each: context, label, 4 endings)")
    if len(lines) % HELLASWAG_LINES:
        raise InputError(f"{source}: {len(lines)} lines, not a multiple of 6 (each task: "
                         "context, label, 4 endings)")
    items = []
    for i in range(0, len(lines), HELLASWAG_LINES):
        label = lines[i + 1].strip()
        where = f"{source}:{i + 2}"
        if not label.isdigit():
            raise InputError(f"{where}: the label must be 0..3, got {label[:40]!r}")
        items.append(_item(where, lines[i], lines[i + 2: i + 6], int(label), i + 1, None))
    return items


def _item(where, context, choices, label, line, id_) -> ChoiceItem:
    for k, c in enumerate(choices):
        if not isinstance(c, str):
            raise InputError(f"{where}: choice {k} is not a string")
        if not c.strip():
            raise InputError(f"{where}: choice {k} is empty")
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, int):
            raise InputError(f"{where}: \"label\" must be an integer choice index")
        if not 0 <= label < len(choices):
            raise InputError(f"{where}: label {label} is out of range (0..{len(choices) - 1} "
                             f"for {len(choices)} choices)")
    return ChoiceItem(context, list(choices), label, line, id_)


def encode_item(tok, item: ChoiceItem, delimiter: str = " ") -> tuple[list[int], list[list[int]]]:
    """(context ids, [continuation ids per choice]) as lm-evaluation-harness's ``_encode_pair``.

    ``tok``: a :class:`llmsh.tokenizer.Tokenizer` (BOS added when it adds one). A continuation
    can be empty when the tokenizer merges it into the context's last token; the scorer rejects it.
    """
    context = item.context
    moved = context[len(context.rstrip()):]
    context = context[: len(context) - len(moved)]
    ctx_ids = tok.encode(context)
    conts = []
    for choice in item.choices:
        whole = tok.encode(context + moved + delimiter + choice)
        conts.append(whole[len(ctx_ids):])
    if not ctx_ids:
        prefix = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_ids or [None])[0]
        if prefix is None:
            raise InputError("the context is empty and the tokenizer has no BOS or EOS token to start from")
        ctx_ids = [prefix]
    return ctx_ids, conts


@dataclass
class Ranking:
    """One scored item: the choices' scores and the argmax by each normalisation."""

    item: ChoiceItem
    scores: list[ChoiceScore]
    pred: int = field(init=False)            # highest total log-probability (lm-eval acc)
    pred_norm: int = field(init=False)       # highest per byte of choice text (lm-eval acc_norm)
    pred_per_token: int = field(init=False)  # highest mean per token (llama-perplexity --hellaswag)

    def __post_init__(self) -> None:
        self.pred = _argmax([s.logprob for s in self.scores])
        self.pred_norm = _argmax([s.logprob_per_byte for s in self.scores])
        self.pred_per_token = _argmax([s.logprob_per_token for s in self.scores])

    def to_dict(self) -> dict:
        it = self.item
        d = {"line": it.line, **({"id": it.id} if it.id is not None else {}),
             "choices": [{"text": c, "logprob": s.logprob, "n_tokens": s.n_tokens, "n_bytes": s.n_bytes,
                          "logprob_per_token": s.logprob_per_token, "logprob_per_byte": s.logprob_per_byte}
                         for c, s in zip(it.choices, self.scores)],
             "pred": self.pred, "pred_norm": self.pred_norm, "pred_per_token": self.pred_per_token,
             "label": it.label}
        if it.label is not None:
            d.update(acc=int(self.pred == it.label), acc_norm=int(self.pred_norm == it.label),
                     acc_per_token=int(self.pred_per_token == it.label))
        return d


def _argmax(xs: Sequence[float]) -> int:
    # The first of equal values, as numpy.argmax (lm-eval) and llama.cpp's strict > loop.
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def accuracy(rankings: Sequence[Ranking]) -> dict | None:
    """Accuracy over the labelled items, or None when none has a label.

    Returns {"n_items", "n_labelled", and for each of acc, acc_norm, acc_per_token: the mean and
    ``<name>_stderr``}: the standard error of the mean as lm-eval computes it (sample standard
    deviation / sqrt(n); None for one item), and ``acc_norm_ci95``, the Wilson 95 % interval that
    llama-perplexity --hellaswag prints (for the per-token figure it ranks by: ``acc_per_token_ci95``).
    """
    labelled = [r for r in rankings if r.item.label is not None]
    if not labelled:
        return None
    n = len(labelled)
    out: dict = {"n_items": len(rankings), "n_labelled": n}
    for name, attr in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_per_token", "pred_per_token")):
        hits = sum(getattr(r, attr) == r.item.label for r in labelled)
        p = hits / n
        out[name] = p
        out[f"{name}_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
        out[f"{name}_ci95"] = list(wilson(hits, n))
    return out


def wilson(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion hits/n (95 % by default)."""
    p = hits / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)
