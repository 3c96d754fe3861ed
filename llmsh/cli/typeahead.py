"""Keys typed while a chat reply streams: not echoed into the reply, kept for the next prompt.

Between prompts the terminal is in its normal (cooked) mode, where the line discipline echoes
every key at once, so keys typed during a reply would land in the middle of the model's text.
:func:`hidden_typeahead` turns echo off for the reply (signals stay on: Ctrl-C still stops it).
The keys stay in the terminal's input queue and reach the next prompt, where the line editor
shows them: typing ahead works as in a shell, without garbling the reply. Reference: POSIX
termios (``ECHO``), as ``getpass`` uses it.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def hidden_typeahead(stream):
    """Inside the block, a terminal ``stream`` (the chat's stdin) does not echo what is typed;
    on leaving, the terminal's settings are restored. A stream that is not a terminal, or a
    platform without termios, is left alone."""
    try:
        import termios

        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, AttributeError, ValueError, OSError):  # not a terminal (or no fd at all)
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHONL)  # lflag: no echo; ISIG stays, so Ctrl-C works
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSANOW, saved)  # TCSANOW: typed keys stay queued
        except OSError:  # the terminal went away: nothing left to restore
            pass
