"""Files that llmsh writes for the user: written beside the target and moved into place at the
end, so that a failed or interrupted write leaves what was there before.

Used by the engine (saved conversations) and the front ends (``perplexity --per-token``); it
never prints.
"""

from __future__ import annotations

import contextlib
import os

from .errors import InputError


class PendingFile:
    """A text file written beside ``path`` and renamed over it by :meth:`commit`, so that a
    failed or interrupted write leaves an existing ``path`` as it was.

    The temporary file is created at once (so an unwritable directory fails early). On commit,
    an existing ``path`` keeps its mode; a new one gets ``new_mode``, or by default what a plain
    ``open()`` would give (0666 less the umask). :meth:`discard` (idempotent, also after a
    commit) removes the temporary file.

    Raises:
        InputError: ("cannot write PATH: reason") creating, writing or renaming fails.
    """

    def __init__(self, path, new_mode: int | None = None) -> None:
        import tempfile

        self.path, self.new_mode = path, new_mode
        target = os.path.abspath(os.fspath(path))
        try:
            fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(target),
                                            prefix=f".{os.path.basename(target)}.", suffix=".tmp")
        except OSError as e:
            raise self._error(e) from None
        self.file = os.fdopen(fd, "w", encoding="utf-8")

    def _error(self, e: OSError) -> InputError:
        return InputError(f"cannot write {self.path}: {e.strerror or e}")

    def write(self, text: str) -> None:
        try:
            self.file.write(text)
        except OSError as e:
            raise self._error(e) from None

    def commit(self) -> None:
        """Flush to disk and move the file into place."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            if os.path.exists(self.path):
                mode = os.stat(self.path).st_mode & 0o7777
            elif self.new_mode is not None:
                mode = self.new_mode
            else:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.fchmod(self.file.fileno(), mode)
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.discard()
            raise self._error(e) from None
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            self.file.close()
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None
