"""The text-analysis commands: ``perplexity`` (alias ``ppl``) and ``tokenize``."""

from __future__ import annotations

import json
import math
import re

import click

from . import output, ranks
from .ranks import tp_option
from .common import CONTEXT_SETTINGS, arg_text, errors_option, load, model_options, quantize_option
from . import ppl_kl
from .show import show_options
from ..errors import InputError
from ..files import PendingFile
from .client import remote_tokenizer, server_option

# The default protocol scores positions n_ctx/2 .. n_ctx-2 of each window: at least one at 4.
MIN_N_CTX = 4


def _result_dict(source, r) -> dict:
    return r.summary(source)


def _result_line(source, r) -> str:
    if not r.n_tokens:
        return f"{source}: no tokens to score"
    proto = r.protocol + (f", stride {r.stride}" if r.stride else "")
    # One scored token has no spread to estimate an error from.
    err = f"{r.stderr:.4f}" if r.stderr is not None and math.isfinite(r.stderr) else "n/a"
    return (f"{source}: PPL {r.perplexity:.4f} ± {err}, NLL {r.nll:.4f} nats/token, "
            f"{r.bits_per_byte:.4f} bits/byte, {r.n_tokens} token{'s' if r.n_tokens != 1 else ''} scored ({proto}, n_ctx {r.n_ctx})")


@click.command(context_settings=CONTEXT_SETTINGS, short_help="Score text: perplexity, NLL, bits per byte (alias: ppl).")
@show_options
@click.argument("files", nargs=-1, metavar="[FILE]...")
@model_options
@click.option("-c", "--n-ctx", type=click.IntRange(MIN_N_CTX), default=512, show_default=True,
              help=f"Window length in tokens, {MIN_N_CTX} .. the model's context (the default "
                   "is lowered to a shorter model context; a larger value given is an error).")
@click.option("--stride", type=click.IntRange(1), default=None, metavar="S",
              help="Hugging Face sliding-window protocol: windows of n_ctx tokens every S tokens.")
@click.option("--all-tokens", is_flag=True, help="Score every position of each window, not only the second half.")
@click.option("--each-line", is_flag=True, help="Score each input line (LF or CRLF ending) as its own "
                                                "text, one result per line; empty input is an error.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file (or line).")
@click.option("--per-token", "per_token", type=click.Path(dir_okay=False, allow_dash=True), metavar="FILE",
              help="Write every scored token as JSONL (source, position, id, text, logprob) to FILE "
                   "(- for stdout). A regular file is replaced only when scoring succeeds or is "
                   "stopped by Ctrl-C (then with the rows of the tokens scored); a device or FIFO "
                   "is written through; a link is followed; an input FILE is refused.")
@click.option("--top-logprobs", type=click.IntRange(1), default=None, metavar="K",
              help="With --per-token: each token's row also lists the K most likely tokens there "
                   "(id, text, logprob in nats).")
@click.option("--kl-base", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Save this run's log-probabilities (each scored position's top --kl-top-k "
                   "tokens, float16, and the rest's mass) to FILE, the reference for --kl-divergence.")
@click.option("--kl-divergence", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="Score the tokens saved in FILE by --kl-base (no text argument; same protocol) "
                   "and report the KL divergence from that reference, the share of positions with "
                   "the same top token and the perplexity ratio.")
@click.option("--kl-top-k", type=click.IntRange(1), default=100, show_default=True, metavar="K",
              help="Tokens per position --kl-base keeps; a K of at least the vocabulary keeps all.")
@errors_option
@quantize_option
@tp_option
@server_option
def perplexity(files, model, device, dtype, n_ctx, stride, all_tokens, each_line, as_json, per_token,
               top_logprobs, kl_base, kl_divergence, kl_top_k, errors, quantize, tp, server):
    """Score text: perplexity ± standard error, mean NLL, bits per byte (alias: ppl).

    Each FILE (or stdin, or -) is read whole, with one trailing newline removed, and scored with
    llama-perplexity's protocol by default, so numbers compare with llama.cpp: floor(n/n_ctx)
    non-overlapping windows (at least 2·n_ctx tokens needed), each window's first token replaced
    by BOS if the tokenizer adds one, the second half of each window scored. A total follows when
    there are several files.

    Ctrl-C stops scoring and prints the running result (exit status 130): the text being scored
    gets its line with the tokens scored so far, perplexity ± and NLL so far, marked
    "[interrupted: N of M tokens]" (--json: its object with "interrupted": true and
    "n_tokens_planned"); --each-line prints the lines finished; --per-token FILE is written with
    the rows of the tokens counted; a --kl-base FILE is not written.

    \b
    Examples:
      llmsh perplexity book.txt
      llmsh ppl --n-ctx 256 --json a.txt b.txt
      llmsh perplexity --stride 256 --n-ctx 512 book.txt
      llmsh ppl --each-line --json < sentences.txt | jq .perplexity
      llmsh ppl --per-token tokens.jsonl --top-logprobs 5 book.txt
      llmsh ppl --kl-base ref.kl book.txt && llmsh ppl --kl-divergence ref.kl --quantize int4
    """
    from ..kl import KLBase, KLCompare
    from ..perplexity import (ScoringInterrupted, combine, perplexity_lines, perplexity_llamacpp,
                              perplexity_sliding)
    from ..scoring import TopLogprobs

    if stride is not None and all_tokens:
        raise click.UsageError("--stride and --all-tokens are different protocols: use one")
    if each_line and (stride is not None or all_tokens):
        raise click.UsageError(f"--each-line scores each line whole: it does not take "
                               f"{'--stride' if stride is not None else '--all-tokens'}")
    if stride is not None and stride > n_ctx:
        raise click.BadParameter(f"{stride} is larger than --n-ctx ({n_ctx})", param_hint="'--stride'")
    if top_logprobs and not per_token:
        raise click.UsageError("--top-logprobs adds to the --per-token rows: give --per-token FILE")
    base = None
    ctx = click.get_current_context()
    if kl_base or kl_divergence:
        if kl_base and kl_divergence:
            raise click.UsageError("--kl-base saves a reference and --kl-divergence compares with one: use one")
        if each_line:
            raise click.UsageError("--kl-base/--kl-divergence score one text: they do not take --each-line")
        if kl_base and len(files) > 1:
            raise click.UsageError("--kl-base saves the reference of one text: give one FILE")
    if kl_divergence:
        from ..kl import load_base

        if files:
            raise click.UsageError("--kl-divergence scores the tokens saved in its FILE: give no text")
        given = [p for p in ("n_ctx", "stride", "all_tokens") if ctx.get_parameter_source(p).name != "DEFAULT"]
        if given:
            raise click.UsageError(f"--kl-divergence uses the reference's protocol: drop "
                                   f"--{given[0].replace('_', '-')}")
        base = load_base(kl_divergence)
        n_ctx, stride, all_tokens = ppl_kl.base_protocol(base[1]).values()
        texts = [(kl_divergence, None)]
        sources = [kl_divergence]
    else:
        sources = list(files) or ["-"]
        if sources == ["-"] and output.stdin_is_terminal():
            raise click.UsageError("give FILE arguments or pipe text on stdin")
        texts = None
    if server:      # client mode: one text scored by the server (llmsh/cli/client.py)
        from .client import remote_perplexity

        default_ctx = ctx.get_parameter_source("n_ctx").name == "DEFAULT"
        return remote_perplexity(server, sources, n_ctx=None if default_ctx else n_ctx, stride=stride,
                                 all_tokens=all_tokens, as_json=as_json, per_token=per_token,
                                 top_logprobs=top_logprobs, errors=errors, result_line=_result_line,
                                 strip=_strip_one_newline)
    group, mode = ranks.setup(tp, device, data_parallel=True)
    if texts is None:
        texts = ranks.shared(group, lambda: [(s if s != "-" else "<stdin>",
                                              _strip_one_newline(output.read_file(s, errors=errors)))
                                             for s in sources])
    shard = group if mode == "dp" else None      # windows (or lines) shared among the ranks
    if shard is not None and (top_logprobs or kl_base or kl_divergence):
        raise click.UsageError("--top-logprobs and --kl-* see every position: give --tp, or run one process")
    if kl_base:             # created now, to fail before the model loads; replaced only at the end
        kl_file = PendingFile(kl_base)
        ctx.call_on_close(kl_file.discard)
    per_token_file = None
    if per_token is not None and (group is None or group.rank == 0):
        # Opened now, to fail before the model loads; replaced only at the end.
        per_token_file = output.output_file(per_token, inputs=sources)
        click.get_current_context().call_on_close(per_token_file.discard)
    lm = load(model, device, dtype, quantize, tensor_parallel=group if mode == "tp" else None)
    tok = lm.tokenizer
    if base is not None:
        ppl_kl.check_vocab(base[1], lm.config.vocab_size, kl_divergence)
    if n_ctx > lm.n_ctx_max:
        if ctx.get_parameter_source("n_ctx").name != "DEFAULT" or base is not None:
            raise InputError(f"--n-ctx {n_ctx} is larger than the model's context ({lm.n_ctx_max} tokens)")
        n_ctx = lm.n_ctx_max
    bos_id = tok.bos_token_id if tok.add_bos else None
    results = []  # (source, result)
    stopped = None  # the ScoringInterrupted of a Ctrl-C: what was scored is still reported
    try:
        with output.progress("scoring") as progress:
            for source, text in texts:
                if each_line:
                    if not text:  # not a phantom "<stdin>:1" of an empty line
                        raise InputError(f"{source}: empty input, no lines to score")
                    # A CRLF line's "\r" is the line ending, not text to score.
                    lines = [line.removesuffix("\r") for line in text.split("\n")]
                    ids = [tok.encode(line) for line in lines]
                    try:
                        rs = perplexity_lines(lm.decoder, ids, n_ctx, pad_id=tok.pad_token_id or 0,
                                              n_bytes=[len(line.encode()) for line in lines],
                                              per_token=per_token is not None, progress=progress, shard=shard)
                    except ScoringInterrupted as e:
                        rs, stopped = e.partial, e
                    results += [(f"{source}:{i + 1}", r) for i, r in enumerate(rs) if r is not None]
                    if stopped is not None:
                        break
                    continue
                ids = tok.encode(text) if base is None else base[0]["tokens"].tolist()
                top = TopLogprobs(top_logprobs) if top_logprobs else None
                kl_obs = KLBase(kl_top_k) if kl_base else KLCompare(base[0]) if base is not None else None
                common = dict(n_bytes=len(text.encode()) if text is not None else 0, per_token=per_token is not None,
                              progress=progress, observe=ppl_kl.chain(top, kl_obs), shard=shard)
                try:
                    if stride is not None:
                        r = perplexity_sliding(lm.decoder, ids, n_ctx, stride, **common)
                    else:
                        r = perplexity_llamacpp(lm.decoder, ids, n_ctx, bos_id=bos_id, all_tokens=all_tokens,
                                                **common)
                except InputError as e:
                    hint = "" if stride is not None else " (a smaller -c/--n-ctx, or --stride, scores shorter texts)"
                    raise InputError(f"{source}: {e}{hint}") from None
                except ScoringInterrupted as e:
                    r, stopped = e.partial, e
                # The observer may have seen one batch more than was counted when Ctrl-C came.
                r.top_logprobs = top.rows[: r.n_tokens] if top is not None else None
                results.append((source, r))
                if stopped is not None:
                    break
                if isinstance(kl_obs, KLCompare):
                    kl = kl_obs.result()
                    if as_json:
                        click.echo(json.dumps(ppl_kl.kl_dict(source, kl, r)))
                    else:
                        click.echo("\n".join(ppl_kl.kl_lines(source, kl, r)))
                    continue
                if not as_json:  # results appear as each file is done
                    click.echo(_result_line(source, r))
    except KeyboardInterrupt as e:     # between two texts (or while tokenizing one): all whole
        if isinstance(e, ScoringInterrupted):
            raise
        stopped = ScoringInterrupted(None, 0)
    if stopped is not None:
        _report_interrupted(results, stopped, as_json=as_json, each_line=each_line, tok=tok,
                            per_token_file=per_token_file, kl=bool(kl_base or kl_divergence))
        raise click.exceptions.Exit(130)     # as any Ctrl-C (cli.main.EXIT_INTERRUPT)
    if kl_base:
        try:    # safetensors writes the (still empty) temporary file by its name
            kl_obs.save(kl_file.tmp, ids, {"protocol": r.protocol, "n_ctx": r.n_ctx, "stride": r.stride,
                                           "vocab_size": lm.config.vocab_size, "model": lm.path})
        except OSError as e:
            raise InputError(f"cannot write {kl_base}: {e.strerror or e}") from None
        kl_file.commit()
        output.notice(f"saved the reference log-probabilities of {r.n_tokens} positions to {kl_base}")
    if per_token_file is not None:
        _write_per_token(per_token_file, results, tok)
        per_token_file.commit()
    if base is not None:
        return
    if as_json:
        for source, r in results:
            click.echo(json.dumps(_result_dict(source, r)))
    elif each_line:
        for source, r in results:
            click.echo(_result_line(source, r))
    if len(results) > 1 and not each_line:
        total = combine([r for _, r in results])
        if as_json:
            click.echo(json.dumps({**_result_dict(None, total), "total": True}))
        else:
            click.echo(_result_line("total", total))


def _report_interrupted(results, stopped, *, as_json, each_line, tok, per_token_file, kl) -> None:
    """After Ctrl-C: what was scored, as the running values llama-perplexity prints. The text
    being scored when it came (the last result, unless Ctrl-C came between texts or lines) is
    marked interrupted, with the tokens it would have scored; --per-token gets the rows of every
    token scored; a --kl-base file is not written."""
    from ..perplexity import combine

    current = not each_line and stopped.partial is not None    # the last result is a partial one
    done = results[:-1] if current else results
    if as_json or each_line:             # else the finished texts were printed as they ended
        for s, x in done:
            click.echo(json.dumps(_result_dict(s, x)) if as_json else _result_line(s, x))
    if current:
        source, r = results[-1]
        if as_json:
            click.echo(json.dumps({**_result_dict(source, r), "interrupted": True,
                                   "n_tokens_planned": stopped.planned}))
        else:
            line = _result_line(source, r) if r.n_tokens else f"{source}: no tokens scored"
            click.echo(f"{line} [interrupted: {r.n_tokens} of {stopped.planned} tokens]")
    if len(results) > 1 and not each_line and not kl:
        total = combine([x for _, x in results])
        if as_json:
            click.echo(json.dumps({**_result_dict(None, total), "total": True, "interrupted": True}))
        else:
            click.echo(_result_line("total", total) + " [interrupted]")
    n = sum(x.n_tokens for _, x in results)
    where = None
    if per_token_file is not None:
        if n:
            _write_per_token(per_token_file, results, tok)
            per_token_file.commit()
            where = getattr(per_token_file, "path", None)
        else:                   # nothing scored: an existing file is left as it was
            per_token_file.discard()
    output.notice(f"interrupted: {n} token{'s' if n != 1 else ''} scored"
                  + (f" (their rows are in {where})" if where else "")
                  + ("; no KL divergence reported and no reference saved" if kl else ""))


def _write_per_token(out, results, tok) -> None:
    for source, r in results:
        tops = getattr(r, "top_logprobs", None) or []
        for i, (pos, tid, nll) in enumerate(zip(r.token_positions or [], r.token_ids or [], r.token_nll or [])):
            row = {"source": source, "position": pos, "id": tid, "text": tok.decode([tid]), "logprob": -nll}
            if tops:
                row["top_logprobs"] = ppl_kl.top_entries(tok, tops[i])
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _strip_one_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


_ID_SPLIT = re.compile(r"[\s,\[\]]+")


def _parse_ids(text: str, vocab_size: int) -> list[int]:
    ids = []
    for part in _ID_SPLIT.split(text):
        if not part:
            continue
        try:
            i = int(part)
        except ValueError:
            raise InputError(f"not a token id: {part[:40]!r} (give integers separated by spaces or commas)") from None
        if i < 0 or (vocab_size is not None and i >= vocab_size):   # None: the server checks
            size = f" (vocabulary size {vocab_size})" if vocab_size is not None else ""
            raise InputError(f"token id {i} is out of range{size}")
        ids.append(i)
    return ids


@click.command(context_settings=CONTEXT_SETTINGS, short_help="Show the token ids of text; --pieces, --count, --decode.")
@click.argument("text", required=False)
@model_options
@click.option("--pieces", is_flag=True,
              help="Print each token's id and text (JSON-quoted), one per line. A token that is only "
                   "part of a character shows as \"\"; the character goes with the token completing it.")
@click.option("--count", is_flag=True, help="Print only the number of tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with ids, pieces and count.")
@click.option("--no-bos", is_flag=True, help="Do not add BOS even if the tokenizer normally does.")
@click.option("--parse-special", is_flag=True,
              help="Turn special-token text such as <|im_end|> into its id. By default it is "
                   "tokenized as ordinary text.")
@click.option("--decode", is_flag=True, help="Turn ids (space- or comma-separated) back into text.")
@errors_option
@server_option
def tokenize(text, model, device, dtype, pieces, count, as_json, no_bos, parse_special, decode, errors, server):
    """Tokenize TEXT (or stdin, exactly as given) and print the token ids.

    Adds BOS when the model's tokenizer does (--no-bos to disable). Special-token text is NOT
    parsed unless --parse-special is given. On a terminal, --pieces also shows the text with
    token boundaries in alternating colours.

    \b
    Examples:
      llmsh tokenize "Hello world"
      llmsh tokenize --pieces "Hello world"
      wc -c < book.txt; llmsh tokenize --count < book.txt
      llmsh tokenize --parse-special "<|im_start|>user"
      llmsh tokenize "Hello" | llmsh tokenize --decode
    """
    if sum((pieces, count, as_json)) > 1:
        raise click.UsageError("choose one of --pieces, --count, --json")
    if decode and (pieces or count):
        raise click.UsageError(f"--decode prints text: it does not take {'--pieces' if pieces else '--count'}")
    if text is not None:
        text = arg_text(text, "the TEXT argument", errors)
    else:
        if output.stdin_is_terminal():
            raise click.UsageError("give TEXT or pipe text on stdin")
        text = output.read_stdin(errors=errors)
    if server:      # client mode: the server's tokenizer (llmsh/cli/client.py)
        remote = remote_tokenizer(server)
        tok = None
    else:
        tok = _load_tokenizer_only(model, device, dtype).tokenizer
    if decode:
        if tok is None:
            ids = _parse_ids(text, None)
            decoded = remote.decode(ids)
        else:
            ids = _parse_ids(text, tok.vocab_size)
            decoded = tok.decode(ids)
        if as_json:
            click.echo(json.dumps({"text": decoded, "ids": ids, "count": len(ids)}, ensure_ascii=False))
            return
        out = output.stdout()
        out.write(decoded)
        if output.is_terminal(out) and not decoded.endswith("\n"):
            out.write("\n")
        return
    if tok is None:
        ids, texts = remote.encode(text, add_bos=False if no_bos else None, parse_special=parse_special)
    else:
        ids = tok.encode(text, add_bos=False if no_bos else None, parse_special=parse_special)
    if count:
        click.echo(str(len(ids)))
        return
    if tok is not None:
        texts = _pieces(tok, ids)
    if as_json:
        click.echo(json.dumps({"ids": ids, "pieces": texts, "count": len(ids)}, ensure_ascii=False))
        return
    if not pieces:
        click.echo(" ".join(map(str, ids)))
        return
    out = output.stdout()
    width = len(str(max(ids))) if ids else 1
    for i, t in zip(ids, texts):
        click.echo(f"{i:>{width}}\t{json.dumps(t, ensure_ascii=False)}")
    if output.color_enabled(out) and ids:
        click.echo("\n" + output.alternate_colors(texts, out))


def _pieces(tok, ids: list[int]) -> list[str]:
    from ..stream_decoder import token_pieces

    return token_pieces(tok, ids)


def _load_tokenizer_only(model, device, dtype):
    """tokenize needs only the tokenizer, but -m resolution (pull, .gguf conversion) is shared."""
    from types import SimpleNamespace

    from ..hub import resolve_model
    from ..tokenizer import Tokenizer

    from .common import from_environment

    with from_environment():
        path = resolve_model(model, notice=output.notice)
    return SimpleNamespace(tokenizer=Tokenizer.from_dir(path), path=path)
