"""``llmsh ppl --show``: the text with each token's surprisal (bits), coloured on a terminal.

A hook on the perplexity command (:func:`show_options`): it adds ``--show`` and ``--color`` and,
when ``--show`` is given, runs :func:`run_show` instead of the command body. Output is a stream
of text, never a full-screen display, so that long files scroll and pagers work
(``llmsh ppl --show --color always book.txt | less -R``):

- colour (stdout a terminal and NO_COLOR unset, or ``--color always``): each token in the colour
  of its surprisal bin, then a legend and the summary line;
- plain (piped, NO_COLOR, ``--color never``): each scored token followed by ``[bits]`` with one
  decimal, then the summary line;
- ``--json``: one object per token (source, position, id, text, logprob in nats, bits; null for
  the first, unscored, token), then the summary object as ``ppl --json`` prints it.

Every token after the first is scored: Hugging Face's sliding window (stride n_ctx/2 unless
--stride is given), or with --all-tokens llama-perplexity's windows scoring every position.
Tokens that are only part of a character (text "") are shown with the token that completes it,
their surprisals added: the surprisal of the character.
"""

from __future__ import annotations

import functools
import json
import math

import click

from . import output
from ..errors import InputError

LN2 = math.log(2)
# Surprisal bins in bits (lower bounds) and their colours, calm to loud; the legend shows them.
BINS = ((0.0, "blue"), (1.0, "cyan"), (2.0, "green"), (4.0, "yellow"), (8.0, "red"), (16.0, "bold magenta"))
# Options of the perplexity command that --show works with (the others are refused if given).
_ALLOWED = {"files", "model", "device", "dtype", "n_ctx", "stride", "all_tokens", "as_json", "errors",
            "quantize"}


def show_options(f):
    """Add ``--show`` and ``--color`` to the perplexity command ``f`` (put it right under
    ``@click.command``); with --show, :func:`run_show` gets the other options instead of ``f``."""
    @functools.wraps(f)
    def wrapper(*args, show, color, **kw):
        if not show:
            if color is not None:
                raise click.UsageError("--color goes with --show")
            return f(*args, **kw)
        return run_show(color=color or "auto", **kw)

    params = list(getattr(f, "__click_params__", []))
    wrapper.__click_params__ = []
    click.option("--color", type=click.Choice(["auto", "always", "never"]), default=None,
                 help="With --show: colour on a terminal (auto, the default), also through a pipe "
                      "(always, for less -R) or never.")(wrapper)
    click.option("--show", is_flag=True,
                 help="Print the text with each token's surprisal in bits: coloured on a terminal, "
                      "[n.n] after each token when piped, per-token objects with --json. Every "
                      "token after the first is scored (sliding window, stride n_ctx/2).")(wrapper)
    # Listed after the perplexity options in --help (click keeps this list in reverse order).
    wrapper.__click_params__ = wrapper.__click_params__ + params
    return wrapper


def run_show(*, files, model, device, dtype, n_ctx, stride, all_tokens, as_json, errors, quantize,
             color, **others):
    from ..perplexity import combine, perplexity_llamacpp, perplexity_sliding
    from .common import load
    from .score import _result_dict, _result_line, _strip_one_newline

    ctx = click.get_current_context()
    for name in others:
        if ctx.get_parameter_source(name).name != "DEFAULT":
            raise click.UsageError(f"--show does not take --{name.replace('_', '-')}")
    if stride is not None and all_tokens:
        raise click.UsageError("--stride and --all-tokens are different protocols: use one")
    if stride is not None and stride > n_ctx:
        raise click.BadParameter(f"{stride} is larger than --n-ctx ({n_ctx})", param_hint="'--stride'")
    sources = list(files) or ["-"]
    if sources == ["-"] and output.stdin_is_terminal():
        raise click.UsageError("give FILE arguments or pipe text on stdin")
    texts = [(s if s != "-" else "<stdin>", _strip_one_newline(output.read_file(s, errors=errors)))
             for s in sources]
    lm = load(model, device, dtype, quantize)
    tok = lm.tokenizer
    if n_ctx > lm.n_ctx_max:
        if ctx.get_parameter_source("n_ctx").name != "DEFAULT":
            raise InputError(f"--n-ctx {n_ctx} is larger than the model's context ({lm.n_ctx_max} tokens)")
        n_ctx = lm.n_ctx_max
    out = output.stdout()
    colored = color == "always" or (color == "auto" and output.color_enabled(out))
    results = []
    for source, text in texts:
        ids = tok.encode(text)
        common = dict(n_bytes=len(text.encode()), per_token=True)
        with output.progress("scoring") as progress:
            try:
                if all_tokens:
                    r = perplexity_llamacpp(lm.decoder, ids, n_ctx, all_tokens=True, progress=progress,
                                            bos_id=tok.bos_token_id if tok.add_bos else None, **common)
                else:
                    r = perplexity_sliding(lm.decoder, ids, n_ctx, stride or max(1, n_ctx // 2),
                                           progress=progress, **common)
            except InputError as e:
                raise InputError(f"{source}: {e}") from None
        results.append(r)
        nll = dict(zip(r.token_positions, r.token_nll))
        pieces = token_pieces(tok, ids)
        if as_json:
            for pos, (tid, piece) in enumerate(zip(ids, pieces)):
                lp = -nll[pos] if pos in nll else None
                out.write(json.dumps({"source": source, "position": pos, "id": tid, "text": piece,
                                      "logprob": lp, "bits": None if lp is None else -lp / LN2},
                                     ensure_ascii=False) + "\n")
            out.write(json.dumps(_result_dict(source, r)) + "\n")
            continue
        units = display_units(pieces, [nll.get(p) for p in range(len(ids))])
        if colored:
            _print_colored(out, units, color == "always")
            click.echo(legend_text(), color=True)
        else:
            out.write(annotated(units))
            out.write("\n\n")
        click.echo(_result_line(source, r))
    if len(results) > 1:
        total = combine(results)
        click.echo(json.dumps({**_result_dict(None, total), "total": True}) if as_json
                   else _result_line("total", total))


def token_pieces(tok, ids: list[int]) -> list[str]:
    """Each token's text, joining into the decoded text; BOS and other special tokens show as
    "" (skipped), and a token holding only part of a UTF-8 character gets "" (the character goes
    with the token completing it)."""
    dec = tok.stream_decoder(skip_special=True)
    pieces = [dec.step(i) for i in ids]
    if pieces:
        pieces[-1] += dec.flush()
    return pieces


def display_units(pieces: list[str], nll: list[float | None]) -> list[tuple[str, float | None]]:
    """(text, surprisal in bits or None) per shown unit: a token, or the tokens of one character
    (the "" pieces before the one completing it), their surprisals summed (None if none scored)."""
    units = []
    acc, scored = 0.0, False
    for piece, x in zip(pieces, nll):
        if x is not None:
            acc, scored = acc + x / LN2, True
        # A carriage return (CRLF files) would send the terminal's cursor back over the line:
        # not printed, its surprisal still shown.
        was_cr = "\r" in piece
        piece = piece.replace("\r", "")
        if piece or was_cr:
            units.append((piece, acc if scored else None))
            acc, scored = 0.0, False
    return units


def annotated(units) -> str:
    """Plain text: each scored unit followed by ``[bits]`` (one decimal), put before the unit's
    trailing newlines so that lines stay lines."""
    out = []
    for text, bits in units:
        if bits is None:
            out.append(text)
            continue
        body = text.rstrip("\r\n")
        out.append(f"{body}[{bits:.1f}]{text[len(body):]}")
    return "".join(out)


def style_of(bits: float | None) -> str:
    if bits is None:
        return ""
    style = BINS[0][1]
    for lo, s in BINS:
        if bits >= lo:
            style = s
    return style


def _console(stream, force: bool):
    from rich.console import Console

    # soft_wrap: no line breaks of rich's own, the text keeps its lines (pagers, resizing).
    return Console(file=stream, force_terminal=force or None, no_color=False, highlight=False,
                   soft_wrap=True, emoji=False, markup=False, color_system="standard" if force else "auto")


def _print_colored(stream, units, force: bool) -> None:
    from rich.text import Text

    text = Text()
    for piece, bits in units:
        text.append(piece, style=style_of(bits))
    if not text.plain.endswith("\n"):
        text.append("\n")
    _console(stream, force).print(text, end="")


def legend_text() -> str:
    """The legend as one line with ANSI colours: each bin's range in its colour."""
    from io import StringIO

    from rich.text import Text

    t = Text("\nsurprisal (bits): ")
    for i, (lo, style) in enumerate(BINS):
        hi = BINS[i + 1][0] if i + 1 < len(BINS) else None
        label = f"{lo:g}–{hi:g}" if hi is not None else f"≥{lo:g}"
        t.append(label, style=style)
        t.append("  ")
    t.append("(plain: not scored)")
    buf = StringIO()
    _console(buf, True).print(t, end="")
    return buf.getvalue()
