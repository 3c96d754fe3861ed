"""The interactive chat shell (``llmsh chat``): prompt-toolkit input, slash commands, streamed replies.

With a terminal on stdin: a prompt-toolkit session (line editing, history in the user data
directory, ``\\`` and ``\"\"\"`` multi-line input, bracketed paste, tab completion of slash commands).
Without one (``echo hi | llmsh chat``): the whole of stdin is one message, the reply is printed,
and the function returns 0. Model text goes to stdout; notices, errors and statistics to stderr;
colour only on a terminal without NO_COLOR. The conversation itself lives in
:class:`llmsh.session.ChatSession`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import InputError, LlmshError
from .session import ChatSession

COMMANDS = {
    "/help": "show this help",
    "/exit": "leave (also /quit or Ctrl-D)",
    "/clear": "start a new conversation (keeps the system message)",
    "/undo": "drop the last exchange",
    "/regen": "regenerate the last reply",
    "/system": "/system TEXT sets the system message; /system alone removes it",
    "/set": "/set PARAM VALUE: " + ", ".join(["temperature", "top_k", "top_p", "min_p",
                                              "repetition_penalty", "max_tokens", "seed"])
            + "; /set max_tokens none (or off, 0): no limit; /set seed none: unseeded",
    "/show": "model, parameters, context use, template",
    "/save": "/save FILE: write the conversation as JSON (a new file is private, mode 0600; "
             "overwriting keeps the file's mode); a file that is not a saved conversation is "
             "only replaced with /save! FILE",
    "/load": "/load FILE: read a conversation saved with /save; it replaces the current one, "
             "which must be saved first unless you use /load! FILE",
    "/read": "/read FILE: send the file's contents as the message (a preview is shown)",
    "/stats": "toggle the statistics line after each reply",
}
ALIASES = {"/quit": "/exit", "/bye": "/exit", "/?": "/help"}
FORCED = {"/save!": "/save", "/load!": "/load"}  # the "!" overrides the safety check


def _seed(s: str) -> int | None:
    return None if s.lower() in ("none", "off") else int(s)


def _max_tokens(s: str) -> int | None:
    # 0 means "no limit" here as in llama.cpp's -n -1 / Ollama's num_predict -1: there is no use
    # for a zero-token reply.
    return None if s.lower() in ("none", "off") or s.strip() == "0" else int(s)


# /set PARAM -> parser of its value (ValueError: not a valid value).
PARAMS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
          "repetition_penalty": float, "max_tokens": _max_tokens, "seed": _seed}
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


class _Printer:
    """Writes replies (stdout) and everything else (stderr); rich styles only on a colour terminal."""

    def __init__(self, stdout, stderr):
        from .output import color_enabled

        self.out, self.err = stdout, stderr
        self._console = None
        if color_enabled(stderr):
            from rich.console import Console

            self._console = Console(file=stderr, highlight=False, markup=False, soft_wrap=True)

    def piece(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def info(self, text: str, style: str = "dim") -> None:
        if self._console is not None:
            self._console.print(text, style=style)
        else:
            self.err.write(text + "\n")
            self.err.flush()

    def error(self, text: str) -> None:
        self.info(f"error: {text}", style="bold red")

    def notice(self, text: str) -> None:
        self.info(f"llmsh: {text}", style="yellow")


def context_text(session: ChatSession) -> str:
    """``context USED/N_CTX`` for ``/show``: USED is :attr:`ChatSession.context_used` (the
    conversation's tokens, including the last reply), the number the statistics line shows too."""
    return f"context {session.context_used}/{session.n_ctx}"


def stats_line(session: ChatSession) -> str:
    """The ``--stats`` line after a reply, in :func:`llmsh.output.stats_line`'s format (shared with
    ``generate --stats``); its context figure is :attr:`ChatSession.context_used`, as in ``/show``."""
    from .output import stats_line as format_stats

    if session.last_stats is None:
        return "no reply yet"
    return format_stats(session.last_stats, context_used=session.context_used, n_ctx=session.n_ctx)


def _stream(session: ChatSession, reply, p: _Printer, show_stats: bool, *, interactive: bool = True) -> None:
    """Print a reply iterator as it comes; Ctrl-C stops it and keeps the session consistent
    (and, when not interactive, propagates so that the command exits)."""
    last = "\n"
    try:
        for piece in reply:
            p.piece(piece)
            last = piece[-1]
    except KeyboardInterrupt:
        reply.close()
        if last != "\n":
            p.piece("\n")
        if not interactive:
            raise
        p.info("[interrupted: the partial reply is kept; /regen for a new one, /undo to drop it]", "yellow")
    else:
        if last != "\n":
            p.piece("\n")
        else:
            p.out.flush()
    if show_stats:
        p.info(stats_line(session))


def _show(session: ChatSession) -> str:
    m = session.model
    params = ", ".join(f"{k}={v}" for k, v in vars(session.params).items())
    template = (m.tokenizer.chat_template and "the model's chat template") or "fallback template"
    first = session.template.strip().splitlines()[0][:72] if session.template.strip() else ""
    lines = [
        f"model: {m.path} ({m.config.model_type}, {m.device}, {str(m.dtype).replace('torch.', '')})",
        f"parameters: {params}, max_tokens={session.max_tokens}",
        f"{context_text(session)} tokens (the conversation incl. the last reply), "
        f"{len(session.messages)} messages",
        f"system: {session.system!r}",
        f"template: {template}: {first}",
    ]
    return "\n".join(lines)


def preview(text: str, width: int = 60) -> str:
    """A one-line preview of a message: its first non-blank line (cut to ``width`` characters)
    and ``(N lines, M chars)``."""
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if len(first) > width:
        first = first[: width - 3] + "..."
    n = len(text.splitlines())
    return f"{first!r} ({n} line{'s' if n != 1 else ''}, {len(text)} chars)"


class _Commands:
    """Slash-command handlers; each returns True to leave the REPL."""

    def __init__(self, session: ChatSession, printer: _Printer, state: dict):
        self.s, self.p, self.state = session, printer, state

    def run(self, line: str) -> bool:
        name, _, arg = line.strip().partition(" ")
        name = ALIASES.get(name.lower(), name.lower())
        arg = arg.strip()
        if name in FORCED:
            return bool(getattr(self, "do_" + FORCED[name][1:])(arg, force=True))
        if name not in COMMANDS:
            raise InputError(f"unknown command {name}; /help lists the commands")
        return bool(getattr(self, "do_" + name[1:])(arg))

    def do_help(self, arg):
        width = max(map(len, COMMANDS))
        text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in COMMANDS.items())
        self.p.info(text + '\nMulti-line input: end a line with \\ to continue, or wrap the text in """; '
                    "Ctrl-D on a continuation line ends the input and sends what was typed.\n"
                    "Ctrl-C stops a reply (or discards the line being typed); Ctrl-D at the prompt "
                    "or /exit leaves.", "")

    def do_exit(self, arg):
        return True

    def do_clear(self, arg):
        self.s.clear()
        self.p.info("new conversation")

    def do_undo(self, arg):
        m = self.s.undo()
        text = m.content if len(m.content) <= 60 else m.content[:57] + "..."
        self.p.info(f"dropped the last exchange: {text!r}")

    def do_regen(self, arg):
        _stream(self.s, self.s.regen(), self.p, self.state["stats"])

    def do_system(self, arg):
        self.s.set_system(arg or None)
        self.p.info("system message set" if arg else "system message removed")

    def do_set(self, arg):
        parts = arg.split()
        if len(parts) != 2 or parts[0].lower() not in PARAMS:
            raise InputError("usage: /set PARAM VALUE with PARAM one of " + ", ".join(PARAMS))
        name, value = parts[0].lower(), parts[1]
        try:
            v = PARAMS[name](value)
        except ValueError:
            raise InputError(f"/set {name}: {value!r} is not a valid value") from None
        self.s.set_params(**{name: v})
        self.p.info(f"{name} = {v}")

    def do_show(self, arg):
        self.p.info(_show(self.s), "")

    def do_save(self, arg, force=False):
        if not arg:
            raise InputError("usage: /save FILE")
        try:
            path = self.s.save(arg, force=force)
        except InputError as e:
            if "not overwritten" in str(e):
                raise InputError(f"{e}; /save! {arg} replaces it") from None
            raise
        self.p.info(f"saved to {path}")

    def do_load(self, arg, force=False):
        if not arg:
            raise InputError("usage: /load FILE")
        if self.s.modified and not force:
            n = len(self.s.messages)
            raise InputError(f"the current conversation ({n} message{'s' if n != 1 else ''}) is not "
                             f"saved: /save FILE first, or /load! {arg} to discard it")
        self.s.load(arg)
        self.p.info(f"loaded {len(self.s.messages)} messages from {arg}")

    def do_read(self, arg):
        from .output import read_file

        if not arg:
            raise InputError("usage: /read FILE")
        text = read_file(os.path.expanduser(arg))
        self.p.info(f"[{arg}] {preview(text)}")
        _stream(self.s, self.s.send(text), self.p, self.state["stats"])

    def do_stats(self, arg):
        self.state["stats"] = not self.state["stats"]
        self.p.info(f"statistics {'on' if self.state['stats'] else 'off'}")


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


def run_chat(model, *, system: str | None = None, params=None, max_tokens: int | None = None,
             n_ctx: int | None = None, stats: bool = False, history: bool | str | Path = True,
             input=None, output=None, stdin=None, stdout=None, stderr=None,
             interactive: bool | None = None) -> int:
    """Run ``llmsh chat`` on ``model`` (a LoadedModel); return the exit status (0).

    Args:
        system, params (SamplingParams; default from the model's generation_config), max_tokens,
            n_ctx: see :class:`ChatSession`.
        stats: print a statistics line after each reply.
        history: True: the history file of :func:`history_path`; a path: that file; False: none.
        input, output: prompt-toolkit Input / Output (tests pass a pipe input and DummyOutput).
        stdin, stdout, stderr: text streams (default sys.*): stdin is read whole when not
            interactive; replies go to stdout, notices and statistics to stderr.
        interactive: default: True when ``input`` is given or stdin is a terminal.

    Raises:
        InputError: not interactive and stdin is empty, or the message does not fit the context.
        LlmshError: other errors outside the REPL loop (inside it they are printed and it goes on).
    """
    from .output import is_terminal

    stdin = stdin if stdin is not None else sys.stdin
    p = _Printer(stdout if stdout is not None else sys.stdout, stderr if stderr is not None else sys.stderr)
    if params is None:
        from .sampling import SamplingParams

        params = SamplingParams.from_generation_config(model.generation_config)
    session = ChatSession(model, system=system, params=params, max_tokens=max_tokens, n_ctx=n_ctx,
                          notice=p.notice)
    if interactive is None:
        interactive = input is not None or is_terminal(stdin)
    if not interactive:
        text = stdin.read()
        if not text.strip():
            raise InputError("no message on stdin (pipe one in, e.g. echo hi | llmsh chat)")
        _stream(session, session.send(text.rstrip("\n")), p, stats, interactive=False)
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


def _loop(session: ChatSession, p: _Printer, stats: bool, history, input, output) -> int:
    tty = None
    if output is None:
        output, tty = _prompt_output(p.out, p.err)
    try:
        return _prompt_loop(session, p, stats, history, input, output)
    finally:
        if tty is not None:
            tty.close()


def _prompt_loop(session: ChatSession, p: _Printer, stats: bool, history, input, output) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    hist = InMemoryHistory()
    if history:
        path = history_path() if history is True else Path(history).expanduser()
        try:
            hist = _open_history(path)
        except OSError as e:
            p.notice(f"history disabled: cannot open {path}: {e.strerror or e}")
    ps = PromptSession(history=hist, completer=_completer(), complete_while_typing=False,
                       key_bindings=_key_bindings(), input=input, output=output)
    state = {"stats": stats}
    commands = _Commands(session, p, state)
    p.info(f"llmsh chat with {session.model.path.name}: /help for commands, Ctrl-D to leave")
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
        try:
            if text.lstrip().startswith("/") and "\n" not in text.strip():
                if commands.run(text):
                    break
            else:
                _stream(session, session.send(text), p, state["stats"])
        except LlmshError as e:
            p.error(str(e))
        except KeyboardInterrupt:
            p.info("[interrupted]", "yellow")
    return 0
