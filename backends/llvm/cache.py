"""On-disk cache of compiled programs.

An entry is a folder named by a SHA-256 key of: the graph's text, every constant's bytes, the
target (ISA, features, caches, cores), the schedule tuning and a digest of kiln's compiler
sources, so any change to the model or to kiln gives a new key. The folder holds
``manifest.json`` (sizes, signature, per-kernel info, and a SHA-256 of every file), ``code.o``
and ``consts.bin``. An entry that does not check out is ignored and compiled afresh; nothing
is ever loaded unchecked.

``KILN_CACHE_DIR`` sets the folder (default ``~/.cache/kiln``); ``KILN_CACHE=0`` turns it off.
The cache owns only what it made: a folder it creates is private to the user (0700) and
tagged (``CACHEDIR.TAG``); each entry holds a marker; eviction deletes marked entries only. A
folder that already holds other files is used read-only, with a warning. An entry written by
another user, or writable by others, is not loaded (it is native code).

The cache is bounded: after each store, when its entries add up to more than
``KILN_CACHE_MAX_MB`` (default 2048 MB) the least recently used ones (by the time their manifest
was last written or loaded) are deleted until it holds at most 80% of that; the entry just
stored is always kept. The check reads every entry's size, so it runs at most once a minute
(a ``.last-evict`` file marks when; in between the cache may run over by a minute's entries).
Temporary folders that a crashed writer left behind for more than an
hour go too. Every kiln upgrade (or model change) makes new keys, so without a bound the old
entries would pile up for ever.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import tempfile
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.ir import Graph, print_graph
from kiln.passes.tuning import DEFAULT as DEFAULT_TUNING
from kiln.passes.tuning import Tuning

if TYPE_CHECKING:
    from kiln.backends.llvm.compiler import ProgramImage, Target

FORMAT = 1
DEFAULT_MAX_MB = 2048
STALE_TMP_SECONDS = 3600
EVICT_INTERVAL = 60.0


# The cache owns only what it made: its root holds this tag (the standard cache-directory tag,
# which backup tools honour), every entry and temporary folder holds ENTRY_MARKER, and
# eviction touches nothing else.
ROOT_TAG = "CACHEDIR.TAG"
ROOT_TAG_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
                 "# This folder is kiln's compile cache (KILN_CACHE_DIR); kiln may delete the\n"
                 "# entries it wrote here. It writes nowhere else.\n")
ENTRY_MARKER = "kiln-entry"
_KEY_CHARS = set("0123456789abcdef")
_warned_roots: set[str] = set()


def cache_dir() -> pathlib.Path | None:
    """The cache folder, or None when caching is off."""
    if os.environ.get("KILN_CACHE", "1") == "0":
        return None
    root = os.environ.get("KILN_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kiln")
    return pathlib.Path(root)


def writable_root(root: pathlib.Path) -> bool:
    """Whether kiln may write (and evict) in ``root``: a folder it created (tagged), or a new
    or empty one, which it then tags and makes private to the user (0700). A folder that holds
    anything else is used read-only, with a warning: kiln never deletes what it did not make."""
    tag = root / ROOT_TAG
    try:
        if tag.is_file() and "kiln" in tag.read_text(errors="replace"):
            return True
        if not root.exists():
            root.mkdir(parents=True, mode=0o700)
        elif not root.is_dir() or not _only_kiln_files(root):
            if str(root) not in _warned_roots:
                _warned_roots.add(str(root))
                warnings.warn(f"kiln: the compile cache folder {root} holds files kiln did not "
                              "write; it is used read-only (no entries stored, nothing "
                              "deleted). Point KILN_CACHE_DIR at a new or empty folder",
                              stacklevel=3)
            return False
        os.chmod(root, 0o700)
        tag.write_text(ROOT_TAG_TEXT)
        return True
    except OSError:
        return False


def _only_kiln_files(root: pathlib.Path) -> bool:
    """Whether everything in ``root`` is kiln's (an empty folder, or the cache of a kiln from
    before the tag: entries, its eviction stamp, the tuning database), so that kiln may tag
    it as its own."""
    for child in root.iterdir():
        if child.name in (".last-evict", "tuning.json") and child.is_file():
            continue
        if child.is_dir() and not child.is_symlink() and (
                is_entry(child) or (child.name.startswith(".tmp-")
                                    and (child / ENTRY_MARKER).is_file())):
            continue
        return False
    return True


def is_entry(folder: pathlib.Path) -> bool:
    """Whether ``folder`` is a cache entry kiln wrote: a key's name, and kiln's marker (or,
    from kiln versions before the marker, a manifest naming that key)."""
    name = folder.name
    if len(name) != 64 or not set(name) <= _KEY_CHARS:
        return False
    if (folder / ENTRY_MARKER).is_file():
        return True
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return isinstance(manifest, dict) and manifest.get("key") == name
    except (OSError, ValueError, RecursionError):
        return False


def _owned_by_user(folder: pathlib.Path) -> bool:
    """The entry was written by this user and nobody else may write it."""
    st = folder.stat()
    mine = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return mine and not st.st_mode & 0o022


@functools.cache
def _source_digest() -> str:
    """A digest of the compiler's own sources: new code never reuses old object code."""
    root = pathlib.Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for sub in ("ir", "passes", "backends"):
        for path in sorted((root / sub).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(graph: Graph, target: Target, tuning: Tuning = DEFAULT_TUNING) -> str | None:
    """The key of ``graph`` compiled for ``target`` with ``tuning`` (None when caching is
    off)."""
    if cache_dir() is None:
        return None
    h = hashlib.sha256()
    h.update(f"kiln-cache-{FORMAT}\n{_source_digest()}\n".encode())
    h.update(f"{target.key()}\n".encode())
    h.update(f"{tuning.key()}\n".encode())
    h.update(print_graph(graph, sources=False).encode())
    for name in sorted(graph.constants):
        arr = graph.constants[name]
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}\n".encode())
        h.update(_raw(arr))
    return h.hexdigest()


def _sha(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def _raw(arr: np.ndarray) -> np.ndarray:
    """``arr``'s bytes as a flat uint8 view (a copy only when ``arr`` is not contiguous):
    hashing and writing a model's weights through ``tobytes()`` copied them whole."""
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def store_cached(key: str, image: ProgramImage) -> None:
    """Write an entry (atomically: a temporary folder renamed into place)."""
    root = cache_dir()
    if root is None or not writable_root(root):
        return
    try:
        final = root / key
        if final.exists():
            return
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        (tmp / ENTRY_MARKER).write_text("a kiln compile-cache entry\n")
        files = {"code.o": image.object_code, "consts.bin": _raw(image.const_blob)}
        copies = {}
        for j, arr in image.copy_constants.items():
            fname = f"copy{j}.bin"
            files[fname] = _raw(arr)
            copies[str(j)] = {"file": fname, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        manifest = {
            "format": FORMAT,
            "key": key,
            "arena_bytes": image.arena_bytes,
            "inputs": [[n, d, list(s)] for n, d, s in image.inputs],
            "outputs": [[n, d, list(s)] for n, d, s in image.outputs],
            "output_copies": {str(j): list(v) for j, v in image.output_copies.items()},
            "copy_constants": copies,
            "steps": image.steps,
            "target": image.target,
            "index_checks": [list(c) for c in image.index_checks],
            "sha256": {fname: _sha(data) for fname, data in files.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        try:
            tmp.rename(final)
        except OSError:  # another process stored the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
        marker = root / ".last-evict"
        if not marker.exists() or time.time() - marker.stat().st_mtime > EVICT_INTERVAL:
            marker.touch()
            evict(root, keep=key)
    except OSError as e:
        warnings.warn(f"kiln: could not write the compile cache in {root}: {e}", stacklevel=2)


def cache_limit() -> int:
    """The cache's size bound in bytes (``KILN_CACHE_MAX_MB``, default 2048)."""
    raw = os.environ.get("KILN_CACHE_MAX_MB", "")
    try:
        mb = float(raw) if raw else DEFAULT_MAX_MB
        if not (math.isfinite(mb) and mb >= 0):
            raise ValueError(raw)
    except ValueError:
        warnings.warn(f"kiln: KILN_CACHE_MAX_MB={raw!r} is not a number of megabytes (0 or "
                      f"more); using {DEFAULT_MAX_MB}", stacklevel=3)
        mb = DEFAULT_MAX_MB
    return int(mb * (1 << 20))


def _entry_size(folder: pathlib.Path) -> tuple[float, int]:
    """(last use, bytes) of a cache entry: its manifest's modification time and its files'
    total size."""
    size, used = 0, 0.0
    with os.scandir(folder) as it:
        for f in it:
            st = f.stat(follow_symlinks=False)
            size += st.st_size
            if f.name == "manifest.json":
                used = st.st_mtime
    return used, size


def evict(root: pathlib.Path, keep: str = "") -> list[str]:
    """Delete least recently used entries of the cache in ``root`` until it is within the
    bound (see the module docstring); returns the deleted keys. Never raises: an entry another
    process is using or deleting at the same moment is skipped."""
    limit = cache_limit()
    entries: list[tuple[float, int, str]] = []
    total = 0
    now = time.time()
    with os.scandir(root) as it:
        for d in it:
            try:
                if not d.is_dir(follow_symlinks=False):
                    continue
                folder = pathlib.Path(d.path)
                if d.name.startswith(".tmp-"):
                    if ((folder / ENTRY_MARKER).is_file()
                            and now - d.stat(follow_symlinks=False).st_mtime
                            > STALE_TMP_SECONDS):
                        shutil.rmtree(d.path, ignore_errors=True)
                    continue
                if not is_entry(folder):
                    continue  # not kiln's: never touched
                used, size = _entry_size(folder)
            except OSError:
                continue
            total += size
            entries.append((used, size, d.name))
    if total <= limit:
        return []
    removed = []
    target = int(limit * 0.8)
    for _used, size, name in sorted(entries):
        if total <= target:
            break
        if name == keep:
            continue
        shutil.rmtree(root / name, ignore_errors=True)
        total -= size
        removed.append(name)
    return removed


def load_cached(key: str) -> ProgramImage | None:
    """The entry for ``key`` if present and intact, else None."""
    from kiln.backends.llvm.compiler import ProgramImage

    root = cache_dir()
    if root is None:
        return None
    folder = root / key
    if not (folder / "manifest.json").is_file():
        return None
    try:
        if not _owned_by_user(folder):
            raise ValueError("written by another user, or writable by others: not trusted")
        manifest = json.loads((folder / "manifest.json").read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
                or manifest.get("key") != key:
            raise ValueError("format or key mismatch")
        data = {}
        for fname, digest in manifest["sha256"].items():
            if "/" in fname or "\\" in fname or fname.startswith("."):
                raise ValueError(f"bad file name {fname!r}")
            raw = (folder / fname).read_bytes()
            if _sha(raw) != digest:
                raise ValueError(f"checksum of {fname} does not match")
            data[fname] = raw
        with contextlib.suppress(OSError):  # a read-only cache still loads
            os.utime(folder / "manifest.json")  # used now: the last to be evicted
        copies = {}
        for j, spec in manifest["copy_constants"].items():
            arr = np.frombuffer(data[spec["file"]], np.dtype(spec["dtype"]))
            copies[int(j)] = arr.reshape(spec["shape"])
        return ProgramImage(
            object_code=data["code.o"],
            const_blob=np.frombuffer(data["consts.bin"], np.uint8).copy(),
            arena_bytes=int(manifest["arena_bytes"]),
            inputs=[(n, d, tuple(s)) for n, d, s in manifest["inputs"]],
            outputs=[(n, d, tuple(s)) for n, d, s in manifest["outputs"]],
            output_copies={int(j): (v[0], int(v[1]))
                           for j, v in manifest["output_copies"].items()},
            copy_constants=copies,
            steps=manifest["steps"],
            target=manifest["target"],
            index_checks=[(int(i), int(r), str(n)) for i, r, n in manifest["index_checks"]],
        )
    except Exception as e:  # whatever is wrong with an entry, it is compiled afresh
        warnings.warn(f"kiln: ignoring a damaged cache entry {folder}: "
                      f"{type(e).__name__}: {e}", stacklevel=2)
        return None
