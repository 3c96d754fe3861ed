"""``llmsh bench``: the click command over :func:`llmsh.bench.run_bench` (imported lazily by cli.py).

torch is imported only when the command runs, so ``llmsh --help`` stays instant.
"""

from __future__ import annotations

import json
import os
import sys

import click

from . import output, ranks
from .common import CONTEXT_SETTINGS, model_options, quantize_option
from .ranks import tp_option


def _check_new_tokens(ctx, param, value):
    if value is not None and value < 2:
        # The first token comes from the prefill's logits: decode speed needs a second one.
        raise click.BadParameter(f"{value} leaves no decode step to time: give 2 or more")
    return value


def _check_threads(ctx, param, value):
    if value is None:
        return value
    cpus = os.cpu_count() or 1
    if value < 1:
        raise click.BadParameter(f"{value} is not a thread count: give 1 .. {4 * cpus}")
    if value > 4 * cpus:
        raise click.BadParameter(f"{value} threads on {cpus} CPU{'s' if cpus != 1 else ''} would "
                                 f"measure the scheduler: give 1 .. {4 * cpus}")
    return value


@click.command(context_settings=CONTEXT_SETTINGS)
@model_options
@click.option("-p", "--prompt-tokens", type=click.IntRange(1), default=512, show_default=True, metavar="N",
              help="Prompt length for the prefill measurement (random token ids).")
@click.option("-n", "--new-tokens", type=int, default=128, show_default=True, metavar="N",
              callback=_check_new_tokens,
              help="Tokens generated for the decode measurement (at least 2: the first comes from "
                   "the prefill). -p plus -n must fit in the model's context.")
@click.option("-r", "--repetitions", type=click.IntRange(1), default=3, show_default=True, metavar="N",
              help="Measured runs after one warm-up run.")
@quantize_option
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the decode step (default: when -n is as long as a compile "
                   "pays back: every one of the -n tokens is generated here). The compile's time is "
                   "reported (compile_s), not counted in the speeds.")
@click.option("--threads", type=int, default=None, metavar="N", callback=_check_threads,
              help="CPU threads, 1 .. 4 x the CPU count (default: torch's).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (prefill_tok_s, decode_tok_s, ttft_s, peak_rss_mb, decode_gb_s, ...).")
@tp_option
def bench(model, device, dtype, prompt_tokens, new_tokens, repetitions, quantize, compile_, threads, as_json, tp):
    """Measure prefill and decode speed, like llama-bench.

    Reports tokens/s for a prompt of -p random tokens and for -n greedy new tokens (median and
    min–max over -r runs after a warm-up), time to first token, peak RSS and the memory bandwidth
    decoding achieves.

    \b
    Examples:
      llmsh bench
      llmsh bench -p 128 -n 64 -r 5 --json
      llmsh bench --quantize int8
    """
    import time

    import torch

    from ..bench import format_bench, run_bench
    from ..config import ModelConfig
    from ..loader import LoadedModel, build_decoder, precision_for, resolve_path

    if threads:
        torch.set_num_threads(threads)
    group, _ = ranks.setup(tp, device)
    t0 = time.perf_counter()
    with output.stage_progress() as progress:
        path = resolve_path(model, notice=output.notice, tensor_parallel=group, progress=progress,
                            precision=precision_for(device, quantize, group))
    config = ModelConfig.from_file(path)
    n_ctx = int(config.max_position_embeddings)
    if prompt_tokens + new_tokens > n_ctx:
        what = "-p" if prompt_tokens >= n_ctx else "-p plus -n"
        raise click.UsageError(f"{what} ({prompt_tokens} + {new_tokens} tokens) is more than the "
                               f"model's context ({n_ctx} tokens)")
    dec = build_decoder(path, config, device=device, dtype=dtype, quantize=quantize, tensor_parallel=group)
    lm = LoadedModel(path=path, config=config, decoder=dec, tokenizer=None,
                     load_seconds=time.perf_counter() - t0)
    r = run_bench(lm, prompt_tokens, new_tokens, repetitions, compile=compile_,
                  progress=None if as_json else output.notice,
                  notice=output.notice)
    r["load_s"] = round(lm.load_seconds, 2)
    if as_json:
        sys.stdout.write(json.dumps(r) + "\n")
    else:
        click.echo(format_bench(r))
