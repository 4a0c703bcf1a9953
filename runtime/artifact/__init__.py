"""Ahead-of-time artifacts: one file holding a compiled model, loadable without PyTorch.

The container (magic, format, sealed JSON header, checksummed parts, optional Ed25519
signature) is runtime/artifact/format.py. The header is the manifest: format and kiln
version, target triple and CPU features, input and output names/dtypes/shapes, the pipeline
that produced the model, the arena size, the kernel table, and for every part of the data
(object code, constant blob, constant outputs) its offset, size and SHA-256, and which inputs
index a table (checked on every call). ``load`` reads the file in bounded steps and checks
the magic, the format version, the header's size and digest, every field's type and range,
that parts tile the data, every checksum, the signature (when there is one, or when keys are
trusted), the target and the CPU features; then the object code's structure, and the
signature record the code carries (its arena, constants, steps, inputs and outputs:
backends/llvm/objcheck.py) against the header. Only then does LLVM's linker see the code.
Nothing in the file is ever unpickled or evaluated.

**An artifact is native code.** Loading one runs what it holds with the rights of the
process, like loading a shared library: load artifacts from trusted sources only. The checks
turn damage into errors; they cannot make a hostile file safe. Signing (``kiln.export(...,
sign_key=)``, ``kiln.load(..., trusted_keys=)``) says who wrote a file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.ir import KilnError
from kiln.ir.types import DType
from kiln.runtime.artifact.format import (
    MAGIC,
    Validator,
    peek_kind,
    read_container,
    write_container,
)

__all__ = ["MAGIC", "ArtifactError", "LoadedModel", "load", "read_image", "read_images",
           "save"]

MAX_ARENA_BYTES = 1 << 40


class ArtifactError(KilnError):
    """A kiln artifact that cannot be loaded: damaged, from another kiln or for another CPU."""


def _fail(message: str, hint: str | None = None) -> ArtifactError:
    return ArtifactError(message, hint=hint or "export the model again with this kiln version")


_check = Validator(_fail, "artifact manifest")


def _program_fields(image: Any, prefix: str, parts: dict[str, Any]) -> dict[str, Any]:
    """One program's header fields; its parts (code, constants, constant outputs) are added
    to ``parts`` under ``prefix``."""
    parts[f"{prefix}code"] = bytes(image.object_code)
    parts[f"{prefix}consts"] = np.ascontiguousarray(image.const_blob).reshape(-1).view(np.uint8)
    tensors: dict[str, dict] = {}
    for j, arr in image.copy_constants.items():
        name = f"output{int(j)}"
        arr = np.ascontiguousarray(arr)
        parts[f"{prefix}{name}"] = arr.tobytes()
        tensors[name] = {"dtype": DType.from_numpy(arr.dtype).value, "shape": list(arr.shape),
                         "output": int(j)}
    return {
        "inputs": [[n, d, list(s)] for n, d, s in image.inputs],
        "outputs": [[n, d, list(s)] for n, d, s in image.outputs],
        "arena_bytes": int(image.arena_bytes),
        "output_copies": {str(j): [k, int(i)] for j, (k, i) in image.output_copies.items()},
        "tensors": tensors,
        "steps": image.steps,
        "index_checks": [list(c) for c in image.index_checks],
    }


def save(path: str | os.PathLike, image: Any, *, pipeline: Sequence[str] = (),
         kiln_version: str = "", sign_key: Any = None, overwrite: bool = True,
         variants: Sequence[Any] = (), dims: Sequence[tuple[int, int, str]] = (),
         bounds: dict[str, tuple[int, int]] | None = None, rows: str | None = None) -> Path:
    """Write ``image`` (a backends.llvm ProgramImage) as an artifact at ``path``, signed
    with ``sign_key`` (an Ed25519 private key; artifact_signing.py) when given.

    A dynamic model's artifact holds one program per set of sizes: ``image`` and the
    ``variants`` (more ProgramImages for the same inputs at other sizes of the dynamic
    dimensions ``dims``, (input, dimension, size name) each, within ``bounds``). ``rows``
    names a size whose rows never meet (kiln.ir.symbolic.rows_independent): a loaded model
    runs a call of a row count it has no program for on row slices of counts it has.

    The file is written next to its destination and renamed into place, so a failed export
    never leaves a half-written artifact or overwrites an existing one with garbage; only a
    regular file is replaced, and only with ``overwrite``."""
    parts: dict[str, Any] = {}
    header = {
        "kiln_version": kiln_version,
        "target": dict(image.target),
        "pipeline": list(pipeline),
        **_program_fields(image, "", parts),
    }
    if variants or dims:
        header["dynamic"] = {
            "dims": [[int(i), int(d), str(n)] for i, d, n in dims],
            "bounds": {n: [int(lo), int(hi)] for n, (lo, hi) in (bounds or {}).items()},
            "variants": [{"prefix": f"v{k}.", **_program_fields(v, f"v{k}.", parts)}
                         for k, v in enumerate(variants, 1)],
        }
        if rows is not None:
            header["dynamic"]["rows"] = str(rows)
    return write_container(path, header, parts, sign_key=sign_key, overwrite=overwrite)


# ---- loading ---------------------------------------------------------------------------------
def _check_cpu(target: Any) -> dict:
    from kiln.backends.llvm.compiler import host_target

    _check.want(isinstance(target, dict), "target must be an object")
    for key in ("triple", "cpu", "features"):
        _check.want(isinstance(target.get(key), str), f"target.{key} must be a string")
    _check.want(_check.is_int(target.get("vector_bits")), "target.vector_bits must be an integer")
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


MAX_VARIANTS = 256
"""The most programs (sets of sizes) one dynamic artifact may hold."""


def _program_image(fields: dict, blobs: dict[str, bytes], prefix: str, target: dict) -> Any:
    """Check one program's header fields against its parts; its ProgramImage."""
    from kiln.backends.llvm.compiler import ProgramImage
    from kiln.backends.llvm.objcheck import ObjectCodeError, check_image

    where = f"variant {prefix[:-1]}: " if prefix else ""
    for part in ("code", "consts"):
        _check.want(f"{prefix}{part}" in blobs, f"{where}part {part} is missing")
    inputs = _check.signature(fields.get("inputs"), "input")
    outputs = _check.signature(fields.get("outputs"), "output")
    arena = fields.get("arena_bytes")
    _check.want(_check.is_int(arena) and 0 <= arena <= MAX_ARENA_BYTES, "arena_bytes out of range")
    copies = {}
    raw_copies = fields.get("output_copies")
    _check.want(isinstance(raw_copies, dict), "output_copies must be an object")
    for j, spec in raw_copies.items():
        _check.want(j.isdigit() and int(j) < len(outputs), f"output copy {j!r} names no output")
        _check.want(isinstance(spec, list) and len(spec) == 2 and spec[0] in ("input", "output")
              and _check.is_int(spec[1]) and 0 <= spec[1] < len(inputs if spec[0] == "input"
                                                           else outputs),
              f"output copy {j} is malformed")
        src = (inputs if spec[0] == "input" else outputs)[spec[1]]
        _check.want(src[1:] == outputs[int(j)][1:],
                    f"output copy {j} copies a {src[1]}{list(src[2])} into a "
                    f"{outputs[int(j)][1]}{list(outputs[int(j)][2])}")
        copies[int(j)] = (spec[0], spec[1])
    tensors = fields.get("tensors")
    _check.want(isinstance(tensors, dict), "tensors must be an object")
    copy_consts = {}
    for name, t in tensors.items():
        part = f"{prefix}{name}"
        _check.want(isinstance(name, str) and name.startswith("output") and part in blobs
                    and isinstance(t, dict), f"{where}tensor {name!r} has no part")
        dtype = t.get("dtype")
        _check.want(dtype in {d.value for d in DType}, f"tensor {name} dtype {dtype!r} is unknown")
        shape = _check.shape(t.get("shape"), dtype, f"tensor {name}")
        j = t.get("output")
        _check.want(_check.is_int(j) and 0 <= j < len(outputs), f"tensor {name} names no output")
        _check.want((dtype, shape) == outputs[j][1:],
                    f"tensor {name} is {dtype}{list(shape)}, output {j} is "
                    f"{outputs[j][1]}{list(outputs[j][2])}")
        nbytes = math.prod(shape) * DType(dtype).itemsize
        if nbytes != len(blobs[part]):
            raise _fail(f"{where}tensor {name} holds {len(blobs[part])} bytes, its shape needs "
                        f"{nbytes}")
        copy_consts[j] = np.frombuffer(blobs[part], DType(dtype).numpy).reshape(shape)
    steps = fields.get("steps")
    _check.want(isinstance(steps, list) and all(
        isinstance(s, dict) and all(isinstance(s.get(k), str) for k in ("kernel", "root", "op"))
        and all(_check.is_int(s.get(k)) and s[k] >= 0 for k in ("flops", "bytes"))
        for s in steps), "steps must be a list of {kernel, root, op, flops, bytes}")
    index_checks = []
    raw_checks = fields.get("index_checks", [])
    _check.want(isinstance(raw_checks, list) and len(raw_checks) <= len(inputs),
                "index_checks must be a list")
    for c in raw_checks:
        _check.want(isinstance(c, list) and len(c) == 3 and _check.is_int(c[0])
                    and 0 <= c[0] < len(inputs) and inputs[c[0]][1] in ("i32", "i64")
                    and _check.is_int(c[1]) and isinstance(c[2], str),
                    f"index check {str(c)[:80]} is malformed")
        index_checks.append((c[0], c[1], c[2][:256]))
    image = ProgramImage(
        object_code=blobs[f"{prefix}code"],
        const_blob=np.frombuffer(blobs[f"{prefix}consts"], np.uint8).copy(),
        arena_bytes=arena, inputs=inputs, outputs=outputs, output_copies=copies,
        copy_constants=copy_consts, steps=steps, target=target, index_checks=index_checks)
    try:
        check_image(image)
    except ObjectCodeError as e:
        raise _fail(f"artifact {where}{e.message}") from None
    return image


def _dynamic_variants(header: dict, blobs: dict[str, bytes], first: Any, target: dict
                      ) -> tuple[list[tuple[int, int, str]], dict[str, tuple[int, int]], list]:
    """The dynamic section of a header: dims, bounds and the variants' images, each checked
    to be the first program at other sizes of the dynamic dimensions only."""
    dyn = header.get("dynamic")
    if dyn is None:
        _check.want(set(blobs) <= {"code", "consts"} | {f"output{j}" for j in
                                                         range(len(first.outputs))},
                    "the artifact has parts no program uses")
        return [], {}, []
    _check.want(isinstance(dyn, dict), "dynamic must be an object")
    raw_dims, raw_bounds, raw_variants = dyn.get("dims"), dyn.get("bounds"), dyn.get("variants")
    _check.want(isinstance(raw_dims, list) and 0 < len(raw_dims) <= 64,
                "dynamic.dims must be a list of 1..64 entries")
    _check.want(isinstance(raw_bounds, dict), "dynamic.bounds must be an object")
    _check.want(isinstance(raw_variants, list) and len(raw_variants) < MAX_VARIANTS,
                f"dynamic.variants must be a list of at most {MAX_VARIANTS - 1}")
    dims: list[tuple[int, int, str]] = []
    for d in raw_dims:
        _check.want(isinstance(d, list) and len(d) == 3 and _check.is_int(d[0])
                    and 0 <= d[0] < len(first.inputs) and _check.is_int(d[1])
                    and 0 <= d[1] < len(first.inputs[d[0]][2]) and isinstance(d[2], str)
                    and d[2].isidentifier() and len(d[2]) <= 64,
                    f"dynamic dimension {str(d)[:80]} is malformed")
        dims.append((d[0], d[1], d[2]))
    _check.want(len({(i, d) for i, d, _ in dims}) == len(dims), "a dynamic dimension repeats")
    bounds: dict[str, tuple[int, int]] = {}
    for name in {n for _, _, n in dims}:
        b = raw_bounds.get(name)
        _check.want(isinstance(b, list) and len(b) == 2 and all(_check.is_int(v) for v in b)
                    and 1 <= b[0] <= b[1], f"dynamic bounds of {name} are malformed")
        bounds[name] = (b[0], b[1])
    _check.want(set(raw_bounds) == set(bounds), "dynamic.bounds names unknown sizes")
    _check.want(set(dyn) <= {"dims", "bounds", "variants", "rows"},
                "dynamic has unknown entries")
    images, used = [first], {"code", "consts"} | {f"output{j}" for j in first.copy_constants}
    for k, v in enumerate(raw_variants, 1):
        _check.want(isinstance(v, dict) and v.get("prefix") == f"v{k}.",
                    f"variant {k} must have prefix v{k}.")
        image = _program_image(v, blobs, f"v{k}.", target)
        _check.want(len(image.inputs) == len(first.inputs)
                    and len(image.outputs) == len(first.outputs),
                    f"variant {k} has other inputs or outputs than the first program")
        dynamic_at = {(i, d) for i, d, _ in dims}
        for i, ((n0, t0, s0), (n1, t1, s1)) in enumerate(zip(first.inputs, image.inputs)):
            _check.want(n0 == n1 and t0 == t1 and len(s0) == len(s1) and all(
                a == b or (i, d) in dynamic_at for d, (a, b) in enumerate(zip(s0, s1))),
                f"variant {k} input {n1} differs from the first program beyond its dynamic "
                "dimensions")
        images.append(image)
        used |= {f"v{k}.code", f"v{k}.consts"} | {f"v{k}.output{j}" for j in
                                                   image.copy_constants}
    _check.want(set(blobs) == used, "the artifact has parts no program uses")
    seen = set()
    for k, image in enumerate(images):
        sizes: dict[str, int] = {}
        for i, d, name in dims:
            n = image.inputs[i][2][d]
            _check.want(sizes.setdefault(name, n) == n,
                        f"program {k}: dimensions named {name} differ")
            lo, hi = bounds[name]
            _check.want(lo <= n <= hi, f"program {k}: {name}={n} is outside {lo}..{hi}")
        key = tuple(sorted(sizes.items()))
        _check.want(key not in seen, f"program {k} repeats the sizes of another")
        seen.add(key)
    rows = dyn.get("rows")
    _check.want(rows is None or (isinstance(rows, str) and rows in bounds and all(
        d == 0 for _, d, n in dims if n == rows)),
        "dynamic.rows must name a size held as the leading dimension of its inputs")
    return dims, bounds, images


def read_images(path: str | os.PathLike | bytes, trusted_keys: Any = None
                ) -> tuple[list[Any], dict, list[tuple[int, int, str]], dict]:
    """Read and check an artifact; returns (ProgramImages, header, dynamic dims, bounds): one
    image for a static model, one per exported set of sizes for a dynamic one. No code is
    loaded or run. ``trusted_keys``: see ``load``."""
    header, blobs = read_container(
        path, _fail, ArtifactError, "cpu", ("code", "consts"),
        lambda kind: "load a CUDA artifact with kiln.runtime.artifact.cuda.load_cuda(path)",
        trusted_keys=trusted_keys)
    target = _check_cpu(header.get("target"))
    first = _program_image(header, blobs, "", target)
    dims, bounds, images = _dynamic_variants(header, blobs, first, target)
    return images or [first], header, dims, bounds


def read_image(path: str | os.PathLike | bytes, trusted_keys: Any = None) -> tuple[Any, dict]:
    """Read and check a static model's artifact; returns (ProgramImage, header). No code is
    loaded or run. ``trusted_keys``: see ``load``."""
    images, header, dims, _ = read_images(path, trusted_keys)
    if dims:
        raise _fail("this artifact holds a dynamic model (several programs)",
                    hint="load it with kiln.load(path)")
    return images[0], header


class LoadedModel:
    """A model loaded from an artifact: call it with NumPy arrays, get NumPy arrays back.

    A dynamic model's artifact holds a program per exported set of sizes; a call runs the
    one compiled for its inputs' shapes (``sizes`` lists them)."""

    def __init__(self, path: str | os.PathLike | bytes, threads: int = 0,
                 trusted_keys: Any = None) -> None:
        from kiln.backends.llvm.compiler import CompiledProgram

        images, self.manifest, self.dims, self.bounds = read_images(path, trusted_keys)
        self.inputs = images[0].inputs
        self.outputs = images[0].outputs
        self._programs = {}
        for image in images:
            program = CompiledProgram(image)
            if threads:
                program.threads(threads)
            self._programs[tuple(s for _, _, s in image.inputs)] = (image, program)
        self.program = next(iter(self._programs.values()))[1]

    @property
    def sizes(self) -> list[dict[str, int]]:
        """The sets of sizes this model has programs for (one empty dict when static)."""
        return [{name: shapes[i][d] for i, d, name in self.dims} for shapes in self._programs]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        if len(arrays) != len(self.inputs):
            raise KilnError(f"the model takes {len(self.inputs)} inputs, got {len(arrays)}")
        arrays = [np.asarray(a) for a in arrays]
        found = self._programs.get(tuple(a.shape for a in arrays))
        inputs, program = (found[0].inputs, found[1]) if found else (self.inputs, None)
        for (name, dtype, shape), a in zip(inputs, arrays):
            if a.dtype != DType(dtype).numpy or (a.shape != shape and not self.dims):
                raise KilnError(f"input %{name} expects {dtype}{list(shape)}, got "
                                f"{a.dtype}{list(a.shape)}")
        if program is None:
            parts = self._row_parts(arrays)
            if parts is not None:
                return self._run_rows(arrays, parts)
            got = {name: arrays[i].shape[d] if d < arrays[i].ndim else None
                   for i, d, name in self.dims}
            raise KilnError(f"this artifact has programs for {self.sizes}; the call brings "
                            f"{got} (or other shapes: {[list(a.shape) for a in arrays]})",
                            hint="compile and call those sizes before kiln.export, or export "
                                 "a model compiled for them")
        outs = program.run(arrays)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _row_parts(self, arrays: Sequence[np.ndarray]) -> list[int] | None:
        """Row counts with programs that add up to this call's rows (largest first), when the
        artifact names a size whose rows never meet (``manifest.dynamic.rows``)."""
        rows = (self.manifest.get("dynamic") or {}).get("rows")
        if rows is None or any(a.ndim != len(s) for a, (_, _, s) in zip(arrays, self.inputs)):
            return None
        sliced = {i for i, d, n in self.dims if n == rows}
        shape_of = [a.shape for a in arrays]
        n = shape_of[min(sliced)][0]
        if any(shape_of[i][0] != n for i in sliced):
            return None
        have = sorted({k[min(sliced)][0] for k in self._programs
                       if all(k[i][1:] == shape_of[i][1:] if i in sliced else k[i] == shape_of[i]
                              for i in range(len(arrays)))}, reverse=True)
        parts, left = [], n
        while left:
            part = next((h for h in have if h <= left), None)
            if part is None or len(parts) >= 4096:
                return None
            parts.append(part)
            left -= part
        return parts

    def _run_rows(self, arrays: Sequence[np.ndarray], parts: list[int]
                  ) -> np.ndarray | tuple[np.ndarray, ...]:
        rows = self.manifest["dynamic"]["rows"]
        sliced = {i for i, d, n in self.dims if n == rows}
        pieces, start = [], 0
        for part in parts:
            out = self(*[a[start:start + part] if i in sliced else a
                         for i, a in enumerate(arrays)])
            pieces.append(out if isinstance(out, tuple) else (out,))
            start += part
        joined = tuple(np.concatenate(col, axis=0) for col in zip(*pieces))
        return joined[0] if len(joined) == 1 else joined

    def __repr__(self) -> str:
        sig = ", ".join(f"{d}{list(s)}" for _, d, s in self.inputs)
        more = f", {len(self._programs)} sizes" if self.dims else ""
        return f"<kiln LoadedModel ({sig}){more}>"


def load(path: str | os.PathLike | bytes, threads: int = 0, trusted_keys: Any = None) -> Any:
    """Load an artifact written by ``kiln.export`` (from its path, or its bytes): a CPU
    artifact (llvm backend; needs NumPy and llvmlite, not PyTorch) as a ``LoadedModel``, a
    CUDA one (cuda backend; needs numba and a CUDA GPU of the artifact's compute capability)
    as a ``CudaArtifactModel``.

    **An artifact is native code** (or GPU code): loading it runs what it holds with this
    process's rights, like loading a shared library. Load artifacts from trusted sources only.
    kiln's checks (format, sizes, digests, the code's structure and signature record) turn a
    damaged file into an ArtifactError; they cannot make a hostile file safe.

    ``trusted_keys``: Ed25519 public keys (objects, 32 raw bytes, PEM bytes or PEM file
    paths); when given, only an artifact signed (``kiln.export(..., sign_key=)``) by one of
    them loads. When None, ``KILN_TRUSTED_KEYS`` (PEM paths separated by ``os.pathsep``) is
    the policy if set; otherwise unsigned artifacts load, and a signed one loads only if its
    signature matches its contents (when ``cryptography`` is installed).

    Raises ArtifactError (a KilnError) for a damaged, edited, untrusted or foreign file, a
    format this kiln does not read, or a CPU that lacks the features the code was compiled
    for; CudaArtifactError likewise for CUDA artifacts, and where no GPU can run them."""
    if not isinstance(path, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise KilnError(f"kiln.load takes the path of an artifact (or its bytes), got "
                        f"{type(path).__name__}", hint="kiln.load('model.kiln')")
    if peek_kind(path) == "cuda":
        if threads:
            raise KilnError(f"{path} is a CUDA artifact: threads={threads} applies to CPU "
                            "artifacts only", hint="call kiln.load(path) without threads")
        try:
            from kiln.runtime.artifact.cuda import load_cuda
        except ModuleNotFoundError as e:
            raise KilnError(f"{path} is a CUDA artifact, and loading it needs {e.name}",
                            hint="pip install 'kiln[cuda]' on a machine with a CUDA GPU"
                            ) from None
        return load_cuda(path, trusted_keys=trusted_keys)
    return LoadedModel(path, threads, trusted_keys)
