"""Terminal and pipe I/O for the command line: stdin reading, streamed stdout, stderr notices.

The rules (the same as ``llm``, ``ripgrep`` and friends): model text goes to stdout, everything
else (notices, statistics, progress) to stderr; colour and progress bars only when the stream is
a terminal and ``NO_COLOR`` is unset or empty (https://no-color.org); piped output is plain text
without escape codes. rich is imported only where a terminal display is drawn, so that
``llmsh --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

import click

from ..errors import InputError

PROG = "llmsh"

# What read_stdin / read_file do with invalid UTF-8 when the caller does not say: a command's
# --errors sets it once, so that input read deeper down (chat's /read) follows the same option.
input_errors = "strict"
# Ranks other than 0 of a multi-process run print no notices or progress (llmsh.cli.ranks).
quiet = False


def is_terminal(stream) -> bool:
    """True when ``stream`` is an interactive terminal (False for pipes, files, CliRunner)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or fake streams
        return False


def stdin_is_terminal() -> bool:
    """True when stdin is a terminal, i.e. nothing is piped in."""
    return is_terminal(sys.stdin)


def color_enabled(stream) -> bool:
    """Colour only on a terminal, unless ``NO_COLOR`` is set to a non-empty value or TERM=dumb."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    return is_terminal(stream)


def stdout():
    return sys.stdout  # looked up at call time: click's CliRunner swaps the sys streams


def stderr():
    return sys.stderr


def error(message: str) -> None:
    """Print ``llmsh: error: MESSAGE`` as one line on stderr."""
    if quiet and os.environ.get("LLMSH_TP_CHILD"):
        return      # a rank started by --tp: rank 0 reports the error (its own, or ours as a lost peer)
    message = " ".join(str(message).split("\n")).strip() or "unknown error"
    click.echo(f"{PROG}: error: {message}", err=True)


def notice(message: str) -> None:
    """Print a one-line notice (``llmsh: MESSAGE``) on stderr, never on stdout."""
    if quiet:
        return
    click.echo(f"{PROG}: {message}", err=True)


def decode_bytes(data: bytes, *, errors: str | None = None, source: str = "stdin") -> str:
    """Decode UTF-8 input; ``errors="replace"`` substitutes U+FFFD for invalid bytes (default:
    :data:`input_errors`).

    Raises:
        InputError: ``data`` is not valid UTF-8 (with ``errors="strict"``), naming the byte offset.
    """
    try:
        return data.decode("utf-8", errors=errors or input_errors)
    except UnicodeDecodeError as e:
        raise InputError(
            f"{source} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); "
            "use --errors replace to substitute invalid bytes"
        ) from None


def read_stdin(*, errors: str | None = None) -> str:
    """Read all of stdin as text, exactly as given (no newline stripping). See :func:`decode_bytes`."""
    stream = sys.stdin
    data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8")
    return decode_bytes(data, errors=errors)


def read_file(path: str, *, errors: str | None = None) -> str:
    """Read a file (``-`` for stdin) as UTF-8 text.

    Raises:
        InputError: the file cannot be read or is not valid UTF-8.
    """
    if path == "-":
        return read_stdin(errors=errors)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_bytes(data, errors=errors, source=path)


class StdoutFile:
    """The ``-`` of a FILE option that writes (``--per-token -``): stdout, with the interface of
    :class:`llmsh.files.PendingFile` (write, commit = flush, discard = nothing)."""

    def write(self, text: str) -> None:
        stdout().write(text)

    def commit(self) -> None:
        stdout().flush()

    def discard(self) -> None:
        pass


def output_file(path: str, *, inputs=()):
    """A FILE option's writer: stdout for ``-``, else a :class:`llmsh.files.PendingFile`
    (replaced on commit, devices written through, ``inputs`` refused).

    Raises:
        InputError: see :class:`~llmsh.files.PendingFile`.
    """
    from ..files import PendingFile

    return StdoutFile() if path == "-" else PendingFile(path, inputs=inputs)


class StreamWriter:
    """Writes streamed model text to stdout as it comes, and ends the output with a newline.

    Flushes after every piece so that a reader at the other end of a pipe sees text as it is
    generated (Python block-buffers stdout when it is not a terminal).
    """

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else stdout()
        self.last = "\n"
        self.wrote = False

    def write(self, text: str) -> None:
        if not text:
            return
        self.stream.write(text)
        self.stream.flush()
        self.last = text[-1]
        self.wrote = True

    def finish(self) -> None:
        """End the output with a newline unless it already ends with one (or is empty)."""
        if self.wrote and self.last != "\n":
            self.stream.write("\n")
        elif not self.wrote:
            self.stream.write("\n")
        self.stream.flush()


@contextlib.contextmanager
def progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, only when stderr is a terminal; else a silent no-op.

    Yields ``update(done, total)``, the signature of the engine's ``progress`` callbacks.
    The bar disappears when the block ends, leaving the terminal clean for the results.
    """
    err = stderr()
    if quiet or not is_terminal(err):
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(file=err, no_color=not color_enabled(err))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


# A prompt prefilled in one forward pass (generate's chunk: 512 tokens) shows no bar: it takes a
# second or two; a longer one can take a minute on a CPU (7,800 tokens: 35-77 s).
PREFILL_PROGRESS_MIN_TOKENS = 513


class PrefillProgress:
    """``update(done, total)`` for the engine's ``on_prefill``: a transient rich bar, "prefill
    DONE/TOTAL tokens", on ``stream`` (default stderr) while a prompt of at least ``min_tokens``
    is prefilled; only on a terminal (silent on a pipe or file, and on ranks other than 0). The
    bar is gone when the prefill ends, before the reply is written; :meth:`close` removes it
    after an interruption."""

    def __init__(self, stream=None, min_tokens: int = PREFILL_PROGRESS_MIN_TOKENS):
        self.stream = stream if stream is not None else stderr()
        self.min_tokens = min_tokens
        self.enabled = not quiet and is_terminal(self.stream)
        self._bar = self._task = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < self.min_tokens:
            return
        if self._bar is None:
            if done >= total:
                return
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            console = Console(file=self.stream, no_color=not color_enabled(self.stream))
            self._bar = Progress(TextColumn("prefill"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("tokens"), TimeRemainingColumn(), console=console,
                                 transient=True)
            self._bar.start()
            self._task = self._bar.add_task("prefill", total=total)
        self._bar.update(self._task, completed=done, total=total)
        if done >= total:
            self.close()
        else:
            self._bar.refresh()  # one chunk is seconds: show it now, not at the next tick

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def human_bytes(n: int | float) -> str:
    """``123456789`` → ``"117.7 MiB"`` (binary units, one decimal)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_count(n: int) -> str:
    """``134515008`` → ``"134.5M"``."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def alternate_colors(pieces: list[str], stream) -> str:
    """Join ``pieces`` for display; on a colour terminal each piece alternates background colour
    so that token boundaries are visible (newlines in a piece are shown as ``\\n`` there)."""
    if not color_enabled(stream):
        return "".join(pieces)
    styles = ("\x1b[30;46m", "\x1b[30;43m")
    out = []
    # Empty pieces (a token that is only part of a character) show nothing: they take no colour
    # slot, so that the visible neighbours still alternate.
    for i, p in enumerate(p for p in pieces if p):
        shown = p.replace("\n", "\\n")
        out.append(f"{styles[i % 2]}{shown}\x1b[0m")
    return "".join(out)


def stats_line(st, *, context_used: int, n_ctx: int) -> str:
    """The one statistics line of ``generate --stats`` and ``chat --stats`` (stderr).

    ``st`` is a :class:`llmsh.generate.GenerationStats`; ``context_used`` the tokens in the KV
    cache afterwards, ``n_ctx`` the context size. Example::

        12 tokens, 25.3 tokens/s, TTFT 0.08 s, context 40/8192, reused 0/28 prompt tokens
        (350.1 tokens/s), total 0.55 s, finish: stop
    """
    rate = f"{st.decode_tokens_per_s:.1f} tokens/s" if st.decode_steps else "- tokens/s"
    prefill = f"{st.prefill_tokens_per_s:.1f} tokens/s" if st.prefill_seconds > 0 else "- tokens/s"
    return (f"{st.generated_tokens} tokens, {rate}, TTFT {st.ttft_seconds:.2f} s, "
            f"context {context_used}/{n_ctx}, "
            f"reused {st.reused_tokens}/{st.prompt_tokens} prompt tokens ({prefill}), "
            f"total {st.prefill_seconds + st.decode_seconds:.2f} s, "
            + (f"compile {st.compile_seconds:.1f} s, " if getattr(st, "compile_seconds", 0) else "")
            + f"finish: {st.finish_reason or 'interrupted'}")


#: Stages of a (stage, done, total) progress callback that count bytes (see llmsh.hub.Progress).
BYTE_STAGES = ("download", "verify")


def progress_amount(stage: str, done: int, total: int | None, speed: float | None = None) -> str:
    """How far a stage is, as text: ``"12.0 MiB / 88.6 MiB  3.1 MiB/s"`` for a byte stage,
    ``"12/272"`` otherwise."""
    if stage in BYTE_STAGES:
        text = human_bytes(done) + (f" / {human_bytes(total)}" if total else "")
        return text + (f"  {human_bytes(speed)}/s" if speed else "")
    return f"{done}/{total}" if total else str(done)


@contextlib.contextmanager
def stage_progress():
    """Yield a (stage, done, total) callback drawing rich progress bars on stderr when it is a
    terminal, or None on a pipe (nothing is printed there). The display starts at the first
    report, so wrapping work that may report nothing (a model load that needs no pull) costs
    nothing; it is removed when the block ends."""
    err = stderr()
    if quiet or not is_terminal(err):
        yield None
        return
    state: dict = {"tasks": {}}

    def update(stage: str, done: int, total: int | None) -> None:
        if "bar" not in state:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn
            from rich.text import Text

            class Amount(ProgressColumn):
                def render(self, task):
                    return Text(progress_amount(task.description, int(task.completed), task.total,
                                                task.speed))

            console = Console(file=err, no_color=not color_enabled(err))
            state["bar"] = Progress(SpinnerColumn(), TextColumn("{task.description:<10}"), BarColumn(),
                                    Amount(), console=console, transient=True)
            state["bar"].start()
        bar, tasks = state["bar"], state["tasks"]
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].stop()
