"""The container every kiln artifact uses (CPU: runtime/artifact.py, CUDA:
runtime/artifact/cuda.py). All integers little-endian:

    b"KILNART\\0"  u32 format  u64 header length  SHA-256 of the header  header (JSON, UTF-8)
    data  [signature block]

The header (the manifest) has a ``format``, a ``kind`` (``cpu`` when absent, ``cuda``), the
length of the data (``data_bytes``) and a ``parts`` table: for every part of the data its
offset, size and SHA-256. Parts follow each other in the data at 64-byte boundaries, padded
with zeros. So every byte of the file is covered: the prefix by its fixed values, the header
by its digest, the parts by theirs, the padding by being zero, and the file's length by
``data_bytes``. An optional signature block (artifact_signing.py) ends the file:

    b"KILNSIG\\0"  u32 algorithm (1: Ed25519)  public key (32 bytes)  signature (64 bytes)

It signs the prefix, the header digest and the header, which name every part's digest; a
signed header also names its key (``signed_by``), so a stripped signature is noticed.

This module writes that layout and reads it back with every check that does not depend on the
kind, reading no more than the header's sizes allow, which it checks against the file's size
first: the magic, the format version, the header size and digest, that the header is a JSON
object (no duplicate keys) of the expected kind, the data's length, that parts tile the data,
every checksum, and the signature. ``Validator`` holds the field checks the two manifests
share (names, signatures, shapes). Nothing is unpickled or evaluated.

A checksum is no proof of origin: anyone can recompute one. An artifact is native code, to be
loaded from trusted sources only, like a shared library; signing says who wrote it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kiln.ir import KilnError
from kiln.ir.types import DType
from kiln.runtime.artifact import signing as artifact_signing

MAGIC = b"KILNART\0"
FORMAT = 2
MAX_HEADER_BYTES = 16 << 20
MAX_TENSOR_BYTES = 1 << 40
PREFIX = struct.Struct("<8sIQ")
DIGEST_BYTES = 32
SIG_MAGIC = b"KILNSIG\0"
SIG_BLOCK = struct.Struct("<8sI32s64s")
SIG_ED25519 = 1
_ALIGN = 64
_DTYPES = frozenset(d.value for d in DType)
_KIND_NAMES = {"cpu": "CPU", "cuda": "CUDA"}

Fail = Callable[..., KilnError]   # fail(message, hint=None) -> the artifact's error type


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_destination(path: Path, overwrite: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise KilnError(f"cannot write {path}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise KilnError(f"{path} is a symbolic link; kiln does not replace links",
                        hint="remove the link or choose another path")
    if not stat.S_ISREG(st.st_mode):
        raise KilnError(f"{path} exists and is not a regular file; kiln replaces only files",
                        hint="choose another path")
    if not overwrite:
        raise KilnError(f"{path} already exists", hint="choose another path or pass "
                                                       "overwrite=True")


def write_container(path: str | os.PathLike, header: dict[str, Any],
                    parts: dict[str, bytes], *, sign_key: Any = None,
                    overwrite: bool = True) -> Path:
    """Write ``header`` (with ``format``, ``data_bytes`` and the ``parts`` table added) and
    ``parts`` at ``path``, signed with ``sign_key`` when given. The file is written to a
    temporary file beside ``path`` and moved into place: a failed write leaves nothing behind
    and never damages what was there. Only a regular file is ever replaced, and only with
    ``overwrite`` (otherwise an existing file is an error, checked atomically)."""
    table, offset, chunks = {}, 0, []
    for name, data in parts.items():
        table[name] = {"offset": offset, "size": len(data), "sha256": sha256(data)}
        pad = -len(data) % _ALIGN
        chunks += [data, b"\0" * pad]
        offset += len(data) + pad
    header = {**header, "format": FORMAT, "parts": table, "data_bytes": offset}
    public = signature = None
    if sign_key is not None:
        public = artifact_signing.public_key_bytes(artifact_signing.private_key(sign_key))
        header["signed_by"] = artifact_signing.key_id(public)
    head = json.dumps(header, sort_keys=True, allow_nan=False).encode()
    lead = PREFIX.pack(MAGIC, FORMAT, len(head)) + hashlib.sha256(head).digest() + head
    if sign_key is not None:
        public, signature = artifact_signing.sign(lead, sign_key)
    path = Path(path)
    _check_destination(path, overwrite)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                   dir=path.parent if str(path.parent) else ".")
    except OSError as e:
        raise KilnError(f"cannot write {path}: {e.strerror or e}",
                        hint="check that the folder exists and is writable") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(lead)
            for c in chunks:
                f.write(c)
            if signature is not None:
                f.write(SIG_BLOCK.pack(SIG_MAGIC, SIG_ED25519, public, signature))
        os.chmod(tmp, 0o644 & ~_umask())
        if overwrite:
            _check_destination(path, True)
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if anything appeared at path meanwhile
    except FileExistsError:
        raise KilnError(f"{path} already exists", hint="choose another path or pass "
                                                       "overwrite=True") from None
    except OSError as e:
        raise KilnError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return path


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every
    thread for a moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_header(raw: bytes) -> Any:
    """JSON, strictly: UTF-8, no duplicate keys, no NaN or Infinity."""
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                      parse_constant=_no_constant)


def _open_regular(path: str | os.PathLike | bytes, error: type[KilnError]):
    """(file, size) of ``path``, which must be a regular file (or of the artifact's bytes)."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(path)), len(path)
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as e:
        raise error(f"cannot read artifact {path}: {getattr(e, 'strerror', None) or e}"
                    ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{path} is not a regular file", hint="give the path of an artifact file")
    f = os.fdopen(fd, "rb")
    return f, st.st_size


def _read_exact(f, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            return None
        got += k
    return bytes(buf)


def peek_kind(path: str | os.PathLike | bytes) -> str | None:
    """The ``kind`` of the artifact at ``path`` (``cpu`` when the manifest has none), read from
    its prefix and header only; None when that much cannot be read as a kiln artifact (the
    kind's own reader then says what is wrong)."""
    try:
        f, size = _open_regular(path, KilnError)
    except KilnError:
        return None
    with f:
        try:
            prefix = _read_exact(f, PREFIX.size)
            if prefix is None:
                return None
            magic, fmt, head_len = PREFIX.unpack(prefix)
            if magic != MAGIC or fmt != FORMAT or head_len > MAX_HEADER_BYTES \
                    or PREFIX.size + DIGEST_BYTES + head_len > size:
                return None
            lead = _read_exact(f, DIGEST_BYTES + head_len)
            if lead is None or hashlib.sha256(lead[DIGEST_BYTES:]).digest() != lead[:DIGEST_BYTES]:
                return None
            header = parse_header(lead[DIGEST_BYTES:])
        except (OSError, ValueError, RecursionError):
            return None
    if not isinstance(header, dict):
        return None
    kind = header.get("kind", "cpu")
    return kind if isinstance(kind, str) else None


def read_container(path: str | os.PathLike | bytes, fail: Fail, error: type[KilnError], kind: str,
                   required: Sequence[str], wrong_kind_hint: Callable[[str], str],
                   trusted_keys: Any = None) -> tuple[dict, dict[str, bytes]]:
    """Read and check the container at ``path``: (header, {part name: bytes}). ``kind`` is
    the manifest kind this reader takes, ``required`` the parts it needs. With
    ``trusted_keys`` (or ``KILN_TRUSTED_KEYS``; see artifact_signing.py), only a file signed
    by one of them is accepted; any signature present is checked in any case."""
    keys = artifact_signing.trusted_keys(trusted_keys)
    f, size = _open_regular(path, error)
    if isinstance(path, (bytes, bytearray, memoryview)):
        path = "the artifact"
    with f:
        try:
            return _read(f, size, path, fail, kind, required, wrong_kind_hint, keys)
        except OSError as e:
            raise error(f"cannot read artifact {path}: {e.strerror or e}") from None


def _read(f, size: int, path, fail: Fail, kind: str, required: Sequence[str],
          wrong_kind_hint: Callable[[str], str], keys: list[bytes] | None
          ) -> tuple[dict, dict[str, bytes]]:
    prefix = _read_exact(f, PREFIX.size)
    if prefix is None:
        raise fail(f"{path} is too short to be a kiln artifact ({size} bytes)")
    magic, fmt, head_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise fail(f"{path} is not a kiln artifact (bad magic)")
    if fmt != FORMAT:
        raise fail(f"artifact format {fmt} is not supported (this kiln reads format {FORMAT}"
                   + ("; format 1 artifacts carry no header digest and no code signature "
                      "record, which loading now requires)" if fmt == 1 else ")"))
    if head_len > MAX_HEADER_BYTES or PREFIX.size + DIGEST_BYTES + head_len > size:
        raise fail(f"artifact header length {head_len} is out of range (file has "
                   f"{size} bytes)")
    lead = _read_exact(f, DIGEST_BYTES + head_len)
    if lead is None:
        raise fail(f"{path} is shorter than its header says")
    digest, raw_head = lead[:DIGEST_BYTES], lead[DIGEST_BYTES:]
    if hashlib.sha256(raw_head).digest() != digest:
        raise fail("artifact header does not match its digest: the file is damaged or was "
                   "edited")
    try:
        header = parse_header(raw_head)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise fail(f"artifact header is not valid JSON: {e}") from None
    check = Validator(fail, "artifact manifest")
    check.want(isinstance(header, dict), "header must be an object")
    found = str(header.get("kind", "cpu"))[:32]
    if found != kind:
        raise fail(f"{path} is a {_KIND_NAMES.get(found, found)} artifact, not a "
                   f"{_KIND_NAMES[kind]} one", hint=wrong_kind_hint(found))
    check.want(header.get("format") == FORMAT, "format does not match the file's")
    data_bytes = header.get("data_bytes")
    check.want(check.is_int(data_bytes) and data_bytes >= 0, "data_bytes must be an integer")
    start = PREFIX.size + DIGEST_BYTES + head_len
    signed_by = header.get("signed_by")
    check.want(signed_by is None or isinstance(signed_by, str), "signed_by must be a string")
    expect = start + data_bytes + (SIG_BLOCK.size if signed_by is not None else 0)
    if size != expect:
        raise fail(f"{path} has {size} bytes, its header says {expect}: the file is truncated "
                   "or has bytes appended" + (" (or its signature was removed)"
                                              if signed_by is not None and
                                              size == expect - SIG_BLOCK.size else ""))

    parts = header.get("parts")
    check.want(isinstance(parts, dict) and all(r in parts for r in required),
               f"parts must list {' and '.join(required)}")
    spans = []
    for name, p in parts.items():
        check.name(name, "part")
        check.want(isinstance(p, dict) and check.is_int(p.get("offset"))
                   and check.is_int(p.get("size")) and isinstance(p.get("sha256"), str),
                   f"part {name} needs offset, size, sha256")
        off, n = p["offset"], p["size"]
        if off < 0 or n < 0 or off + n > data_bytes:
            raise fail(f"part {name} [{off}, {off + n}) lies outside the data "
                       f"({data_bytes} bytes)")
        spans.append((off, off + n, name))
    spans.sort()
    end = 0
    for off, stop, name in spans:
        if off != end:
            raise fail(f"part {name} starts at {off}, not where the part before it ends "
                       f"({end}): parts overlap or leave a gap")
        end = stop + (-stop % _ALIGN)
    if end != data_bytes:
        raise fail(f"the parts fill {end} bytes of data, the header says {data_bytes}")

    data = _read_exact(f, data_bytes)
    if data is None:
        raise fail(f"{path} is shorter than its header says")
    view = memoryview(data)
    blobs = {}
    for off, stop, name in spans:
        pad = view[stop:stop + (-stop % _ALIGN)]
        if any(pad):
            raise fail(f"the padding after part {name} is not zero: the file is damaged")
        if sha256(view[off:stop]) != parts[name]["sha256"]:
            raise fail(f"checksum of part {name} does not match: the file is damaged")
        blobs[name] = data[off:stop]

    signer = None
    if signed_by is not None and (keys is not None or artifact_signing.available()):
        block = _read_exact(f, SIG_BLOCK.size)
        if block is None:
            raise fail(f"{path} is shorter than its header says")
        sig_magic, alg, public, signature = SIG_BLOCK.unpack(block)
        if sig_magic != SIG_MAGIC or alg != SIG_ED25519:
            raise fail("the artifact's signature block is malformed")
        if artifact_signing.key_id(public) != signed_by:
            raise fail("the artifact's signature is by another key than its header names")
        if not artifact_signing.verify(prefix + lead, public, signature):
            raise fail("the artifact's signature does not match its contents: it was "
                       "changed after it was signed", hint="get the artifact again from "
                       "its signer; do not load it")
        signer = public
    if keys is not None:
        if signer is None:
            raise fail(f"{path} is not signed, and only artifacts signed by a trusted key may "
                       "be loaded", hint="export it with kiln.export(..., sign_key=...), or "
                       "load it without trusted_keys (and KILN_TRUSTED_KEYS unset) if you "
                       "trust where it came from")
        if signer not in keys:
            raise fail(f"{path} is signed by key {signed_by}, which is not a trusted key",
                       hint="add the signer's public key to trusted_keys if you trust it")
    return header, blobs
