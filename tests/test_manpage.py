"""man/llmsh.1 must be what llmsh.cli.manpage generates from the click definitions now."""

from __future__ import annotations

from pathlib import Path

import click

from llmsh.cli import cli
from llmsh.cli.manpage import render

MAN = Path(__file__).resolve().parent.parent / "man" / "llmsh.1"


def test_man_page_is_up_to_date():
    assert MAN.read_text(encoding="utf-8") == render(), (
        "man/llmsh.1 is out of step with the click definitions: run "
        "`python -m llmsh.cli.manpage man/llmsh.1` and commit the result")


def test_man_page_documents_every_command_and_option():
    page = render()
    ctx = click.Context(cli, info_name="llmsh")
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        assert f'.SS "llmsh {name} ' in page, name
        for param in cmd.params:
            for opt in getattr(param, "opts", []) if isinstance(param, click.Option) and not param.hidden else []:
                assert opt.replace("-", "\\-") in page, (name, opt)
    for word in ("LLMSH_MODEL", "LLMSH_HOME", "NO_COLOR", "EXIT STATUS"):
        assert word in page


def test_troff_escaping():
    from llmsh.cli.manpage import escape

    assert escape(".start\n'quote\nback\\slash -x") == "\\&.start\n\\&'quote\nback\\eslash \\-x"
