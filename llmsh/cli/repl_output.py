"""Where the chat shell's text goes: replies on stdout as they stream, everything else on stderr.

Part of the REPL (:mod:`llmsh.cli.repl`): with :mod:`llmsh.cli.repl_commands`, the only chat code that
writes to the terminal. Colour (rich) only on a colour terminal without NO_COLOR.
"""

from __future__ import annotations

from ..session import ChatSession


class Printer:
    """Writes replies (stdout) and everything else (stderr); rich styles only on a colour terminal."""

    def __init__(self, stdout, stderr):
        from .output import color_enabled

        self.out, self.err = stdout, stderr
        self._console = None
        if color_enabled(stderr):
            from rich.console import Console

            self._console = Console(file=stderr, highlight=False, markup=False, soft_wrap=True)

    def piece(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def info(self, text: str, style: str = "dim") -> None:
        if self._console is not None:
            self._console.print(text, style=style)
        else:
            self.err.write(text + "\n")
            self.err.flush()

    def error(self, text: str) -> None:
        self.info(f"error: {text}", style="bold red")

    def notice(self, text: str) -> None:
        self.info(f"llmsh: {text}", style="yellow")


def stats_line(session: ChatSession) -> str:
    """The ``--stats`` line after a reply, in :func:`llmsh.cli.output.stats_line`'s format (shared with
    ``generate --stats``); its context figure is :attr:`ChatSession.context_used`, as in ``/show``."""
    from .output import stats_line as format_stats

    if session.last_stats is None:
        return "no reply yet"
    return format_stats(session.last_stats, context_used=session.context_used, n_ctx=session.n_ctx)


# What Ctrl-C left, by ChatSession.last_interrupt: the marker after an interrupted reply.
INTERRUPTED = {
    "partial reply kept": "[interrupted: the partial reply is kept; /regen for a new one, /undo to drop it]",
    "message dropped": "[interrupted before the reply began: your message was not kept; "
                       "press Up to recall it]",
    "previous reply kept": "[interrupted before the new reply began: the previous reply is kept]",
}


def print_reply(session: ChatSession, reply, p: Printer, show_stats: bool, *, interactive: bool = True) -> None:
    """Print a reply iterator as it comes; Ctrl-C stops it and keeps the session consistent
    (and, when not interactive, propagates so that the command exits), with a marker that says
    what was kept. A reply cut by a full context ends with a marker too."""
    last = "\n"
    try:
        for piece in reply:
            p.piece(piece)
            last = piece[-1]
    except KeyboardInterrupt:
        reply.close()
        if hasattr(session.on_prefill, "close"):  # Ctrl-C during the prefill: remove its bar
            session.on_prefill.close()
        if last != "\n":
            p.piece("\n")
        if not interactive:
            raise
        p.info(INTERRUPTED.get(session.last_interrupt, "[interrupted]"), "yellow")
    else:
        if last != "\n":
            p.piece("\n")
        else:
            p.out.flush()
        if session.context_full:
            p.info(f"[context full: {session.n_ctx} tokens; raise --n-ctx or /clear]", "yellow")
    if show_stats:
        p.info(stats_line(session))
