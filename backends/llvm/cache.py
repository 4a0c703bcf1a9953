"""On-disk cache of compiled programs.

An entry is a folder named by a SHA-256 key of: the graph's text, every constant's bytes, the
target (triple, CPU, features) and a digest of kiln's compiler sources, so any change to the
model or to kiln gives a new key. The folder holds ``manifest.json`` (sizes, signature,
per-kernel info, and a SHA-256 of every file), ``code.o`` and ``consts.bin``. An entry that does
not check out is ignored and compiled afresh; nothing is ever loaded unchecked.

``KILN_CACHE_DIR`` sets the folder (default ``~/.cache/kiln``); ``KILN_CACHE=0`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING

import numpy as np

from kiln.ir import Graph, print_graph
from kiln.passes.lower import schedule_settings

if TYPE_CHECKING:
    from kiln.backends.llvm.compiler import ProgramImage, Target

FORMAT = 1


def cache_dir() -> pathlib.Path | None:
    """The cache folder, or None when caching is off."""
    if os.environ.get("KILN_CACHE", "1") == "0":
        return None
    root = os.environ.get("KILN_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kiln")
    return pathlib.Path(root)


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


def cache_key(graph: Graph, target: Target) -> str | None:
    """The key of ``graph`` compiled for ``target`` (None when caching is off)."""
    if cache_dir() is None:
        return None
    h = hashlib.sha256()
    h.update(f"kiln-cache-{FORMAT}\n{_source_digest()}\n".encode())
    h.update(f"{target.triple}\n{target.cpu}\n{target.features}\n".encode())
    h.update(schedule_settings().encode())
    h.update(print_graph(graph).encode())
    for name in sorted(graph.constants):
        arr = graph.constants[name]
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}\n".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_cached(key: str, image: ProgramImage) -> None:
    """Write an entry (atomically: a temporary folder renamed into place)."""
    root = cache_dir()
    if root is None:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        final = root / key
        if final.exists():
            return
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        files = {"code.o": image.object_code, "consts.bin": image.const_blob.tobytes()}
        copies = {}
        for j, arr in image.copy_constants.items():
            fname = f"copy{j}.bin"
            files[fname] = np.ascontiguousarray(arr).tobytes()
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
            "sha256": {fname: _sha(data) for fname, data in files.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        try:
            tmp.rename(final)
        except OSError:  # another process stored the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        warnings.warn(f"kiln: could not write the compile cache in {root}: {e}", stacklevel=2)


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
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            raise ValueError("format or key mismatch")
        data = {}
        for fname, digest in manifest["sha256"].items():
            if "/" in fname or "\\" in fname or fname.startswith("."):
                raise ValueError(f"bad file name {fname!r}")
            raw = (folder / fname).read_bytes()
            if _sha(raw) != digest:
                raise ValueError(f"checksum of {fname} does not match")
            data[fname] = raw
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
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"kiln: ignoring a damaged cache entry {folder}: {e}", stacklevel=2)
        return None
