"""The chat shell's slash commands (``/help``, ``/set``, ``/save``, ...): names, help and handlers.

Part of the REPL (:mod:`llmsh.cli.repl`, which reads the lines and completes these names); the
conversation itself is :class:`llmsh.session.ChatSession`.
"""

from __future__ import annotations

import os

from ..errors import InputError
from .markdown_view import parse_switch
from .repl_output import Printer, print_reply
from ..session import ChatSession


def _seed(s: str) -> int | None:
    return None if s.lower() in ("none", "off") else int(s)


def _max_tokens(s: str) -> int | None:
    # 0 means "no limit" here as in llama.cpp's -n -1 / Ollama's num_predict -1: there is no use
    # for a zero-token reply.
    return None if s.lower() in ("none", "off") or s.strip() == "0" else int(s)


# /set PARAM -> parser of its value (ValueError: not a valid value).
PARAMS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
          "repetition_penalty": float, "max_tokens": _max_tokens, "seed": _seed,
          "markdown": parse_switch}  # markdown: the shell's, not the model's (see do_set)

COMMANDS = {
    "/help": "show this help",
    "/exit": "leave (also /quit or Ctrl-D)",
    "/clear": "start a new conversation (keeps the system message)",
    "/undo": "drop the last exchange",
    "/regen": "regenerate the last reply",
    "/system": "/system TEXT sets the system message; /system alone removes it",
    "/set": "/set PARAM VALUE: " + ", ".join(PARAMS)
            + "; /set max_tokens none (or off, 0): no limit; /set seed none: unseeded"
            + "; /set markdown on|off: draw replies as Markdown on a terminal",
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


def context_text(session: ChatSession) -> str:
    """``context USED/N_CTX`` for ``/show``: USED is :attr:`ChatSession.context_used` (the
    conversation's tokens, including the last reply), the number the statistics line shows too."""
    return f"context {session.context_used}/{session.n_ctx}"


def _show(session: ChatSession) -> str:
    m = session.model
    params = ", ".join(f"{k}={v}" for k, v in vars(session.params).items())
    src = getattr(m.tokenizer, "chat_template_source", None)   # a client's stand-in has none
    template = f"--chat-template {src}" if src else "the model's chat template"
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
    first = _clip(next((ln.strip() for ln in text.splitlines() if ln.strip()), ""), width)
    return f"{first!r} ({_plural(len(text.splitlines()), 'line')}, {len(text)} chars)"


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


class SlashCommands:
    """Slash-command handlers; each returns True to leave the REPL."""

    def __init__(self, session: ChatSession, printer: Printer, state: dict):
        self.s, self.p, self.state = session, printer, state

    def run(self, line: str) -> bool:
        name, _, arg = line.strip().partition(" ")
        name = ALIASES.get(name.lower(), name.lower())
        arg = arg.strip()
        if name in FORCED:
            return bool(getattr(self, "do_" + FORCED[name][1:])(arg, force=True))
        if name not in COMMANDS:
            raise InputError(f"unknown command {name}; /help lists the commands "
                             f"(to send a message that starts with /, type it as /{_clip(line.strip(), 40)})")
        return bool(getattr(self, "do_" + name[1:])(arg))

    def do_help(self, arg):
        width = max(map(len, COMMANDS))
        text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in COMMANDS.items())
        self.p.info(text + '\nMulti-line input: end a line with \\ to continue, or wrap the text in """; '
                    "Ctrl-D on a continuation line ends the input and sends what was typed.\n"
                    "A message that starts with / is sent by typing // for it: //usr/bin is what? "
                    "sends '/usr/bin is what?'.\n"
                    "Ctrl-C stops a reply (or discards the line being typed); keys typed during a "
                    "reply are not shown in it but wait for the next prompt; Ctrl-D at the prompt "
                    "or /exit leaves.", "")

    def do_exit(self, arg):
        return True

    def do_clear(self, arg):
        self.s.clear()
        self.p.info("new conversation")

    def do_undo(self, arg):
        self.p.info(f"dropped the last exchange: {_clip(self.s.undo().content)!r}")

    def do_regen(self, arg):
        print_reply(self.s, self.s.regen(), self.p, self.state["stats"])

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
        if name == "markdown":
            self.p.markdown = v
            self.p.info(self.p.markdown_status())
            return
        self.s.set_params(**{name: v})
        self.p.info(f"{name} = {v}")

    def do_show(self, arg):
        self.p.info(_show(self.s) + "\n" + self.p.markdown_status(), "")

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
            raise InputError(f"the current conversation ({_plural(len(self.s.messages), 'message')}) is not "
                             f"saved: /save FILE first, or /load! {arg} to discard it")
        self.s.load(arg)
        self.p.info(f"loaded {len(self.s.messages)} messages from {arg}")

    def do_read(self, arg):
        from .output import read_file

        if not arg:
            raise InputError("usage: /read FILE")
        text = read_file(os.path.expanduser(arg))
        self.p.info(f"[{arg}] {preview(text)}")
        print_reply(self.s, self.s.send(text), self.p, self.state["stats"])

    def do_stats(self, arg):
        self.state["stats"] = not self.state["stats"]
        self.p.info(f"statistics {'on' if self.state['stats'] else 'off'}")
