"""Where the chat shell's text goes: replies on stdout as they stream, everything else on stderr.

Part of the REPL (:mod:`llmsh.cli.repl`): with :mod:`llmsh.cli.repl_commands`, the only chat code that
writes to the terminal. Colour (rich) only on a colour terminal without NO_COLOR; replies drawn as
Markdown (:mod:`llmsh.cli.markdown_view`) only when stdout is a terminal.
"""

from __future__ import annotations

from ..session import ChatSession


class Printer:
    """Writes replies (stdout) and everything else (stderr); rich styles only on a colour terminal.

    ``markdown``: draw replies as Markdown when stdout is a terminal (None: when it is one that can
    move the cursor, see :func:`llmsh.cli.markdown_view.default`); ``/set markdown`` changes it."""

    def __init__(self, stdout, stderr, markdown: bool | None = None):
        from . import markdown_view
        from .output import color_enabled, is_terminal

        self.out, self.err = stdout, stderr
        self.markdown = markdown_view.default(stdout) if markdown is None else markdown
        self._md_possible = is_terminal(stdout)  # never on a pipe: it gets the raw text
        self._md_console = self._view = None
        self._console = None
        if color_enabled(stderr):
            from rich.console import Console

            self._console = Console(file=stderr, highlight=False, markup=False, soft_wrap=True)

    def piece(self, text: str) -> None:
        """Print part of a reply: as it is, or into the Markdown view (started by the first piece)."""
        if self._view is None and self.markdown and self._md_possible:
            from .markdown_view import MarkdownStream

            if self._md_console is None:
                from rich.console import Console

                self._md_console = Console(file=self.out, highlight=False, markup=False, emoji=False)
            self._view = MarkdownStream(self._md_console, on_error=self.notice)
        if self._view is not None:
            self._view.feed(text)
            return
        self.out.write(text)
        self.out.flush()

    def end_reply(self, last: str | None) -> None:
        """End a reply whose last character was ``last``: finish the Markdown view, or end the line
        (None: the reply failed; raw text is left as it is)."""
        view, self._view = self._view, None
        if view is not None:
            view.close()
        elif last is not None and last != "\n":
            self.out.write("\n")
        self.out.flush()

    def markdown_status(self) -> str:
        """The ``markdown: on|off`` line of ``/set markdown`` and ``/show``."""
        from .markdown_view import describe

        return describe(self.markdown, self.out)

    def info(self, text: str, style: str = "dim") -> None:
        if self._view is not None:
            self._view.clear_live()  # a notice mid-reply: on a clean line, not inside the live area
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
        if hasattr(getattr(session, "on_prefill", None), "close"):  # Ctrl-C during the prefill: remove its bar
            session.on_prefill.close()
        p.end_reply(last)
        if not interactive:
            raise
        p.info(INTERRUPTED.get(getattr(session, "last_interrupt", None), "[interrupted]"), "yellow")
    except BaseException:
        p.end_reply(None)  # e.g. an error from the model: the Markdown view is closed all the same
        raise
    else:
        p.end_reply(last)
        if getattr(session, "context_full", False):
            p.info(f"[context full: {session.n_ctx} tokens; raise --n-ctx or /clear]", "yellow")
    if show_stats:
        p.info(stats_line(session))
