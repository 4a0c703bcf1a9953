"""Ahead-of-time artifacts: one file holding a compiled model, loadable without PyTorch.

Layout (all integers little-endian):

    b"KILNART\\0"  u32 format  u64 header length  header (JSON, UTF-8)  data

The header is the manifest: format and kiln version, target triple and CPU features, input and
output names/dtypes/shapes, the pipeline that produced the model, the arena size, the kernel
table, and for every part of the data (object code, constant blob, constant outputs) its
offset, size and SHA-256. ``load`` checks the magic, the format version, the header size, every
field's type and range, that parts lie inside the data without overlapping, every checksum,
the target and the CPU features, and only then hands the object code to LLVM's linker. Nothing
in the file is ever unpickled or evaluated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.ir import KilnError
from kiln.ir.types import DType

MAGIC = b"KILNART\0"
FORMAT = 1
MAX_HEADER_BYTES = 16 << 20
MAX_ARENA_BYTES = 1 << 40
MAX_TENSOR_BYTES = 1 << 40
_PREFIX = struct.Struct("<8sIQ")
_ALIGN = 64


class ArtifactError(KilnError):
    """A kiln artifact that cannot be loaded: damaged, from another kiln or for another CPU."""


def _fail(message: str, hint: str | None = None) -> ArtifactError:
    return ArtifactError(message, hint=hint or "export the model again with this kiln version")


def _sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def save(path: str | os.PathLike, image: Any, *, pipeline: Sequence[str] = (),
         kiln_version: str = "") -> Path:
    """Write ``image`` (a backends.llvm ProgramImage) as an artifact at ``path``.

    The file is written next to its destination and renamed into place, so a failed export
    never leaves a half-written artifact or overwrites an existing one with garbage."""
    parts: dict[str, bytes] = {"code": bytes(image.object_code),
                               "consts": np.ascontiguousarray(image.const_blob).tobytes()}
    tensors: dict[str, dict] = {}
    for j, arr in image.copy_constants.items():
        name = f"output{int(j)}"
        arr = np.ascontiguousarray(arr)
        parts[name] = arr.tobytes()
        tensors[name] = {"dtype": DType.from_numpy(arr.dtype).value, "shape": list(arr.shape),
                         "output": int(j)}
    table, offset, chunks = {}, 0, []
    for name, data in parts.items():
        table[name] = {"offset": offset, "size": len(data), "sha256": _sha(data)}
        pad = -len(data) % _ALIGN
        chunks += [data, b"\0" * pad]
        offset += len(data) + pad
    header = {
        "format": FORMAT,
        "kiln_version": kiln_version,
        "target": dict(image.target),
        "inputs": [[n, d, list(s)] for n, d, s in image.inputs],
        "outputs": [[n, d, list(s)] for n, d, s in image.outputs],
        "pipeline": list(pipeline),
        "arena_bytes": int(image.arena_bytes),
        "output_copies": {str(j): [k, int(i)] for j, (k, i) in image.output_copies.items()},
        "tensors": tensors,
        "steps": image.steps,
        "parts": table,
    }
    head = json.dumps(header, sort_keys=True).encode()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT, len(head)))
        f.write(head)
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)
    return path


# ---- loading ---------------------------------------------------------------------------------
def _want(cond: bool, what: str) -> None:
    if not cond:
        raise _fail(f"artifact manifest is invalid: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_name(name: Any, what: str) -> str:
    _want(isinstance(name, str) and 0 < len(name) <= 256, f"{what} name must be a short string")
    bad = ("/", "\\", "\0", "..")
    _want(not any(b in name for b in bad) and not name.startswith("~"),
          f"{what} name {name!r} looks like a path")
    return name


def _check_signature(entries: Any, what: str) -> list[tuple[str, str, tuple[int, ...]]]:
    _want(isinstance(entries, list) and len(entries) <= 4096, f"{what} must be a list")
    out = []
    for e in entries:
        _want(isinstance(e, list) and len(e) == 3, f"{what} entry must be [name, dtype, shape]")
        name, dtype, shape = e
        _check_name(name, what)
        _want(dtype in {d.value for d in DType}, f"{what} dtype {dtype!r} is unknown")
        out.append((name, dtype, _check_shape(shape, dtype, what)))
    return out


def _check_shape(shape: Any, dtype: str, what: str) -> tuple[int, ...]:
    _want(isinstance(shape, list) and len(shape) <= 16, f"{what} shape must be a short list")
    _want(all(_is_int(d) and 0 <= d < (1 << 40) for d in shape),
          f"{what} shape has a bad dimension")
    # Python integers do not overflow: the product is exact before it is compared.
    _want(math.prod(shape) * DType(dtype).itemsize <= MAX_TENSOR_BYTES,
          f"{what} shape {shape} is too large")
    return tuple(shape)


def _check_cpu(target: Any) -> dict:
    from kiln.backends.llvm.compiler import host_target

    _want(isinstance(target, dict), "target must be an object")
    for key in ("triple", "cpu", "features"):
        _want(isinstance(target.get(key), str), f"target.{key} must be a string")
    _want(_is_int(target.get("vector_bits")), "target.vector_bits must be an integer")
    host = host_target()
    if target["triple"].split("-")[0] != host.triple.split("-")[0]:
        raise _fail(f"artifact was compiled for {target['triple']}, this machine is "
                    f"{host.triple}", hint="export the model on (or for) this kind of machine")
    have = {f[1:] for f in host.features.split(",") if f.startswith("+")}
    need = {f[1:] for f in target["features"].split(",") if f.startswith("+")}
    missing = sorted(need - have)
    if missing:
        raise _fail(f"artifact needs CPU features this machine lacks: {', '.join(missing[:8])}",
                    hint="export the model on a machine like this one")
    return target


def read_image(path: str | os.PathLike) -> tuple[Any, dict]:
    """Read and check an artifact; returns (ProgramImage, header). No code is loaded."""
    from kiln.backends.llvm.compiler import ProgramImage

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read artifact {path}: {e}") from None
    if len(raw) < _PREFIX.size:
        raise _fail(f"{path} is too short to be a kiln artifact ({len(raw)} bytes)")
    magic, fmt, head_len = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise _fail(f"{path} is not a kiln artifact (bad magic)")
    if fmt != FORMAT:
        raise _fail(f"artifact format {fmt} is not supported (this kiln reads format {FORMAT})")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(raw):
        raise _fail(f"artifact header length {head_len} is out of range (file has "
                    f"{len(raw)} bytes)")
    try:
        header = json.loads(raw[_PREFIX.size:_PREFIX.size + head_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(f"artifact header is not valid JSON: {e}") from None
    _want(isinstance(header, dict), "header must be an object")
    if header.get("kind", "cpu") != "cpu":
        raise _fail(f"{path} is a {str(header.get('kind'))[:32]} artifact, not a CPU one",
                    hint="load a CUDA artifact with kiln.backends.cuda.load_cuda(path)")
    _want(header.get("format") == FORMAT, "format mismatch between prefix and header")
    data = memoryview(raw)[_PREFIX.size + head_len:]

    parts = header.get("parts")
    _want(isinstance(parts, dict) and "code" in parts and "consts" in parts,
          "parts must list code and consts")
    spans = []
    blobs: dict[str, bytes] = {}
    for name, p in parts.items():
        _check_name(name, "part")
        _want(isinstance(p, dict) and _is_int(p.get("offset")) and _is_int(p.get("size"))
              and isinstance(p.get("sha256"), str), f"part {name} needs offset, size, sha256")
        off, size = p["offset"], p["size"]
        if off < 0 or size < 0 or off + size > len(data):
            raise _fail(f"part {name} [{off}, {off + size}) lies outside the data "
                        f"({len(data)} bytes)")
        spans.append((off, off + size, name))
        chunk = data[off:off + size]
        if _sha(chunk) != p["sha256"]:
            raise _fail(f"checksum of part {name} does not match: the file is damaged")
        blobs[name] = bytes(chunk)
    spans.sort()
    for (_, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _fail(f"parts {an} and {bn} overlap")

    inputs = _check_signature(header.get("inputs"), "input")
    outputs = _check_signature(header.get("outputs"), "output")
    arena = header.get("arena_bytes")
    _want(_is_int(arena) and 0 <= arena <= MAX_ARENA_BYTES, "arena_bytes out of range")
    copies = {}
    raw_copies = header.get("output_copies")
    _want(isinstance(raw_copies, dict), "output_copies must be an object")
    for j, spec in raw_copies.items():
        _want(j.isdigit() and int(j) < len(outputs), f"output copy {j!r} names no output")
        _want(isinstance(spec, list) and len(spec) == 2 and spec[0] in ("input", "output")
              and _is_int(spec[1]) and 0 <= spec[1] < len(inputs if spec[0] == "input"
                                                           else outputs),
              f"output copy {j} is malformed")
        copies[int(j)] = (spec[0], spec[1])
    tensors = header.get("tensors")
    _want(isinstance(tensors, dict), "tensors must be an object")
    copy_consts = {}
    for name, t in tensors.items():
        _want(name in blobs and isinstance(t, dict), f"tensor {name!r} has no part")
        dtype = t.get("dtype")
        _want(dtype in {d.value for d in DType}, f"tensor {name} dtype {dtype!r} is unknown")
        shape = _check_shape(t.get("shape"), dtype, f"tensor {name}")
        j = t.get("output")
        _want(_is_int(j) and 0 <= j < len(outputs), f"tensor {name} names no output")
        nbytes = math.prod(shape) * DType(dtype).itemsize
        if nbytes != len(blobs[name]):
            raise _fail(f"tensor {name} holds {len(blobs[name])} bytes, its shape needs "
                        f"{nbytes}")
        copy_consts[j] = np.frombuffer(blobs[name], DType(dtype).numpy).reshape(shape)
    steps = header.get("steps")
    _want(isinstance(steps, list) and all(isinstance(s, dict) for s in steps),
          "steps must be a list of objects")
    target = _check_cpu(header.get("target"))
    image = ProgramImage(
        object_code=blobs["code"],
        const_blob=np.frombuffer(blobs["consts"], np.uint8).copy(),
        arena_bytes=arena, inputs=inputs, outputs=outputs, output_copies=copies,
        copy_constants=copy_consts, steps=steps, target=target)
    return image, header


class LoadedModel:
    """A model loaded from an artifact: call it with NumPy arrays, get NumPy arrays back."""

    def __init__(self, path: str | os.PathLike, threads: int = 0) -> None:
        from kiln.backends.llvm.compiler import CompiledProgram

        image, self.manifest = read_image(path)
        self.inputs = image.inputs
        self.outputs = image.outputs
        self.program = CompiledProgram(image)
        if threads:
            self.program.threads(threads)

    def __call__(self, *arrays: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        if len(arrays) != len(self.inputs):
            raise KilnError(f"the model takes {len(self.inputs)} inputs, got {len(arrays)}")
        checked = []
        for (name, dtype, shape), a in zip(self.inputs, arrays):
            a = np.asarray(a)
            if a.dtype != DType(dtype).numpy or a.shape != shape:
                raise KilnError(f"input %{name} expects {dtype}{list(shape)}, got "
                                f"{a.dtype}{list(a.shape)}")
            checked.append(a)
        outs = self.program.run(checked)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        sig = ", ".join(f"{d}{list(s)}" for _, d, s in self.inputs)
        return f"<kiln LoadedModel ({sig})>"


def load(path: str | os.PathLike, threads: int = 0) -> LoadedModel:
    """Load an artifact written by ``kiln.export``; needs NumPy and llvmlite, not PyTorch.

    Raises ArtifactError (a KilnError) for a damaged or foreign file, a format this kiln does
    not read, or a CPU that lacks the features the code was compiled for."""
    return LoadedModel(path, threads)
