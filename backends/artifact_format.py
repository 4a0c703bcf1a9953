"""The container every kiln artifact uses (CPU: runtime/artifact.py, CUDA:
backends/cuda/artifact.py). All integers little-endian:

    b"KILNART\\0"  u32 format  u64 header length  header (JSON, UTF-8)  data

The header (the manifest) has a ``format``, a ``kind`` (``cpu`` when absent, ``cuda``) and a
``parts`` table: for every part of the data its offset, size and SHA-256. This module writes
that layout and reads it back with every check that does not depend on the kind: the magic,
the format version, the header size, that the header is a JSON object of the expected kind,
that parts lie inside the data without overlapping, and every checksum. ``Validator`` holds
the field checks the two manifests share (names, signatures, shapes). Nothing is unpickled or
evaluated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kiln.ir import KilnError
from kiln.ir.types import DType

MAGIC = b"KILNART\0"
FORMAT = 1
MAX_HEADER_BYTES = 16 << 20
MAX_TENSOR_BYTES = 1 << 40
PREFIX = struct.Struct("<8sIQ")
_ALIGN = 64
_DTYPES = frozenset(d.value for d in DType)
_KIND_NAMES = {"cpu": "CPU", "cuda": "CUDA"}

Fail = Callable[..., KilnError]   # fail(message, hint=None) -> the artifact's error type


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def write_container(path: str | os.PathLike, header: dict[str, Any],
                    parts: dict[str, bytes]) -> Path:
    """Write ``header`` (with ``format`` and the ``parts`` table added) and ``parts`` at
    ``path``, through a temporary file renamed into place: a failed write never leaves half
    an artifact nor damages an existing file."""
    table, offset, chunks = {}, 0, []
    for name, data in parts.items():
        table[name] = {"offset": offset, "size": len(data), "sha256": sha256(data)}
        pad = -len(data) % _ALIGN
        chunks += [data, b"\0" * pad]
        offset += len(data) + pad
    head = json.dumps({**header, "format": FORMAT, "parts": table}, sort_keys=True).encode()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(PREFIX.pack(MAGIC, FORMAT, len(head)))
        f.write(head)
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)
    return path


class Validator:
    """Field checks of a manifest; every failure is ``fail(f"{label} is invalid: ...")``."""

    def __init__(self, fail: Fail, label: str) -> None:
        self.fail = fail
        self.label = label

    def want(self, cond: bool, what: str) -> None:
        if not cond:
            raise self.fail(f"{self.label} is invalid: {what}")

    @staticmethod
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def name(self, name: Any, what: str) -> str:
        """A short string that cannot be read as a path."""
        self.want(isinstance(name, str) and 0 < len(name) <= 256,
                  f"{what} name must be a short string")
        self.want(not any(b in name for b in ("/", "\\", "\0", "..")) and
                  not name.startswith("~"), f"{what} name {name!r} looks like a path")
        return name

    def shape(self, shape: Any, dtype: str, what: str) -> tuple[int, ...]:
        self.want(isinstance(shape, list) and len(shape) <= 16,
                  f"{what} shape must be a short list")
        self.want(all(self.is_int(d) and 0 <= d < (1 << 40) for d in shape),
                  f"{what} shape has a bad dimension")
        # Python integers do not overflow: the product is exact before it is compared.
        self.want(math.prod(shape) * DType(dtype).itemsize <= MAX_TENSOR_BYTES,
                  f"{what} shape {shape} is too large")
        return tuple(shape)

    def signature(self, entries: Any, what: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """[[name, dtype, shape], ...] of the inputs or outputs."""
        self.want(isinstance(entries, list) and len(entries) <= 4096, f"{what} must be a list")
        out = []
        for e in entries:
            self.want(isinstance(e, list) and len(e) == 3,
                      f"{what} entry must be [name, dtype, shape]")
            name, dtype, shape = e
            self.name(name, what)
            self.want(dtype in _DTYPES, f"{what} dtype {dtype!r} is unknown")
            out.append((name, dtype, self.shape(shape, dtype, what)))
        return out


def peek_kind(path: str | os.PathLike) -> str | None:
    """The ``kind`` of the artifact at ``path`` (``cpu`` when the manifest has none), read from
    its prefix and header only; None when that much cannot be read as a kiln artifact (the
    kind's own reader then says what is wrong)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(PREFIX.size)
            if len(prefix) < PREFIX.size:
                return None
            magic, _, head_len = PREFIX.unpack(prefix)
            if magic != MAGIC or head_len > MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(head_len).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    kind = header.get("kind", "cpu")
    return kind if isinstance(kind, str) else None


def read_container(path: str | os.PathLike, fail: Fail, error: type[KilnError], kind: str,
                   required: Sequence[str], wrong_kind_hint: Callable[[str], str]
                   ) -> tuple[dict, dict[str, bytes]]:
    """Read and check the container at ``path``: (header, {part name: bytes}). ``kind`` is
    the manifest kind this reader takes, ``required`` the parts it needs."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise error(f"cannot read artifact {path}: {e}") from None
    if len(raw) < PREFIX.size:
        raise fail(f"{path} is too short to be a kiln artifact ({len(raw)} bytes)")
    magic, fmt, head_len = PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise fail(f"{path} is not a kiln artifact (bad magic)")
    if head_len > MAX_HEADER_BYTES or PREFIX.size + head_len > len(raw):
        raise fail(f"artifact header length {head_len} is out of range (file has "
                   f"{len(raw)} bytes)")
    try:
        header = json.loads(raw[PREFIX.size:PREFIX.size + head_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise fail(f"artifact header is not valid JSON: {e}") from None
    check = Validator(fail, "artifact manifest")
    check.want(isinstance(header, dict), "header must be an object")
    found = str(header.get("kind", "cpu"))[:32]
    if found != kind:
        raise fail(f"{path} is a {_KIND_NAMES.get(found, found)} artifact, not a "
                   f"{_KIND_NAMES[kind]} one", hint=wrong_kind_hint(found))
    if fmt != FORMAT or header.get("format") != FORMAT:
        raise fail(f"artifact format {fmt} is not supported (this kiln reads format {FORMAT})")
    data = memoryview(raw)[PREFIX.size + head_len:]

    parts = header.get("parts")
    check.want(isinstance(parts, dict) and all(r in parts for r in required),
               f"parts must list {' and '.join(required)}")
    spans, blobs = [], {}
    for name, p in parts.items():
        check.name(name, "part")
        check.want(isinstance(p, dict) and check.is_int(p.get("offset"))
                   and check.is_int(p.get("size")) and isinstance(p.get("sha256"), str),
                   f"part {name} needs offset, size, sha256")
        off, size = p["offset"], p["size"]
        if off < 0 or size < 0 or off + size > len(data):
            raise fail(f"part {name} [{off}, {off + size}) lies outside the data "
                       f"({len(data)} bytes)")
        spans.append((off, off + size, name))
        chunk = data[off:off + size]
        if sha256(chunk) != p["sha256"]:
            raise fail(f"checksum of part {name} does not match: the file is damaged")
        blobs[name] = bytes(chunk)
    spans.sort()
    for (_, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise fail(f"parts {an} and {bn} overlap")
    return header, blobs
