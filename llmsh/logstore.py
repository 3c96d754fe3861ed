"""The conversation log: every ``chat`` turn and every ``generate``, kept in one SQLite file.

Where: ``$LLMSH_LOG_PATH`` when set (a file path), else ``logs.db`` under ``$LLMSH_HOME`` when
that is set, else ``logs.db`` in the platform's user data folder of llmsh (Linux:
``~/.local/share/llmsh/logs.db``). The folder is created 0700 and the file 0600: prompts can be
secrets. Logging is off when ``LLMSH_LOG`` is ``off`` (``0``, ``false``, ``no``), or when the
marker file ``logs-off`` lies beside the database (``llmsh logs off``, as ``llm`` has); ``LLMSH_LOG=on``
wins over the marker.

Rows (table ``responses``, schema version :data:`SCHEMA_VERSION` in ``PRAGMA user_version``):
one per exchange, with its conversation id, kind (``chat``: a REPL turn; ``generate``: a
one-shot chat-mode prompt; ``raw``: ``generate --raw``), model, options (JSON), system message,
prompt and reply text, token counts, timings (seconds), finish reason (``stop``, ``length``, or
``interrupted`` for a reply stopped by Ctrl-C: what was generated until then is recorded), and
``parent_id``: the exchange whose reply came just before this prompt in the conversation (so
``/regen`` and ``/undo`` give a tree whose branch ending at the latest row is the conversation
as the user left it). ``context`` holds the earlier messages (JSON) when they are not in the log
(a conversation opened with ``/load``).

Each exchange is written in one transaction after its reply has ended, so a crash mid-reply
records nothing of it and the file stays consistent. Two processes can log at once (WAL mode,
a busy timeout). A file that is not a database, or one from a newer llmsh, raises
:class:`LogError` and is never written. Prompt and reply text are indexed with FTS5 when this
Python's SQLite has it (:func:`fts5_available`); searches fall back to LIKE otherwise.

This module never prints.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LlmshError

SCHEMA_VERSION = 1
OFF_MARKER = "logs-off"
BUSY_TIMEOUT_S = 10.0
_OFF_WORDS = ("off", "0", "false", "no")
_ON_WORDS = ("on", "1", "true", "yes")

_SCHEMA = ["""
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    parent_id INTEGER REFERENCES responses(id),
    kind TEXT NOT NULL,
    model TEXT,
    model_path TEXT,
    options TEXT,
    system TEXT,
    context TEXT,
    prompt TEXT NOT NULL,
    reply TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    reused_tokens INTEGER,
    ttft_s REAL,
    prefill_s REAL,
    decode_s REAL,
    finish_reason TEXT,
    created REAL NOT NULL
)""", "CREATE INDEX IF NOT EXISTS responses_conversation ON responses(conversation_id, id)"]

# External-content FTS5 index over prompt and reply, kept in step by triggers (rows are only
# inserted; delete is there for a user who prunes the table by hand).
_FTS_SCHEMA = ["""
CREATE VIRTUAL TABLE IF NOT EXISTS responses_fts USING fts5(
    prompt, reply, content='responses', content_rowid='id')""", """
CREATE TRIGGER IF NOT EXISTS responses_ai AFTER INSERT ON responses BEGIN
    INSERT INTO responses_fts(rowid, prompt, reply) VALUES (new.id, new.prompt, new.reply);
END""", """
CREATE TRIGGER IF NOT EXISTS responses_ad AFTER DELETE ON responses BEGIN
    INSERT INTO responses_fts(responses_fts, rowid, prompt, reply)
        VALUES ('delete', old.id, old.prompt, old.reply);
END"""]

_COLUMNS = ("id", "conversation_id", "parent_id", "kind", "model", "model_path", "options", "system",
            "context", "prompt", "reply", "prompt_tokens", "completion_tokens", "reused_tokens",
            "ttft_s", "prefill_s", "decode_s", "finish_reason", "created")
_SELECT = ", ".join("r." + c for c in _COLUMNS)


class LogError(LlmshError):
    """The log cannot be used: unreadable, not a database, from a newer llmsh, or a failed write."""


def log_path() -> Path:
    """The database file: ``$LLMSH_LOG_PATH``, else ``$LLMSH_HOME/logs.db``, else ``logs.db`` in
    the platformdirs user data dir of llmsh."""
    env = os.environ.get("LLMSH_LOG_PATH")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("LLMSH_HOME")
    if home:
        return Path(home).expanduser() / "logs.db"
    import platformdirs

    return Path(platformdirs.user_data_dir("llmsh", appauthor=False)) / "logs.db"


def _marker(path: Path | None) -> Path:
    return (path or log_path()).parent / OFF_MARKER


def logging_state(path: Path | None = None) -> tuple[bool, str]:
    """Whether exchanges are logged, and why: ``(on, reason)`` with reason ``"LLMSH_LOG=..."``,
    ``"llmsh logs off"`` (the marker file) or ``"default"``."""
    env = os.environ.get("LLMSH_LOG", "").strip().lower()
    if env in _OFF_WORDS:
        return False, f"LLMSH_LOG={env}"
    if env in _ON_WORDS:
        return True, f"LLMSH_LOG={env}"
    if _marker(path).exists():
        return False, "llmsh logs off"
    return True, "default"


def set_logging(on: bool, path: Path | None = None) -> None:
    """Turn logging on (remove the marker file) or off (create it, making the folder if needed).

    Raises LogError when the marker cannot be written or removed."""
    marker = _marker(path)
    try:
        if on:
            marker.unlink(missing_ok=True)
        else:
            marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            marker.touch()
    except OSError as e:
        raise LogError(f"cannot {'remove' if on else 'create'} {marker}: {e.strerror or e}") from None


def fts5_available() -> bool:
    """Whether this Python's SQLite has the FTS5 full-text module."""
    try:
        con = sqlite3.connect(":memory:")
        try:
            con.execute("CREATE VIRTUAL TABLE t USING fts5(a)")
        finally:
            con.close()
        return True
    except sqlite3.Error:
        return False


def new_conversation_id() -> str:
    """A fresh conversation id: 12 hex digits (48 random bits)."""
    return secrets.token_hex(6)


@dataclass
class Exchange:
    """One logged prompt and reply (the fields of a ``responses`` row; ``options``, ``context``
    decoded from JSON; ``created``: Unix time in seconds)."""

    conversation_id: str
    kind: str
    prompt: str
    reply: str
    model: str | None = None
    model_path: str | None = None
    options: dict = field(default_factory=dict)
    system: str | None = None
    context: list[dict] | None = None
    parent_id: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reused_tokens: int | None = None
    ttft_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    finish_reason: str | None = None
    created: float = 0.0
    id: int | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return {name: getattr(self, name) for name in _COLUMNS}


@dataclass
class Conversation:
    """A conversation rebuilt from the log: its id, model (name and folder), system message,
    ``messages`` (``{"role", "content"[, "interrupted"]}`` dicts, oldest first) and ``last_id``,
    the row of the latest exchange."""

    id: str
    model: str | None
    model_path: str | None
    system: str | None
    messages: list[dict]
    last_id: int


class LogStore:
    """An open log database. Use :meth:`open`; close with :meth:`close` (or ``with``)."""

    def __init__(self, con: sqlite3.Connection, path: Path, fts: bool):
        self.con, self.path, self.fts = con, path, fts

    @classmethod
    def open(cls, path: Path | str | None = None, *, create: bool = True, fts: bool | None = None) -> "LogStore":
        """Open (``create``: and if need be create, private) the log at ``path`` (default
        :func:`log_path`). ``fts``: build the FTS5 index (default: when available).

        Raises LogError when the file cannot be opened or created, is not an SQLite database,
        or has a schema newer than this llmsh knows; nothing is written to it then."""
        path = Path(path) if path is not None else log_path()
        if not create and not path.exists():
            raise LogError(f"no log yet at {path}")
        try:
            if create and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
                os.chmod(path, 0o600)  # whatever the umask
            con = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise LogError(f"cannot open the log {path}: {getattr(e, 'strerror', None) or e}") from None
        try:
            store = cls(con, path, fts5_available() if fts is None else fts)
            store._setup()
            return store
        except sqlite3.Error as e:
            con.close()
            raise LogError(f"cannot use the log {path}: {e}") from None
        except BaseException:
            con.close()
            raise

    def _setup(self) -> None:
        con = self.con
        version = con.execute("PRAGMA user_version").fetchone()[0]  # fails first on a non-database
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"its schema version {version} is newer than this llmsh's "
                                        f"({SCHEMA_VERSION})")
        con.execute("PRAGMA busy_timeout = %d" % int(BUSY_TIMEOUT_S * 1000))
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode = WAL")  # persistent: set once, by whoever creates it
        con.execute("PRAGMA synchronous = NORMAL")   # WAL: durable at checkpoints, never corrupt
        if version < SCHEMA_VERSION:
            with self._transaction():
                if con.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:  # not raced
                    # Statement by statement: executescript would commit the transaction first.
                    for statement in _SCHEMA + (_FTS_SCHEMA if self.fts else []):
                        con.execute(statement)
                    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.fts = self.fts and con.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'responses_fts'").fetchone() is not None

    class _Tx:
        def __init__(self, con):
            self.con = con

        def __enter__(self):
            self.con.execute("BEGIN IMMEDIATE")  # take the write lock now (busy timeout applies)

        def __exit__(self, exc_type, exc, tb):
            # Any exception, KeyboardInterrupt included, rolls the whole exchange back; so does a
            # failed COMMIT (disk full), so that the connection is not left inside a transaction.
            try:
                self.con.execute("COMMIT" if exc_type is None else "ROLLBACK")
            except BaseException:
                if self.con.in_transaction:
                    self.con.execute("ROLLBACK")
                raise
            return False

    def _transaction(self):
        return self._Tx(self.con)

    def close(self) -> None:
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # --- writing --------------------------------------------------------------------------------

    def record(self, ex: Exchange) -> int:
        """Insert ``ex`` in one transaction; return its row id (also set on ``ex.id``).
        ``created`` defaults to now.

        Raises LogError when the write fails (disk full, read-only file, locked past the timeout)."""
        if not ex.created:
            ex.created = time.time()
        values = ex.to_dict()
        values["options"] = json.dumps(ex.options, ensure_ascii=False, sort_keys=True)
        values["context"] = None if ex.context is None else json.dumps(ex.context, ensure_ascii=False)
        names = [c for c in _COLUMNS if c != "id"]
        try:
            with self._transaction():
                cur = self.con.execute(
                    f"INSERT INTO responses ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                    [values[c] for c in names])
        except sqlite3.Error as e:
            raise LogError(f"cannot write the log {self.path}: {e}") from None
        ex.id = cur.lastrowid
        return ex.id

    # --- reading --------------------------------------------------------------------------------

    def query(self, n: int | None = 10, *, text: str | None = None,
              conversation: str | None = None) -> list[Exchange]:
        """Logged exchanges: the ``n`` latest (None: all), oldest first; with ``text``, the ``n``
        best matches of its words (all of them, in prompt or reply; FTS5 ranking, else a
        case-insensitive LIKE, newest first), best first; ``conversation``: only that one (an
        id or an unambiguous prefix of one).

        Raises LogError for an unknown or ambiguous conversation id, or an unreadable log."""
        where, args = [], []
        try:
            if conversation is not None:
                where.append("r.conversation_id = ?")
                args.append(self.resolve_conversation(conversation))
            words = (text or "").split()
            order = "r.id DESC"
            if words and self.fts:
                query = " ".join('"' + w.replace('"', '""') + '"' for w in words)
                sql = (f"SELECT {_SELECT} FROM responses_fts JOIN responses r ON r.id = responses_fts.rowid "
                       "WHERE responses_fts MATCH ?")
                args.insert(0, query)
                order = "responses_fts.rank, r.id DESC"
            else:
                sql = f"SELECT {_SELECT} FROM responses r WHERE 1"
                for w in words:
                    where.append("(r.prompt LIKE ? ESCAPE '\\' OR r.reply LIKE ? ESCAPE '\\')")
                    pat = "%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                    args += [pat, pat]
            sql += "".join(f" AND {w}" for w in where) + f" ORDER BY {order}"
            if n is not None:
                sql += " LIMIT ?"
                args.append(int(n))
            rows = [self._exchange(r) for r in self.con.execute(sql, args)]
        except sqlite3.Error as e:
            raise LogError(f"cannot read the log {self.path}: {e}") from None
        return rows if words else rows[::-1]

    def resolve_conversation(self, cid: str) -> str:
        """The full conversation id that ``cid`` is or begins. Raises LogError when none or
        several match."""
        pat = cid.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        found = [r[0] for r in self.con.execute(
            "SELECT DISTINCT conversation_id FROM responses WHERE conversation_id LIKE ? ESCAPE '\\' "
            "LIMIT 3", [pat])]
        if cid in found:
            return cid
        if not found:
            raise LogError(f"no conversation {cid!r} in the log ({self.path})")
        if len(found) > 1:
            raise LogError(f"conversation id {cid!r} is ambiguous: {', '.join(found[:2])}, ...")
        return found[0]

    def conversation(self, cid: str | None = None) -> Conversation:
        """The conversation ``cid`` (an id or unambiguous prefix; None: the one with the latest
        chat exchange, ``raw`` generations left out), rebuilt along ``parent_id`` from its latest
        exchange.

        Raises LogError when there is no such conversation (or none at all)."""
        try:
            if cid is None:
                row = self.con.execute("SELECT conversation_id FROM responses WHERE kind != 'raw' "
                                       "ORDER BY id DESC LIMIT 1").fetchone()
                if row is None:
                    raise LogError(f"no conversation in the log yet ({self.path})")
                cid = row[0]
            else:
                cid = self.resolve_conversation(cid)
            rows = {r.id: r for r in map(self._exchange, self.con.execute(
                f"SELECT {_SELECT} FROM responses r WHERE conversation_id = ? ORDER BY id", [cid]))}
        except sqlite3.Error as e:
            raise LogError(f"cannot read the log {self.path}: {e}") from None
        last = rows[max(rows)]
        chain, ex = [], last
        while ex is not None:
            chain.append(ex)
            ex = rows.get(ex.parent_id) if ex.parent_id is not None else None
        messages: list[dict] = list(chain[-1].context or [])
        for ex in reversed(chain):
            messages.append({"role": "user", "content": ex.prompt})
            reply = {"role": "assistant", "content": ex.reply}
            if ex.finish_reason == "interrupted":
                reply["interrupted"] = True
            messages.append(reply)
        return Conversation(cid, last.model, last.model_path, last.system, messages, last.id)

    @staticmethod
    def _exchange(row) -> Exchange:
        d = dict(zip(_COLUMNS, row))
        d["options"] = json.loads(d["options"]) if d.get("options") else {}
        d["context"] = json.loads(d["context"]) if d.get("context") else None
        return Exchange(**d)
