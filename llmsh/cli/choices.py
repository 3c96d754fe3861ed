"""``llmsh score --choices``: rank the continuations of a context (HellaSwag-style)."""

from __future__ import annotations

import json

import click

from . import output
from .common import CONTEXT_SETTINGS, errors_option, load, model_options, quantize_option
from ..errors import InputError


@click.command(context_settings=CONTEXT_SETTINGS,
               short_help="Rank the choices of a context by log-probability (HellaSwag-style).")
@click.option("--choices", "choices_file", is_flag=False, flag_value="-", default=None, metavar="[FILE|-]",
              help='JSONL items, one per line: {"context": ..., "choices": [...], "label": k} '
                   '(label and "id" optional); FILE, or stdin when - or no FILE is given.')
@click.option("--hellaswag", "hellaswag_file", is_flag=False, flag_value="-", default=None, metavar="[FILE|-]",
              help="llama-perplexity --hellaswag text instead: 6 lines per task (context, label "
                   "0..3, 4 endings).")
@model_options
@click.option("--delimiter", default=" ", show_default="a space", metavar="TEXT",
              help="Put between the context and each choice (lm-evaluation-harness's "
                   "target_delimiter); --delimiter '' joins them as given.")
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N",
              help="Score only the first N items.")
@click.option("--batch-size", type=click.IntRange(1), default=None, metavar="B",
              help="Choices per forward pass [default: all of an item's, within ~256 MiB of logits].")
@errors_option
@quantize_option
def score(choices_file, hellaswag_file, model, device, dtype, delimiter, limit, batch_size, errors, quantize):
    """Rank the choices of each item by the model's log-probability of them after the context.

    Prints one JSON object per item: its line, each choice's logprob (total, nats), n_tokens,
    n_bytes, logprob_per_token and logprob_per_byte, and the argmax by each: pred (total, as
    lm-evaluation-harness's acc), pred_norm (per byte of the choice text, as its acc_norm) and
    pred_per_token (mean per token, what llama-perplexity --hellaswag ranks by); with a label,
    acc, acc_norm and acc_per_token (1 or 0). When items have labels a last object follows,
    {"total": true, "n_items", "n_labelled", "acc", "acc_stderr", "acc_ci95", "acc_norm", ...}:
    the accuracy over the labelled items, its standard error and Wilson 95 % interval.

    Tokenization as lm-evaluation-harness: the continuation is DELIMITER + choice (trailing
    spaces of the context go with it), the context is encoded alone and the choice's tokens are
    those of the whole text after the context's (an empty context starts from BOS). The context
    runs once into the KV cache, which is copied to one row per choice; the choices then run as
    one right-padded batch (--batch-size: several). Bad input fails before the model loads,
    naming FILE:LINE.

    \b
    Examples:
      echo '{"context": "The capital of France is", "choices": ["Paris.", "Rome."], "label": 0}' \\
        | llmsh score --choices
      llmsh score --choices items.jsonl | jq -c '[.line, .pred]'
      llmsh score --hellaswag hellaswag_val_full.txt --limit 400 | tail -n 1
    """
    from ..choice_tasks import Ranking, accuracy, encode_item, parse_hellaswag, parse_jsonl
    from ..scoring import score_choices

    if (choices_file is None) == (hellaswag_file is None):
        raise click.UsageError("give one of --choices [FILE] or --hellaswag [FILE]")
    path = choices_file if choices_file is not None else hellaswag_file
    if path == "-" and output.stdin_is_terminal():
        raise click.UsageError("give a FILE or pipe the items on stdin")
    source = "<stdin>" if path == "-" else path
    text = output.read_file(path, errors=errors)
    items = (parse_jsonl if choices_file is not None else parse_hellaswag)(text, source)
    items = items[:limit] if limit else items
    lm = load(model, device, dtype, quantize)
    tok = lm.tokenizer
    rankings = []
    with output.progress("scoring") as progress:
        for i, item in enumerate(items):
            try:
                ctx_ids, conts = encode_item(tok, item, delimiter)
                scores = score_choices(lm.decoder, [ctx_ids + c for c in conts], context_len=len(ctx_ids),
                                       max_len=lm.n_ctx_max, batch_size=batch_size,
                                       pad_id=tok.pad_token_id or 0)
            except InputError as e:
                raise InputError(f"{source}:{item.line}: {e}") from None
            for s, choice in zip(scores, item.choices):
                s.n_bytes = len(choice.encode())
            r = Ranking(item, scores)
            rankings.append(r)
            click.echo(json.dumps(r.to_dict(), ensure_ascii=False))
            progress(i + 1, len(items))
    acc = accuracy(rankings)
    if acc is not None:
        click.echo(json.dumps({"total": True, **acc}))
