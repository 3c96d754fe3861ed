"""Saved conversations (``/save``, ``/load``): the ``llmsh-chat`` JSON file format on disk.

A file is a JSON object ``{"format": "llmsh-chat", "version": 1, "model": ..., "system": ...,
"messages": [{"role", "content"[, "interrupted"]}, ...]}``. Writes are atomic (temp file +
``os.replace``) and private by default, like the prompt history; a file that is not a saved
conversation is never overwritten by accident.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputError
from .files import PendingFile
from .messages import Message

SAVE_FORMAT = "llmsh-chat"
_MAX_SAVED_BYTES = 64 << 20


def write_conversation(path, data: dict, *, force: bool = False) -> Path:
    """Write ``data`` (a dict as :meth:`llmsh.session.ChatSession.to_dict` makes) as JSON to
    ``path`` atomically; return the expanded path.

    A new file is created with mode 0600 (a conversation can be private, like the prompt
    history); overwriting a file keeps that file's mode. An existing file that is not a saved
    llmsh conversation is only overwritten with ``force``.

    Raises InputError when the file cannot be written, or exists, is not a saved
    conversation and ``force`` is false."""
    path = Path(path).expanduser()
    text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    if path.exists() and not force and not is_saved_conversation(path):
        raise InputError(f"{path} exists and is not a saved llmsh conversation: not overwritten")
    pending = PendingFile(path, new_mode=0o600)
    try:
        pending.write(text)
        pending.commit()
    finally:
        pending.discard()
    return path


def read_conversation(path) -> tuple[str | None, list[Message]]:
    """The system message (None when there is none) and the messages of a file written by
    :func:`write_conversation`.

    Raises InputError when the file is missing, not JSON, or not a saved conversation."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a JSON file ({e})") from None
    if not _check_saved(data):
        raise InputError(f"{path}: not a saved llmsh conversation")
    return (data.get("system") or None,
            [Message(m["role"], m["content"], bool(m.get("interrupted"))) for m in data["messages"]])


def _check_saved(data) -> bool:
    msgs = data.get("messages") if isinstance(data, dict) else None
    return isinstance(msgs, list) and all(
        isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
        for m in msgs) and isinstance(data.get("system"), (str, type(None)))


def is_saved_conversation(path) -> bool:
    """Whether ``path`` holds a conversation written by :func:`write_conversation` (a JSON object
    with ``"format": "llmsh-chat"`` and well-formed messages). Never raises."""
    try:
        with open(Path(path).expanduser(), "rb") as f:
            # A conversation fits in a context, so a big file (a disk image, a model) is not one:
            # no need to read it all to say so.
            if os.fstat(f.fileno()).st_size > _MAX_SAVED_BYTES or f.read(1).lstrip()[:1] not in (b"{", b""):
                return False
            f.seek(0)
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == SAVE_FORMAT and _check_saved(data)
