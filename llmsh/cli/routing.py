"""Which command ``llmsh ARGS...`` runs when ARGS do not start with a command name.

As ``llm "prompt"`` does: options may come first, and without a command the words are a prompt
for ``generate`` (or, with no words on a terminal, ``chat`` starts). A first word that is a
command name, after leading options, runs that command with those options
(``llmsh -m DIR info`` is ``llmsh info -m DIR``); a lone word that is a near-miss of a command
name (``llmsh chta``) is an error with git's / click's "did you mean" suggestion rather than a
prompt. Options are read with the option tables of ``generate`` and ``chat`` (which of them take
a value), never by guessing.
"""

from __future__ import annotations

import difflib
import re

import click

# How close a lone word must be to a command name to be taken for a typo of it (difflib ratio):
# "genrate" -> generate (0.93), "pul" -> pull (0.86); "what" and "cats" (0.75 to chat) are prompts.
# Swapped letters ("chta") count as a typo whatever the ratio.
NEAR_MISS_CUTOFF = 0.8
_WORD = re.compile(r"^[a-z]+$")


def _value_options(ctx, names) -> set[str]:
    """The option strings (``-m``, ``--model``) of the commands ``names`` that take a value."""
    takes = set()
    group = ctx.command
    for name in names:
        cmd = group.get_command(ctx, name)
        for p in getattr(cmd, "params", ()):
            if isinstance(p, click.Option) and not p.is_flag and not p.count:
                takes.update(p.opts)
    return takes


def first_word(args: list[str], takes_value: set[str]) -> int | None:
    """Index in ``args`` of the first positional word (not an option, nor an option's value);
    None when there is none. After ``--`` everything is positional."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return i + 1 if i + 1 < len(args) else None
        if a == "-" or not a.startswith("-"):
            return i
        if "=" not in a and a in takes_value:
            i += 1  # the option's value: `-m info` names a model called "info"
        i += 1
    return None


def route(group: click.Group, ctx, args: list[str], default_command, aliases=()) -> list[str]:
    """``args`` with a command name in front: the command named after the leading options, or
    ``default_command(has_prompt)`` (generate with words, chat/generate without).

    Raises:
        click.UsageError: a lone word is a near-miss of a command name ("did you mean").
    """
    names = list(group.list_commands(ctx)) + list(aliases)
    i = first_word(args, _value_options(ctx, ["generate", "chat"]))
    if i is None:
        return [default_command(has_prompt=False)] + args
    word = args[i]
    if "--" in args[:i]:  # `llmsh -- info`: a prompt, whatever it says
        return [default_command(has_prompt=True)] + args
    if group.get_command(ctx, word) is not None:
        return [word] + args[:i] + args[i + 1:]
    if i == len(args) - 1 and _WORD.match(word):
        close = (difflib.get_close_matches(word, names, n=1, cutoff=NEAR_MISS_CUTOFF)
                 or [n for n in names if sorted(n) == sorted(word)])
        if close:
            raise click.UsageError(f"no such command '{word}'; did you mean '{close[0]}'? "
                                   f"(to send it as a prompt: llmsh generate {word})")
    return [default_command(has_prompt=True)] + args
