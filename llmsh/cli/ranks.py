"""The command line under torch.distributed: ``--tp N`` and torchrun.

``llmsh generate|perplexity|bench --tp N`` makes this process rank 0 of N and starts the other
ranks on this machine (:func:`llmsh.distributed.launch`); under ``torchrun`` the ranks are its
processes. Rank 0 reads stdin and writes stdout; the others get rank 0's input by broadcast and
stay silent (their stdout goes to /dev/null; notices are off). Under torchrun, ``perplexity``
without ``--tp`` shares the windows among the ranks (data parallel); ``generate`` and ``bench``
split the model (tensor parallel).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Callable, TypeVar

import click

from . import output

T = TypeVar("T")


def tp_option(f):
    """``--tp N``: tensor parallelism over N processes."""
    return click.option(
        "--tp", type=click.IntRange(1), default=None, metavar="N",
        help="Split the model over N processes on this machine (tensor parallel, torch.distributed: "
             "gloo on CPU, NCCL on CUDA). Under torchrun: the ranks it started.")(f)


def setup(tp: int | None, device: str, *, data_parallel: bool = False):
    """Join (or start) the process group for this command.

    Returns (ctx, mode): ctx a :class:`llmsh.distributed.Dist` or None for one process; mode
    "tp" (split the model), "dp" (share the inputs: ``data_parallel`` commands under torchrun
    without --tp) or None.

    Raises:
        click.UsageError: --tp disagrees with torchrun's number of processes.
    """
    from ..distributed import env_world_size

    world = env_world_size()
    if world == 1 and (tp is None or tp == 1):
        return None, None
    if world > 1 and tp is not None and tp != world:
        raise click.UsageError(f"--tp {tp} under torchrun with {world} processes: use --tp {world} "
                               "or leave --tp out")
    from .. import distributed

    if world == 1:
        children = distributed.launch(tp, sys.argv[1:])
        atexit.register(_reap, children)
    ctx = distributed.init("cuda" if device == "cuda" else "cpu")
    if ctx.rank > 0:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
        output.quiet = True
    click.get_current_context().call_on_close(distributed.shutdown)
    return ctx, ("tp" if tp or not data_parallel else "dp")


def shared(ctx, fn: Callable[[], T]) -> T:
    """``fn()`` computed on rank 0 only (it reads stdin or files), its value (or its error) on
    every rank. Without a group, just ``fn()``."""
    from ..errors import InputError, LlmshError

    if ctx is None:
        return fn()
    value = error = None
    if ctx.rank == 0:
        try:
            value = fn()
        except (LlmshError, click.ClickException) as e:
            error = (type(e).__name__, e.format_message() if isinstance(e, click.ClickException) else str(e))
    value, error = ctx.broadcast((value, error))
    if error is not None:
        if error[0] == "UsageError":
            raise click.UsageError(error[1])
        raise InputError(error[1])
    return value


def _reap(children) -> None:
    for p in children:
        try:
            p.wait(timeout=20)
        except Exception:  # a rank stuck on a peer that failed: stop it
            p.kill()
