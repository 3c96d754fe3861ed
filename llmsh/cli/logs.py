"""``llmsh logs``: list, search and switch the conversation log; and the hooks that fill it.

The store is :mod:`llmsh.logstore`. :class:`ChatLogger` records each reply of a chat session
(:attr:`llmsh.session.ChatSession.on_reply`); :func:`record_generate` one ``generate``. A log
that cannot be used is one warning on stderr and the command goes on unlogged; it is never
overwritten.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import click

from . import output
from .common import CONTEXT_SETTINGS
from ..errors import InputError
from ..logstore import (Conversation, Exchange, LogError, LogStore, fts5_available, log_path,
                        logging_state, new_conversation_id, set_logging)

NO_LOG_HELP = ("Do not log this run (see 'llmsh logs'; also LLMSH_LOG=off, or 'llmsh logs off' "
               "for good).")


def no_log_option(f):
    """``--no-log``: do not record this run in the conversation log."""
    return click.option("--no-log", is_flag=True, help=NO_LOG_HELP)(f)


def open_for_logging(no_log: bool, warn: Callable[[str], None] = output.notice) -> LogStore | None:
    """The log to record this run in, or None: logging is off (``--no-log``, ``LLMSH_LOG=off``,
    ``llmsh logs off``) or the log cannot be used (then ``warn`` is told so, in one line)."""
    if no_log or not logging_state()[0]:
        return None
    try:
        return LogStore.open()
    except LogError as e:
        warn(f"warning: not logging this run: {e}")
        return None


def options(params, **more) -> dict:
    d = dict(vars(params)) if params is not None else {}
    d.update({k: v for k, v in more.items() if v is not None and v != ()})
    return d


def _stats_fields(st) -> dict:
    if st is None:
        return {}
    return dict(prompt_tokens=st.prompt_tokens, completion_tokens=st.generated_tokens,
                reused_tokens=st.reused_tokens, ttft_s=round(st.ttft_seconds, 6),
                prefill_s=round(st.prefill_seconds, 6), decode_s=round(st.decode_seconds, 6),
                finish_reason=st.finish_reason)


def record_generate(store: LogStore | None, lm, *, kind: str, system: str | None, prompt: str,
                    reply: str, stats, options: dict, warn: Callable[[str], None] = output.notice) -> None:
    """Record one ``generate`` (``kind`` "generate" in chat mode, "raw" with --raw) as a
    conversation of its own, and close ``store``. A reply cut short (Ctrl-C, a closed pipe; no
    finish reason in ``stats``) is recorded as far as it got, with finish reason "interrupted";
    one stopped before its first piece is not recorded. A failed write is one warning."""
    if store is None:
        return
    try:
        if stats.finish_reason is None:
            if not reply:
                return
            stats.finish_reason = "interrupted"
        store.record(Exchange(new_conversation_id(), kind, prompt, reply, model=lm.name,
                              model_path=str(lm.path), options=options, system=system,
                              **_stats_fields(stats)))
    except LogError as e:
        warn(f"warning: not logged: {e}")
    finally:
        store.close()


class ChatLogger:
    """Records the replies of one chat session; install as ``session.on_reply``.

    The conversation id and parent of each exchange follow the session's messages: a reply
    after a logged reply continues its conversation (parent: that exchange); ``/regen`` records
    a sibling of the reply it replaces; a first message (a new chat, ``/clear``) starts a new
    conversation, and so does a conversation read with ``/load``, whose earlier messages are
    then stored as the exchange's ``context``. The first failed write is one warning and turns
    logging off for the session."""

    def __init__(self, store: LogStore, warn: Callable[[str], None]):
        self.store, self.warn = store, warn
        # id(message) -> (message, conversation id, row id): the message is kept so that its id()
        # is not reused by another object.
        self._replies: dict[int, tuple] = {}
        self._prompts: dict[int, tuple] = {}

    def resume(self, conv: Conversation, messages: list) -> None:
        """``messages`` (the session's, rebuilt from ``conv``) continue ``conv``: the next reply
        is logged as its latest exchange's child."""
        if messages and messages[-1].role == "assistant":
            self._replies[id(messages[-1])] = (messages[-1], conv.id, conv.last_id)

    def __call__(self, session) -> None:
        msgs = session.messages
        if self.store is None or len(msgs) < 2 or msgs[-1].role != "assistant" or msgs[-2].role != "user":
            return
        reply, prompt = msgs[-1], msgs[-2]
        context = None
        known = self._prompts.get(id(prompt))
        if known is not None and known[0] is prompt:  # /regen: the same prompt answered again
            cid, parent = known[1], known[2]
        else:
            prev = self._replies.get(id(msgs[-3])) if len(msgs) >= 3 else None
            if prev is not None and prev[0] is msgs[-3]:
                cid, parent = prev[1], prev[2]
            else:
                cid, parent = new_conversation_id(), None
                context = [m.to_dict() for m in msgs[:-2]] or None
        m = session.model
        fields = _stats_fields(session.last_stats)
        if reply.ids is not None:  # an interrupted reply: the tokens it kept, not those computed
            fields["completion_tokens"] = len(reply.ids)
        try:
            row = self.store.record(Exchange(
                cid, "chat", prompt.content, reply.content, model=m.name, model_path=str(m.path),
                options=options(session.params, max_tokens=session.max_tokens, n_ctx=session.n_ctx),
                system=session.system, context=context, parent_id=parent, **fields))
        except LogError as e:
            self.warn(f"warning: logging stopped for this chat: {e}")
            self.store.close()
            self.store = None
            return
        self._prompts[id(prompt)] = (prompt, cid, parent)
        self._replies[id(reply)] = (reply, cid, row)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def attach(session, logger: ChatLogger | None, resume: Conversation | None,
           notice: Callable[[str], None]) -> None:
    """Set ``session`` up for the log: continue ``resume`` (its messages restored, the system
    message too unless the session has one), record replies with ``logger``."""
    from ..messages import Message

    if resume is not None:
        msgs = [Message(m["role"], m["content"], bool(m.get("interrupted"))) for m in resume.messages]
        session.restore(session.system or resume.system, msgs)
        notice(f"continuing conversation {resume.id} ({len(msgs)} messages)")
    if logger is not None:
        session.on_reply = logger
        if resume is not None:
            logger.resume(resume, session.messages)


def find_conversation(cid: str | None) -> Conversation:
    """The conversation to continue (``chat -c``: None, the latest; ``--cid ID``), read from the
    log whether or not logging is on.

    Raises LogError when there is no log, no such conversation, or the log is unusable."""
    with LogStore.open(create=False) as store:
        return store.conversation(cid)


# --- the command ----------------------------------------------------------------------------------

def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _json(ex: Exchange) -> dict:
    d = ex.to_dict()
    d["datetime_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ex.created))
    return d


def _text(ex: Exchange) -> str:
    tokens = (f" · {ex.prompt_tokens}+{ex.completion_tokens} tokens"
              if ex.prompt_tokens is not None else "")
    head = (f"# {_when(ex.created)} · conversation {ex.conversation_id} · {ex.model} · {ex.kind}"
            f"{tokens} · {ex.finish_reason or '?'}")
    system = f"system: {ex.system}\n\n" if ex.system else ""
    prompt = "\n".join("> " + line for line in ex.prompt.splitlines() or [""])
    return f"{head}\n\n{system}{prompt}\n\n{ex.reply}\n"


def _status() -> str:
    on, why = logging_state()
    path = log_path()
    lines = [f"Logging is {'on' if on else 'off'}" + ("" if why == "default" else f" ({why})"),
             f"Log: {path}"]
    if path.exists():
        try:
            with LogStore.open(create=False) as store:
                n, c = store.con.execute(
                    "SELECT count(*), count(DISTINCT conversation_id) FROM responses").fetchone()
            lines.append(f"{n} exchange{'s' if n != 1 else ''} in {c} conversation{'s' if c != 1 else ''}, "
                         f"{path.stat().st_size / 1024:.0f} KiB; full-text search: "
                         f"{'FTS5' if store.fts else 'LIKE (no FTS5)'}")
        except LogError as e:
            lines.append(f"unusable: {e}")
    else:
        lines.append("nothing logged yet")
    return "\n".join(lines)


@click.command("logs", context_settings=CONTEXT_SETTINGS,
               short_help="List or search logged chats and generations; switch logging.")
@click.argument("action", required=False, default="list",
                type=click.Choice(["list", "on", "off", "status", "path"]))
@click.option("-n", "--count", type=click.IntRange(0), default=10, show_default=True, metavar="N",
              help="How many exchanges to show (0: all).")
@click.option("-q", "--query", metavar="TEXT",
              help="Only exchanges whose prompt or reply has all of TEXT's words (SQLite FTS5 full-"
                   "text search, best match first; a plain substring match where this Python's "
                   "SQLite lacks FTS5).")
@click.option("--conversation", "--cid", "conversation", metavar="ID",
              help="Only this conversation (an id, or the start of one).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per exchange: id, conversation_id, parent_id, kind, model, "
                   "model_path, options, system, context, prompt, reply, prompt_tokens, "
                   "completion_tokens, reused_tokens, ttft_s, prefill_s, decode_s, finish_reason, "
                   "created (Unix seconds), datetime_utc.")
def logs(action, count, query, conversation, as_json):
    """List or search the log of past chats and generations, or switch logging on and off.

    Every chat turn and every generate is recorded in an SQLite database: logs.db in the user
    data folder (Linux: ~/.local/share/llmsh/logs.db; under $LLMSH_HOME when that is set;
    LLMSH_LOG_PATH names the file itself), created private (mode 0600). It holds the
    conversation id, model, options, system message, prompt, reply, token counts, timings and
    finish reason; a reply stopped by Ctrl-C is recorded as far as it got, with finish reason
    "interrupted". --no-log (chat, generate) or LLMSH_LOG=off skip the log for a run; "llmsh
    logs off" for good, until "llmsh logs on" (a marker file, logs-off, beside the database;
    LLMSH_LOG=on overrides it). "llmsh chat -c" continues the latest conversation, "--cid ID"
    another.

    ACTION: list (the default) the latest exchanges, oldest first, or the best matches of -q;
    on / off; status (on or off and why, where, how much); path (the database file).

    \b
    Examples:
      llmsh logs                       # the last 10 exchanges
      llmsh logs -q "capital france"   # search prompts and replies
      llmsh logs --json -n 0 | jq -r .reply
      llmsh logs --cid 3f2a9c | less   # one conversation
      llmsh chat -c                    # continue the latest conversation
      llmsh logs off
    """
    if action in ("on", "off"):
        set_logging(action == "on")
        click.echo(f"Logging is {action}" + (" (LLMSH_LOG in the environment overrides this)"
                                             if logging_state()[1].startswith("LLMSH_LOG") else ""))
        return
    if action == "status":
        click.echo(_status())
        return
    if action == "path":
        click.echo(str(log_path()))
        return
    if query is not None and not query.split():
        raise InputError("empty -q/--query: give words to search for")
    if not log_path().exists():
        output.notice(f"nothing logged yet ({log_path()})")
        return
    with LogStore.open(create=False) as store:
        if query is not None and not store.fts:
            output.notice("full-text search (FTS5) is not available in this Python's SQLite: "
                          "matching words as substrings instead" if not fts5_available()
                          else "this log has no full-text index: matching words as substrings")
        rows = store.query(count or None, text=query, conversation=conversation)
    if not rows:
        output.notice("no matching exchanges" if query or conversation else "nothing logged yet")
    for i, ex in enumerate(rows):
        if as_json:
            click.echo(json.dumps(_json(ex), ensure_ascii=False))
        else:
            click.echo(("\n" if i else "") + _text(ex), nl=False)
