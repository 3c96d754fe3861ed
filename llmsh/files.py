"""Files that llmsh writes for the user: written beside the target and moved into place at the
end, so that a failed or interrupted write leaves what was there before.

Only a regular file is replaced that way. Anything else at the path (a device such as
/dev/null or /dev/full, a FIFO, a terminal, /dev/stdout) is written through, as a shell's ``>``
would; a symbolic link is followed, so its target is replaced and the link kept.

Used by the engine (saved conversations) and the front ends (``perplexity --per-token``); it
never prints.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat

from .errors import InputError

# Paths that name an open file descriptor of this process: writing there means writing to that
# descriptor (as `cmd > /dev/stdout` does), never opening (and truncating) what it points at.
_FD_PATH = re.compile(r"^/(?:dev/(?:std(in|out|err)|fd/(\d+))|proc/self/fd/(\d+))$")
_STD_FDS = {"in": 0, "out": 1, "err": 2}


def _fd_of(path: str) -> int | None:
    m = _FD_PATH.match(os.path.normpath(path))
    if m is None:
        return None
    return _STD_FDS[m.group(1)] if m.group(1) else int(m.group(2) or m.group(3))


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class PendingFile:
    """A text file for ``path``: a regular file is written beside it and renamed over it by
    :meth:`commit`, so that a failed or interrupted write leaves an existing ``path`` as it was;
    anything else is written through.

    - A symbolic link is followed: its target is written (and replaced), the link stays.
    - A device, FIFO or terminal at ``path`` (after links), and ``/dev/stdout``,
      ``/dev/stderr``, ``/dev/fd/N``, ``/proc/self/fd/N`` (the open descriptor itself), are
      written directly; :meth:`commit` flushes, and :meth:`discard` only closes.
    - ``inputs``: paths being read by the same command (``"-"`` means stdin); a target that is
      the same file as one of them (same st_dev and st_ino) is refused, so that a typo cannot
      overwrite the text being processed.

    The temporary file (or the written-through file) is opened at once, so an unwritable
    directory fails early. On commit, an existing regular file keeps its mode; a new one gets
    ``new_mode``, or by default what a plain ``open()`` would give (0666 less the umask).
    :meth:`discard` (idempotent, also after a commit) removes the temporary file.

    Raises:
        InputError: ("cannot write PATH: reason") the path is empty or a directory, is one of
            ``inputs``, or creating, writing, flushing (ENOSPC on /dev/full) or renaming fails.
    """

    def __init__(self, path, new_mode: int | None = None, *, inputs=()) -> None:
        import tempfile

        self.path, self.new_mode, self.tmp = path, new_mode, None
        name = os.fspath(path)
        if not name:
            raise InputError("cannot write '': the file name is empty")
        fd = _fd_of(name)
        self.target = os.path.realpath(name) if fd is None else name
        try:
            st = os.stat(fd) if fd is not None else os.stat(self.target)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise self._error(e) from None
        if st is not None:
            self._refuse_inputs(st, inputs)
            if stat.S_ISDIR(st.st_mode):
                raise InputError(f"cannot write {path}: it is a directory")
        self.through = st is not None and not stat.S_ISREG(st.st_mode)
        try:
            if fd is not None:
                self.file = os.fdopen(os.dup(fd), "w", encoding="utf-8")
                self.through = True
            elif self.through:
                self.file = open(self.target, "w", encoding="utf-8")
            else:
                tfd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(self.target),
                                                 prefix=f".{os.path.basename(self.target)}.",
                                                 suffix=".tmp")
                self.file = os.fdopen(tfd, "w", encoding="utf-8")
        except OSError as e:
            raise self._error(e) from None

    def _refuse_inputs(self, st: os.stat_result, inputs) -> None:
        for src in inputs:
            try:
                other = os.fstat(0) if src == "-" else os.stat(src)
            except OSError:
                continue
            # stdin from a pipe or a terminal cannot be overwritten by writing a file.
            if src == "-" and not stat.S_ISREG(other.st_mode):
                continue
            if _same_file(st, other):
                what = "stdin" if src == "-" else src
                raise InputError(f"cannot write {self.path}: it is {what}, one of the inputs "
                                 "(choose another file)")

    def _error(self, e: OSError) -> InputError:
        return InputError(f"cannot write {self.path}: {e.strerror or e}")

    def write(self, text: str) -> None:
        try:
            self.file.write(text)
        except OSError as e:
            raise self._error(e) from None

    def commit(self) -> None:
        """Flush to disk and move the file into place (or, written through, flush and close)."""
        if self.through:
            try:
                self.file.flush()
                self.file.close()
            except OSError as e:
                self.discard()
                raise self._error(e) from None
            return
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            if os.path.exists(self.target):
                mode = os.stat(self.target).st_mode & 0o7777
            elif self.new_mode is not None:
                mode = self.new_mode
            else:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.fchmod(self.file.fileno(), mode)
            self.file.close()
            os.replace(self.tmp, self.target)
        except OSError as e:
            self.discard()
            raise self._error(e) from None
        self.tmp = None

    def discard(self) -> None:
        if self.through:
            with contextlib.suppress(OSError):  # e.g. the failed flush of /dev/full again
                self.file.close()
        elif self.tmp is not None:
            self.file.close()
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None
