"""Keys typed while a chat reply streams: not echoed into the reply, and discarded after it.

Between prompts the terminal is in its normal (cooked) mode, where the line discipline echoes
every key at once, so keys typed during a reply would land in the middle of the model's text.
:func:`hidden_typeahead` turns echo off for the reply (signals stay on: Ctrl-C still stops it) and
then drops what was typed, so the next prompt starts empty instead of sending keys the user never
saw. Reference: POSIX termios (``ECHO``, ``tcflush(TCIFLUSH)``), as ``getpass`` uses them.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def hidden_typeahead(stream):
    """Inside the block, a terminal ``stream`` (the chat's stdin) does not echo; on leaving, keys
    typed meanwhile are discarded and the terminal's settings restored. A stream that is not a
    terminal, or a platform without termios, is left alone."""
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
            termios.tcflush(fd, termios.TCIFLUSH)
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        except OSError:  # the terminal went away: nothing left to restore
            pass
