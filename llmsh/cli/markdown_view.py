"""Chat replies drawn as Markdown on a terminal (``llmsh chat --markdown``), live while they stream.

Part of the chat shell's output (:mod:`llmsh.cli.repl_output`), used only when stdout is a
terminal: piped replies stay the raw text, byte for byte. The conversation keeps the raw text
(``/save`` and the conversation log record it); this module only draws it, with rich.

rich's ``Live`` can only redraw what is still on the screen, so a reply taller than the terminal
would be drawn twice if it were one live renderable. Instead the text is cut into Markdown blocks
(markdown-it, the parser rich uses): the blocks before the last are complete, since later text
does not change how they render, and are printed once above the live area; only the last block
is redrawn as it grows. When that block is taller than the screen (a long code block or list),
its top lines are printed too: appending text does not change the lines of a code block or of a
paragraph already wrapped, so the live area always fits on the screen.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time

from .output import is_terminal


def default(stdout) -> bool:
    """The ``--markdown`` default: on when ``stdout`` is a terminal that can move the cursor
    (not ``TERM=dumb``)."""
    import os

    return is_terminal(stdout) and os.environ.get("TERM") != "dumb"


def describe(setting: bool, stdout) -> str:
    """``markdown: on`` / ``off`` for ``/set`` and ``/show``, saying when stdout is not a terminal
    (then replies are printed raw whatever the setting)."""
    if not setting:
        return "markdown: off"
    if not is_terminal(stdout):
        return "markdown: on, but stdout is not a terminal: replies are printed as raw text"
    return "markdown: on"


def parse_switch(value: str) -> bool:
    """``on``/``off`` (also yes/no, true/false, 1/0) as a bool; ValueError for anything else."""
    v = value.strip().lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise ValueError(value)


class MarkdownStream:
    """Draws text fed piece by piece as Markdown on ``console`` (a rich Console on a terminal).

    :meth:`feed` redraws at most ``refresh_per_second`` times a second, and less often when a
    redraw is slow (each renders the last Markdown block again; drawing every token would cost
    more than generating it, and the reply is generated only while nothing is drawn);
    :meth:`close` draws the rest and stops the live display, leaving everything on the screen and
    the cursor at the start of the line after it. Ctrl-C during a redraw is held until the redraw
    is done (then raised), so that the screen and this object never disagree.
    """

    def __init__(self, console, *, refresh_per_second: float = 8.0, code_theme: str = "monokai",
                 on_error=None, clock=None):
        self.console = console
        self.clock = clock or time.monotonic  # seconds, for the redraw throttle
        self.on_error = on_error  # told (one line) when drawing fails: the raw text follows
        self.code_theme = code_theme
        self._interval = 1.0 / refresh_per_second
        self._text = ""      # everything fed so far (the raw reply)
        self._done = 0       # characters of _text whose blocks are printed for good
        self._chunks = 0     # groups of blocks printed for good
        self._after_rule = False  # the last block printed for good is a rule (---)
        self._shown = 0      # lines of the last block's rendering already printed (it was tall)
        self._live = None
        self._next_draw = 0.0  # clock() from when feed() may redraw
        self._closed = False
        self._failed = False   # drawing failed: the raw text is written instead

    @property
    def text(self) -> str:
        """The raw text fed so far."""
        return self._text

    def feed(self, text: str) -> None:
        """Add ``text`` to the reply; redraw when the last redraw is old enough."""
        self._text += text
        if self._failed:
            self._write(text)
        elif self.clock() >= self._next_draw:
            start = self.clock()
            self._safely(self._draw)
            took = self.clock() - start
            # After a slow redraw (a long code block is highlighted again each time) the next waits
            # three times as long as it took: drawing takes at most a quarter of the time.
            self._next_draw = start + max(self._interval, 4 * took)

    def clear_live(self) -> None:
        """Blank the live area (before something else, e.g. a notice on stderr, is written to the
        terminal); the next redraw draws it again below that."""
        if self._live is not None and not self._failed:
            self._safely(lambda: self._live.update(_Lines([]), refresh=True))
            self._next_draw = 0.0

    def close(self) -> None:
        """Draw the whole text and stop the live display (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not self._failed:
            self._safely(self._finish)
        if self._failed and self._text and not self._text.endswith("\n"):
            self._write("\n")

    def _finish(self) -> None:
        if self._live is None:
            lines = self._lines(self._text)
            if lines:
                self.console.print(_Lines(lines))
            return
        try:
            lines = self._lines(self._text[self._done:])
            self._live.update(_Lines(lines[self._shown:]))
        finally:
            self._live.stop()  # its last refresh draws the rest in place, then ends the line

    def _safely(self, draw) -> None:
        """Run ``draw`` with Ctrl-C held; if it fails (a bug in rendering some text), stop the live
        display, say so, and write the raw text so far: the chat goes on, nothing is lost."""
        try:
            with _sigint_held():
                draw()
        except Exception as e:  # noqa: BLE001  (any rendering error: the reply must still be shown)
            self._failed = True
            with contextlib.suppress(Exception):
                if self._live is not None:
                    self._live.stop()
            if self.on_error is not None:
                self.on_error(f"cannot draw the reply as Markdown ({type(e).__name__}: {e}); "
                              "the raw text follows")
            self._write("\n" + self._text)

    def _write(self, text: str) -> None:
        self.console.file.write(text)
        self.console.file.flush()

    # --- drawing ---------------------------------------------------------------------------------

    def _draw(self) -> None:
        tail = self._text[self._done:]
        printed = []
        blocks = _blocks(tail)
        if len(blocks) > 1 and blocks[-1][0] > 0:
            # The blocks before the last are complete: print them (less what is already printed).
            cut = blocks[-1][0]
            printed += self._lines(tail[:cut])[self._shown:]
            self._done += cut
            self._after_rule = blocks[-2][1] == "hr"
            self._chunks += 1
            self._shown = 0
            tail = tail[cut:]
        lines = self._lines(tail)
        room = max(2, self.console.height - 2)
        if len(lines) - self._shown > room:
            keep = len(lines) - room // 2
            printed += lines[self._shown:keep]
            self._shown = keep
        if self._live is None:
            if not printed and not lines:
                return
            from rich.live import Live

            self._live = Live(console=self.console, auto_refresh=False, transient=False,
                              redirect_stdout=False, redirect_stderr=False, vertical_overflow="visible")
            self._live.start()
        self._live.update(_Lines(lines[self._shown:]), refresh=not printed)
        if printed:
            self.console.print(_Lines(printed))  # above the live area, which is drawn again below

    def _lines(self, source: str) -> list:
        """``source`` (whole blocks, the first starting where the printed text ends) rendered as
        Markdown: a list of lines (lists of rich Segments), the same lines as they have in the
        rendering of the whole text."""
        if not source.strip():
            return []
        from rich.markdown import Markdown

        def render(text):
            return self.console.render_lines(Markdown(text, code_theme=self.code_theme),
                                             self.console.options, pad=False, new_lines=False)

        skip = 0
        if self._chunks:
            # rich puts a blank line before a block unless it is the first or follows a rule:
            # render it after a stand-in for the block before it, and drop the stand-in's lines.
            before = "---\n\n" if self._after_rule else "x\n\n"
            skip = len(render(before))
            source = before + source
        return [_rstrip(line) for line in render(source)[skip:]]


class _Lines:
    """A renderable of already rendered lines (lists of Segments)."""

    def __init__(self, lines: list):
        self.lines = lines

    def __rich_console__(self, console, options):
        from rich.segment import Segment

        for line in self.lines:
            yield from line
            yield Segment.line()


def _rstrip(line: list) -> list:
    """``line`` without trailing spaces that have no background colour (rich pads paragraphs to
    the full width; copied text should not end in spaces). Code blocks keep their background."""
    from rich.segment import Segment

    line = list(line)
    while line:
        seg = line[-1]
        if seg.control or (seg.style is not None and seg.style.bgcolor is not None):
            break
        text = seg.text.rstrip(" ")
        if text:
            line[-1] = Segment(text, seg.style)
            break
        line.pop()
    return line


_parser = None


def _blocks(source: str) -> list[tuple[int, str]]:
    """The top-level Markdown blocks of ``source``: (offset where each starts, markdown-it token
    type, e.g. ``paragraph_open``, ``fence``, ``hr``)."""
    global _parser
    if _parser is None:
        from markdown_it import MarkdownIt

        _parser = MarkdownIt().enable("strikethrough").enable("table")  # as rich.markdown parses
    starts = [(t.map[0], t.type) for t in _parser.parse(source) if t.level == 0 and t.map and t.nesting >= 0]
    # Line numbers as markdown-it counts them: it reads \r\n and a lone \r as line breaks too.
    offsets = [0] + [m.end() for m in re.finditer(r"\r\n?|\n", source)]
    return [(offsets[line], kind) for line, kind in starts]


@contextlib.contextmanager
def _sigint_held():
    """Hold Ctrl-C (SIGINT) until the block is done, then act on it as the handler would have.

    A KeyboardInterrupt in the middle of a redraw would leave half an escape sequence on the
    terminal, or lines printed that this object does not know were printed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(frame))
    except (ValueError, OSError):  # no signals here (e.g. an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            if callable(old):
                old(signal.SIGINT, got[0])
            elif old != signal.SIG_IGN:
                raise KeyboardInterrupt
