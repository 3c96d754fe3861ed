"""The commands under more than one process: ``--tp N`` (ranks started by llmsh) and torchrun
(``torchrun --nproc-per-node 2 -m llmsh …``), against the same command in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_fixtures import LONG_TEXT, chat_model  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if k not in ("LLMSH_MODEL", "WORLD_SIZE", "RANK")}
    e.update(LLMSH_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", NO_COLOR="1",
             PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""))
    return e


def llmsh(args, *, env, input=b"", launcher=(), timeout=180):
    cmd = [*launcher, "-m", "llmsh", *args] if launcher else [sys.executable, "-m", "llmsh", *args]
    return subprocess.run(cmd, input=input, capture_output=True, env=env, cwd=ROOT, timeout=timeout)


def torchrun():
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun not found beside this Python")
    return (exe, "--standalone", "--nproc-per-node", "2")


def test_generate_tp2_prints_the_single_process_text(chat_model, env):
    args = ["generate", "-m", str(chat_model), "--raw", "-n", "24", "--temperature", "0", "--json"]
    one = llmsh([*args, "The quick brown fox"], env=env)
    two = llmsh([*args, "--tp", "2", "The quick brown fox"], env=env)
    assert one.returncode == two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert b["tokens"] == a["tokens"] and b["text"] == a["text"]
    assert two.stdout.count(b"\n") == 1          # rank 1 printed nothing


def test_generate_tp2_reads_stdin_once_and_samples_alike(chat_model, env):
    """The prompt comes from rank 0's stdin; sampling without --seed still agrees across ranks
    (rank 0's seed is broadcast), so the run ends normally."""
    args = ["generate", "-m", str(chat_model), "--raw", "-n", "12", "--temperature", "0.9", "--tp", "2"]
    r = llmsh(args, env=env, input=b"Hello, how are you")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_tp_larger_than_kv_heads_is_one_line(chat_model, env):
    r = llmsh(["generate", "-m", str(chat_model), "--tp", "3", "hi"], env=env, timeout=90)
    assert r.returncode == 1
    lines = [l for l in r.stderr.decode().splitlines() if l.strip()]
    assert lines == ["llmsh: error: --tp 3: the model has 2 key/value heads, so at most 2 ranks can "
                     "share its attention (heads are split whole, with their KV group)"], r.stderr


def test_torchrun_perplexity_prints_the_single_process_figures(chat_model, env, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(LONG_TEXT)
    b.write_text(LONG_TEXT[::-1])
    args = ["perplexity", "-m", str(chat_model), "-c", "32", "--json", str(a), str(b)]
    one = llmsh([*args, "--per-token", str(tmp_path / "one.jsonl")], env=env)
    two = llmsh([*args, "--per-token", str(tmp_path / "two.jsonl")], env=env, launcher=torchrun())
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout               # same figures, same order, printed once
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    lines = llmsh(["ppl", "-m", str(chat_model), "--each-line", "--json"], env=env,
                  input=LONG_TEXT.replace(". ", ".\n").encode())
    lines2 = llmsh(["ppl", "-m", str(chat_model), "--each-line", "--json"], env=env, launcher=torchrun(),
                   input=LONG_TEXT.replace(". ", ".\n").encode())
    assert lines2.returncode == 0, lines2.stderr
    assert lines2.stdout == lines.stdout


def test_perplexity_tp2_matches(chat_model, env, tmp_path):
    a = tmp_path / "a.txt"
    a.write_text(LONG_TEXT)
    args = ["perplexity", "-m", str(chat_model), "-c", "32", "--json", str(a)]
    one, two = llmsh(args, env=env), llmsh([*args, "--tp", "2"], env=env)
    assert two.returncode == 0, two.stderr
    x, y = json.loads(one.stdout), json.loads(two.stdout)
    assert y["n_tokens"] == x["n_tokens"]
    assert abs(y["perplexity"] - x["perplexity"]) <= 1e-6 * x["perplexity"]


# The default model (SmolLM2-135M-Instruct: 9 query heads and 3 KV heads, split 2 + 1 over two
# ranks) under the same commands, in the float32 reference precision.
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def default_model():
    from llmsh import hub

    try:
        return hub.pull(hub.DEFAULT_MODEL)
    except hub.PullError as e:
        pytest.skip(f"cannot pull the default model: {e}")


@pytest.fixture
def default_env(env):
    # The suite's cache (conftest), where the default model was pulled, not a per-test empty one.
    return {**env, "LLMSH_HOME": os.environ["LLMSH_HOME"]}


@pytest.mark.default_model
def test_default_model_generate_tp2_is_single(default_model, default_env):
    args = ["generate", "-m", str(default_model), "--dtype", "float32", "--quantize", "none",
            "--temperature", "0", "-n", "32", "--json", "What is the capital of France?"]
    one = llmsh(args, env=default_env)
    two = llmsh([*args, "--tp", "2"], env=default_env)
    assert one.returncode == two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert b["tokens"] == a["tokens"] and b["text"] == a["text"]
    assert "Paris" in a["text"]


@pytest.mark.default_model
def test_default_model_torchrun_perplexity_is_single(default_model, default_env):
    text = DATA / "gpl-3.txt"
    if not text.is_file():
        pytest.skip(f"{text} not found (the ../shared folder of the workspace)")
    args = ["perplexity", "-m", str(default_model), "--dtype", "float32", "--quantize", "none",
            "-c", "256", "--json", str(text)]
    one = llmsh(args, env=default_env, timeout=600)
    two = llmsh(args, env=default_env, launcher=torchrun(), timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout
