"""The interactive chat shell (``llmsh chat``): prompt-toolkit input, slash commands, streamed replies.

With a terminal on stdin: a prompt-toolkit session (line editing, history in the user data
directory, ``\\`` and ``\"\"\"`` multi-line input, bracketed paste, tab completion of slash commands).
Without one (``echo hi | llmsh chat``): the whole of stdin is one message, the reply is printed,
and the function returns 0. Model text goes to stdout; notices, errors and statistics to stderr;
colour only on a terminal without NO_COLOR. The conversation itself lives in
:class:`llmsh.session.ChatSession`; the slash commands in :mod:`llmsh.cli.repl_commands`; reply and
notice printing in :mod:`llmsh.cli.repl_output`. This module reads the input and runs the loop.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import InputError, LlmshError
from .repl_commands import ALIASES, COMMANDS, FORCED, PARAMS, SlashCommands, context_text, preview
from .repl_output import Printer, print_reply, stats_line
from .typeahead import hidden_typeahead
from ..session import ChatSession

# Re-exported: the CLI and tests import these from here.
__all__ = ["run_chat", "read_message", "split_command", "history_path", "COMMANDS", "ALIASES", "FORCED", "PARAMS",
           "EXIT_HINT", "context_text", "preview", "stats_line"]

REPLYING_COMMANDS = ("/regen", "/read")  # the slash commands that stream a reply
EXIT_HINT = "(to leave, type /exit or press Ctrl-D)"


def history_path() -> Path:
    """The prompt history file: ``chat_history`` in the platformdirs user data dir of llmsh."""
    import platformdirs

    return Path(platformdirs.user_data_dir("llmsh", appauthor=False)) / "chat_history"


def _open_history(path: Path):
    """A FileHistory at ``path``, created private (dir 0700, file 0600): prompts can be secrets."""
    from prompt_toolkit.history import FileHistory

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)
    return FileHistory(str(path))


def _message_history(inner):
    """A prompt-toolkit History over ``inner`` that stores whole messages, not lines.

    prompt-toolkit adds every accepted line, so a message typed over several lines (``\\`` or
    ``\"\"\"``) would be recalled line by line; here those per-line additions are ignored and the
    REPL adds each message once it is complete (:meth:`add_message`), so Up recalls it whole."""
    from prompt_toolkit.history import History

    class MessageHistory(History):
        def load_history_strings(self):
            return inner.load_history_strings()

        def store_string(self, string: str) -> None:
            inner.store_string(string)

        def append_string(self, string: str) -> None:
            pass  # one line of a message: see add_message

        def add_message(self, text: str) -> None:
            strings = self.get_strings()
            if not strings or strings[-1] != text:  # as prompt-toolkit: no immediate repeats
                History.append_string(self, text)

    return MessageHistory()


def _completer():
    from prompt_toolkit.completion import Completer, Completion

    class SlashCompleter(Completer):
        """Completes command names at the start of a line, and parameter names after /set."""

        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            if " " not in text:
                for name in list(COMMANDS) + list(ALIASES):
                    if name.startswith(text.lower()):
                        yield Completion(name, start_position=-len(text), display_meta=COMMANDS.get(name, ""))
            elif text.lower().startswith("/set ") and text.count(" ") == 1:
                word = text[5:]
                for name in PARAMS:
                    if name.startswith(word.lower()):
                        yield Completion(name, start_position=-len(word))

    return SlashCompleter()


def _key_bindings():
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("c-c")
    def _(event):
        # Ctrl-C with text discards the line (like a shell); on an empty line it asks how to leave.
        buf = event.app.current_buffer
        if buf.text:
            buf.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt(), style="class:aborting")

    return kb


def read_message(prompt, notice=None) -> str:
    """Read one message with ``prompt(text) -> line``: a line ending in ``\\`` continues on the next
    line; a line starting with ``\"\"\"`` opens a block that ends at a line ending in ``\"\"\"``.

    Ctrl-D (EOFError) on a continuation line ends the message there, as the closing ``\"\"\"``
    would (``notice`` is told so): the text typed so far is sent, not lost. Raises EOFError at
    the first prompt and KeyboardInterrupt as ``prompt`` does."""
    def more(lines):
        try:
            return prompt("... ")
        except EOFError:
            if notice is not None:
                what = "sending the text typed so far" if "".join(lines).strip() else "nothing to send"
                notice(f"Ctrl-D ended the multi-line input: {what}")
            return None

    line = prompt(">>> ")
    if line.lstrip().startswith('"""'):
        first = line.lstrip()[3:]
        if first.rstrip().endswith('"""'):
            return first.rstrip()[:-3]
        lines = [first]
        while True:
            line = more(lines)
            if line is None:
                break
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                break
            lines.append(line)
        # Delimiters alone on their lines are not part of the text.
        if lines[0] == "":
            lines.pop(0)
        if lines and lines[-1] == "":
            lines.pop()
        return "\n".join(lines)
    lines = []
    while line is not None and line.endswith("\\"):
        lines.append(line[:-1])
        line = more(lines)
    if line is not None:
        lines.append(line)
    return "\n".join(lines)


def split_command(text: str) -> tuple[str | None, str]:
    """(slash command, None) or (None, message) for one input: a single line starting with ``/``
    is a command, except that ``//`` escapes it (``//usr/bin is what?`` sends ``/usr/bin is
    what?``); anything else, multi-line input included, is a message."""
    stripped = text.strip()
    if stripped.startswith("//"):
        return None, text.lstrip()[1:]
    if stripped.startswith("/") and "\n" not in stripped:
        return text, ""
    return None, text


def run_chat(model, *, system: str | None = None, params=None, max_tokens: int | None = None,
             n_ctx: int | None = None, stats: bool = False, history: bool | str | Path = True,
             input=None, output=None, stdin=None, stdout=None, stderr=None,
             interactive: bool | None = None, log=None, resume=None,
             session: ChatSession | None = None, markdown: bool | None = None) -> int:
    """Run ``llmsh chat`` on ``model`` (a LoadedModel); return the exit status (0).

    Args:
        system, params (SamplingParams; default: :func:`llmsh.sampling.chat_params` of the
            model's generation_config), max_tokens,
            n_ctx: see :class:`ChatSession`.
        stats: print a statistics line after each reply.
        history: True: the history file of :func:`history_path`; a path: that file; False: none.
        input, output: prompt-toolkit Input / Output (tests pass a pipe input and DummyOutput).
        stdin, stdout, stderr: text streams (default sys.*): stdin is read whole when not
            interactive; replies go to stdout, notices and statistics to stderr.
        interactive: default: True when ``input`` is given or stdin is a terminal.
        log, resume: a :class:`llmsh.cli.logs.ChatLogger` to record each reply; a logged
            :class:`llmsh.logstore.Conversation` to continue (see :func:`llmsh.cli.logs.attach`).
        session: a session to use instead of one built on ``model`` (client mode: the server's).
        markdown: draw replies as Markdown when stdout is a terminal (default: when it is one;
            see :class:`llmsh.cli.repl_output.Printer`); never on a pipe.

    Raises:
        InputError: not interactive and stdin is empty, or the message does not fit the context.
        LlmshError: other errors outside the REPL loop (inside it they are printed and it goes on).
    """
    from .output import is_terminal

    stdin = stdin if stdin is not None else sys.stdin
    p = Printer(stdout if stdout is not None else sys.stdout, stderr if stderr is not None else sys.stderr,
                markdown=markdown)
    if session is None:
        if params is None:
            from ..sampling import chat_params

            params = chat_params(model.generation_config)
        from .output import PrefillProgress

        session = ChatSession(model, system=system, params=params, max_tokens=max_tokens, n_ctx=n_ctx,
                              notice=p.notice, on_prefill=PrefillProgress(p.err))
    if log is not None or resume is not None:
        from .logs import attach

        attach(session, log, resume, p.notice)
    if interactive is None:
        interactive = input is not None or is_terminal(stdin)
    if not interactive:
        text = stdin.read()
        if not text.strip():
            raise InputError("no message on stdin (pipe one in, e.g. echo hi | llmsh chat)")
        print_reply(session, session.send(text.rstrip("\n")), p, stats, interactive=False)
        return 0
    return _loop(session, p, stats, history, input, output)


def _prompt_output(stdout, stderr):
    """The prompt-toolkit Output for the prompt and line editor, and a file to close after.

    The editor belongs on the terminal, whichever stream that is: stdout when it is one, else
    stderr, else /dev/tty, so that ``llmsh chat > file`` or ``llmsh chat | tee log`` still shows
    the prompt and leaves stdout with nothing but the replies (no escape codes). prompt-toolkit's
    default would draw on stdout regardless.
    """
    from prompt_toolkit.output import create_output

    from .output import is_terminal

    for stream in (stdout, stderr):
        if is_terminal(stream):
            return create_output(stdout=stream), None
    try:
        tty = open("/dev/tty", "w", encoding="utf-8")
    except OSError:
        return create_output(stdout=stderr), None  # plain text: still no codes on stdout
    return create_output(stdout=tty), tty


def _loop(session: ChatSession, p: Printer, stats: bool, history, input, output) -> int:
    tty = None
    if output is None:
        output, tty = _prompt_output(p.out, p.err)
    try:
        return _prompt_loop(session, p, stats, history, input, output)
    finally:
        if tty is not None:
            tty.close()


def _prompt_loop(session: ChatSession, p: Printer, stats: bool, history, input, output) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    hist = InMemoryHistory()
    if history:
        path = history_path() if history is True else Path(history).expanduser()
        try:
            hist = _open_history(path)
        except OSError as e:
            p.notice(f"history disabled: cannot open {path}: {e.strerror or e}")
    hist = _message_history(hist)
    ps = PromptSession(history=hist, completer=_completer(), complete_while_typing=False,
                       key_bindings=_key_bindings(), input=input, output=output)
    keys = sys.stdin if input is None else None  # the terminal prompt-toolkit reads
    state = {"stats": stats}
    commands = SlashCommands(session, p, state)
    p.info(f"llmsh chat with {getattr(session.model, 'name', None) or session.model.path.name}: /help for commands, Ctrl-D to leave")
    while True:
        try:
            text = read_message(lambda prompt: ps.prompt(prompt), notice=lambda t: p.info(t, "yellow"))
        except KeyboardInterrupt:
            p.info(EXIT_HINT)
            continue
        except EOFError:
            break
        if not text.strip():
            continue
        hist.add_message(text)
        command, message = split_command(text)
        # Keys typed during a reply do not echo into it (they reach the next prompt instead).
        replies = command is None or command.split()[0].lower() in REPLYING_COMMANDS
        try:
            with hidden_typeahead(keys if replies else None):
                if command is not None:
                    if commands.run(command):
                        break
                else:
                    print_reply(session, session.send(message), p, state["stats"])
        except LlmshError as e:
            p.error(str(e))
        except KeyboardInterrupt:
            p.info("[interrupted]", "yellow")
    return 0
