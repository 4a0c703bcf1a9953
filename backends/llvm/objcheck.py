"""Checks of object code before LLVM's linker sees it, and the signature record it carries.

kiln's object code is an x86-64 ELF relocatable file (LLVM, large code model, PIC). A cached
entry or an artifact hands such a file to LLVM's JIT linker, which trusts it: an out-of-range
section offset or relocation crashes the process inside the linker. ``check_object`` parses
the file with every bound checked first (sizes, offsets, the symbol and relocation tables,
the unwind table's record chain) and refuses anything a kiln compile does not produce:
sections of other kinds (static constructors among them), relocations of other types, and
references to functions outside the few libraries kiln's code calls (OpenMP, memset/memcpy,
libm). This makes a damaged or foreign file a clean error instead of a crash. It is not a
sandbox: object code that passes runs with the process's rights, like any shared library
(signing, ``kiln.export(sign_key=)``, is what says who made an artifact).

Every program carries ``@kiln_signature``, a constant array of i64 that the code generator
writes from the same memory plan and signature the code was generated for:

    [SIGNATURE_MAGIC, SIGNATURE_VERSION, arena bytes, constant bytes, steps,
     number of inputs, number of outputs, then for each input and output: dtype, rank, dims...]

``check_object`` returns it decoded, and ``check_image`` compares it with what a header or a
cache manifest says (arena size, constant blob size, every input's and output's dtype and
shape, the step count), so an edited header is refused before any code runs.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.ir import KilnError

SIGNATURE_SYMBOL = "kiln_signature"
SIGNATURE_MAGIC = int.from_bytes(b"KILNSIG1", "little")
# 2: kiln_run(inputs, outputs, arena, consts, nthreads) takes the call's thread count.
SIGNATURE_VERSION = 2
# The order is part of the signature record: append only.
DTYPE_CODES = {"f32": 0, "f16": 1, "i8": 2, "u8": 3, "i32": 4, "i64": 5, "bool": 6}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                 ("value", "<u8"), ("size", "<u8")])
_RELA = np.dtype([("offset", "<u8"), ("info", "<u8"), ("addend", "<i8")])

_SHT_NOBITS, _SHT_SYMTAB, _SHT_STRTAB, _SHT_RELA = 8, 2, 3, 4
# NULL, PROGBITS, SYMTAB, STRTAB, RELA, NOTE, NOBITS, x86-64 unwind, LLVM address-significance
_SECTION_TYPES = {0, 1, 2, 3, 4, 7, 8, 0x70000001, 0x6FFF4C03}
# x86-64 relocation types LLVM emits for kiln's code, with the bytes each one writes.
_RELOC_WIDTH = {0: 0, 1: 8, 2: 4, 3: 4, 4: 4, 9: 4, 10: 4, 11: 4, 24: 8, 25: 8, 26: 4, 27: 8,
                28: 8, 29: 8, 31: 8, 41: 4, 42: 4}
_SHN_LORESERVE, _SHN_ABS, _SHN_COMMON = 0xFF00, 0xFFF1, 0xFFF2
_MAX_SECTIONS = 1 << 16
_MAX_NOBITS = 1 << 32
_MAX_ALIGN = 1 << 16
# What kiln's code may call: OpenMP, the C library's memory functions, libm (scalar calls the
# vectorizer leaves, or that a target without an instruction needs) and compiler-rt helpers.
_EXTERNAL = re.compile(
    r"(GOMP_parallel|GOMP_barrier|omp_get_thread_num|omp_get_num_threads|_GLOBAL_OFFSET_TABLE_"
    r"|mem(cpy|set|move)"
    r"|(exp|exp2|expm1|log|log2|log10|log1p|pow|sqrt|cbrt|sin|cos|tan|asin|acos|atan|atan2"
    r"|sinh|cosh|tanh|asinh|acosh|atanh|erf|erfc|fma|fmod|remainder|fabs|floor|ceil|trunc"
    r"|round|roundeven|rint|nearbyint|lround|lrint|llround|llrint|fmin|fmax|ldexp|frexp"
    r"|copysign|hypot|sincos)f?"
    r"|__(extend|trunc)[hsdx]f[hsdx]f2|__gnu_(h2f|f2h)_ieee|__powi[sd]f2"
    r"|__(u?div|u?mod)[dt]i3|__(fix|float)\w+)")


class ObjectCodeError(KilnError):
    """Object code kiln will not hand to the linker, or whose signature record disagrees
    with the header or manifest that came with it."""


def _fail(message: str) -> ObjectCodeError:
    return ObjectCodeError(f"object code: {message}",
                           hint="compile or export the model again with this kiln version")


def _cstr(table: bytes, offset: int, what: str) -> str:
    if offset >= len(table):
        raise _fail(f"{what} name offset {offset} lies outside its string table")
    end = table.find(b"\0", offset)
    if end < 0:
        raise _fail(f"{what} name at {offset} is not terminated")
    try:
        return table[offset:end].decode("ascii")
    except UnicodeDecodeError:
        raise _fail(f"{what} name at {offset} is not ASCII") from None


def _check_eh_frame(data: bytes) -> None:
    """The unwind table's records chain to its end (libgcc walks them when anything in the
    process unwinds; a bad length sends it outside the section)."""
    pos, cies = 0, set()
    while pos < len(data):
        if pos + 4 > len(data):
            raise _fail(".eh_frame ends inside a record length")
        (length,) = struct.unpack_from("<I", data, pos)
        if length == 0:  # terminator
            pos += 4
            continue
        if length == 0xFFFFFFFF or pos + 4 + length > len(data) or length < 4:
            raise _fail(f".eh_frame record at {pos} has a bad length {length}")
        (cie_ptr,) = struct.unpack_from("<I", data, pos + 4)
        if cie_ptr == 0:
            cies.add(pos)
        elif pos + 4 - cie_ptr not in cies:
            raise _fail(f".eh_frame record at {pos} points to no CIE")
        pos += 4 + length


def check_object(code: bytes | memoryview) -> list[int]:
    """Check ``code`` as described in the module docstring; returns the decoded-as-integers
    signature record (``decode_signature`` reads it). Raises ObjectCodeError."""
    code = bytes(code)
    n = len(code)
    if n < _EHDR.size:
        raise _fail(f"{n} bytes is too short for an ELF file")
    (ident, e_type, machine, _version, _entry, phoff, shoff, _flags, ehsize, _phentsize,
     phnum, shentsize, shnum, shstrndx) = _EHDR.unpack_from(code)
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1 or ident[6] != 1:
        raise _fail("not a 64-bit little-endian ELF file")
    if e_type != 1 or machine != 62:
        raise _fail(f"not an x86-64 relocatable object (type {e_type}, machine {machine})")
    if ehsize != _EHDR.size or shentsize != _SHDR.size or phnum != 0 or phoff != 0:
        raise _fail("unexpected ELF header sizes or a program header")
    if not 0 < shnum < _MAX_SECTIONS or shoff + shnum * _SHDR.size > n \
            or not 0 < shstrndx < shnum:
        raise _fail(f"section table ({shnum} sections at {shoff}) lies outside the file")
    sections = [_SHDR.unpack_from(code, shoff + i * _SHDR.size) for i in range(shnum)]
    datas: list[bytes] = []
    for i, (_, stype, _, _, off, size, link, _, align, _) in enumerate(sections):
        if stype not in _SECTION_TYPES:
            raise _fail(f"section {i} has a type ({stype:#x}) kiln does not emit")
        if align > _MAX_ALIGN or (align & (align - 1)):
            raise _fail(f"section {i} has a bad alignment {align}")
        if link >= shnum:
            raise _fail(f"section {i} links to section {link}, which does not exist")
        if stype == _SHT_NOBITS:
            if size > _MAX_NOBITS:
                raise _fail(f"section {i} asks for {size} bytes of zeroed memory")
            datas.append(b"")
        else:
            if off + size > n:
                raise _fail(f"section {i} [{off}, {off + size}) lies outside the file")
            datas.append(code[off:off + size])
    if sections[shstrndx][1] != _SHT_STRTAB:
        raise _fail("the section name table is not a string table")
    names = [_cstr(datas[shstrndx], s[0], "section") for s in sections]

    symtabs = [i for i, s in enumerate(sections) if s[1] == _SHT_SYMTAB]
    if len(symtabs) != 1:
        raise _fail(f"{len(symtabs)} symbol tables (one expected)")
    st = symtabs[0]
    _, _, _, _, _, size, strndx, _, _, entsize = sections[st]
    if entsize != _SYM.itemsize or size % _SYM.itemsize or sections[strndx][1] != _SHT_STRTAB:
        raise _fail("malformed symbol table")
    syms = np.frombuffer(datas[st], _SYM)
    strtab = datas[strndx]
    shndx = syms["shndx"].astype(np.int64)
    in_section = (shndx > 0) & (shndx < _SHN_LORESERVE)
    if np.any(in_section & (shndx >= shnum)) or np.any(
            (shndx >= _SHN_LORESERVE) & (shndx != _SHN_ABS) & (shndx != _SHN_COMMON)):
        raise _fail("a symbol names a section that does not exist")
    sizes = np.array([s[5] for s in sections], dtype=object)
    defined: dict[str, tuple[int, int, int]] = {}
    for k in range(len(syms)):
        name = _cstr(strtab, int(syms["name"][k]), "symbol") if syms["name"][k] else ""
        sec, value, sz = int(shndx[k]), int(syms["value"][k]), int(syms["size"][k])
        if 0 < sec < _SHN_LORESERVE:
            if value + sz > sizes[sec]:
                raise _fail(f"symbol {name!r} lies outside its section {names[sec]}")
            if name:
                defined[name] = (sec, value, sz)
        elif sec == 0 and name and not _EXTERNAL.fullmatch(name):
            raise _fail(f"refers to {name!r}, which kiln's code never calls")
        elif sec == _SHN_COMMON:
            raise _fail(f"common symbol {name!r}")

    relocated: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for i, (_, stype, _, _, _, size, link, info, _, entsize) in enumerate(sections):
        if stype != _SHT_RELA:
            continue
        if link != st or entsize != _RELA.itemsize or size % _RELA.itemsize \
                or not 0 < info < shnum or sections[info][1] == _SHT_NOBITS:
            raise _fail(f"malformed relocation section {names[i]}")
        rel = np.frombuffer(datas[i], _RELA)
        kinds = (rel["info"] & 0xFFFFFFFF).astype(np.int64)
        targets = (rel["info"] >> np.uint64(32)).astype(np.int64)
        if np.any(targets >= len(syms)):
            raise _fail(f"a relocation in {names[i]} names a symbol that does not exist")
        width = np.full(len(rel), -1, np.int64)
        for kind, w in _RELOC_WIDTH.items():
            width[kinds == kind] = w
        if np.any(width < 0):
            bad = int(kinds[width < 0][0])
            raise _fail(f"relocation type {bad} in {names[i]} is not one kiln's code uses")
        ends = rel["offset"].astype(object) + width.astype(object)
        if len(rel) and max(ends) > sizes[info]:
            raise _fail(f"a relocation in {names[i]} lies outside section {names[info]}")
        relocated.setdefault(info, []).append((rel["offset"], width))
    for i, name in enumerate(names):
        if name == ".eh_frame":
            _check_eh_frame(datas[i])

    for need in ("kiln_run", "kiln_cycles", "kiln_steps", SIGNATURE_SYMBOL):
        if need not in defined:
            raise _fail(f"it defines no {need}")
    sec, value, sz = defined[SIGNATURE_SYMBOL]
    if sections[sec][1] == _SHT_NOBITS or sz % 8 or not 8 * 7 <= sz <= 1 << 20:
        raise _fail("its signature record is malformed")
    for offsets, width in relocated.get(sec, []):
        if np.any((offsets.astype(np.int64) < value + sz)
                  & (offsets.astype(np.int64) + width > value)):
            raise _fail("its signature record is relocated")
    record = np.frombuffer(datas[sec][value:value + sz], "<i8").tolist()
    steps = record[4] if len(record) > 4 else -1
    csec, _, csz = defined["kiln_cycles"]
    if csz != 8 * max(steps, 1):
        raise _fail(f"kiln_cycles holds {csz} bytes, the signature record says {steps} steps")
    return record


def encode_signature(arena_bytes: int, const_bytes: int, steps: int,
                     inputs: Sequence[tuple[str, str, Sequence[int]]],
                     outputs: Sequence[tuple[str, str, Sequence[int]]]) -> list[int]:
    record = [SIGNATURE_MAGIC, SIGNATURE_VERSION, int(arena_bytes), int(const_bytes),
              int(steps), len(inputs), len(outputs)]
    for _, dtype, shape in (*inputs, *outputs):
        record += [DTYPE_CODES[dtype], len(shape), *(int(d) for d in shape)]
    return record


def signature_global(record: Sequence[int]) -> str:
    """The LLVM IR of ``@kiln_signature`` holding ``record``."""
    body = ", ".join(f"i64 {v}" for v in record)
    return f"@{SIGNATURE_SYMBOL} = constant [{len(record)} x i64] [{body}]\n"


def decode_signature(record: Sequence[int]) -> dict[str, Any]:
    if len(record) < 7 or record[0] != SIGNATURE_MAGIC:
        raise _fail("its signature record has no magic")
    if record[1] != SIGNATURE_VERSION:
        raise _fail(f"signature record version {record[1]} is not {SIGNATURE_VERSION}")
    arena, consts, steps, n_in, n_out = record[2:7]
    pos, tensors = 7, []
    for _ in range(n_in + n_out if 0 <= n_in + n_out <= 8192 else -1):
        if pos + 2 > len(record) or record[pos] not in _CODE_DTYPES \
                or not 0 <= record[pos + 1] <= 16 or pos + 2 + record[pos + 1] > len(record):
            raise _fail("its signature record is truncated or malformed")
        rank = record[pos + 1]
        tensors.append((_CODE_DTYPES[record[pos]], tuple(record[pos + 2:pos + 2 + rank])))
        pos += 2 + rank
    if len(tensors) != n_in + n_out or pos != len(record):
        raise _fail("its signature record is truncated or malformed")
    return {"arena_bytes": arena, "const_bytes": consts, "steps": steps,
            "inputs": tensors[:n_in], "outputs": tensors[n_in:]}


_TRIPLE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_CPU = re.compile(r"[A-Za-z0-9_.-]{0,64}")
_FEATURES = re.compile(r"([+-][A-Za-z0-9_.-]{1,64}(,[+-][A-Za-z0-9_.-]{1,64}){0,1023})?")


def check_target(target: Any) -> None:
    """The target strings an image names, in the form LLVM takes them (a feature without
    its + or - aborts the process inside LLVM)."""
    if not target:
        return
    if not isinstance(target, dict):
        raise _fail("its target is not an object")
    for key, pattern in (("triple", _TRIPLE), ("cpu", _CPU), ("features", _FEATURES)):
        value = target.get(key)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _fail(f"its target {key} {str(value)[:80]!r} is malformed")


def check_image(image: Any) -> None:
    """Check ``image``'s target strings, its object code (``check_object``), and that the
    code's signature record agrees with the image's arena size, constant blob, step table,
    inputs and outputs."""
    check_target(image.target)
    sig = decode_signature(check_object(image.object_code))
    problems = []
    if sig["arena_bytes"] != image.arena_bytes:
        problems.append(f"arena of {image.arena_bytes} bytes, the code uses {sig['arena_bytes']}")
    if sig["const_bytes"] != np.asarray(image.const_blob).nbytes:
        problems.append(f"{np.asarray(image.const_blob).nbytes} bytes of constants, the code "
                        f"reads {sig['const_bytes']}")
    if sig["steps"] != len(image.steps):
        problems.append(f"{len(image.steps)} steps, the code has {sig['steps']}")
    for what, listed, coded in (("input", image.inputs, sig["inputs"]),
                                ("output", image.outputs, sig["outputs"])):
        if len(listed) != len(coded):
            problems.append(f"{len(listed)} {what}s, the code takes {len(coded)}")
            continue
        for (name, dtype, shape), (cdtype, cshape) in zip(listed, coded):
            if (dtype, tuple(shape)) != (cdtype, cshape):
                problems.append(f"{what} %{name} {dtype}{list(shape)}, the code was compiled "
                                f"for {cdtype}{list(cshape)}")
    if problems:
        raise _fail("its signature record disagrees with the header: " + "; ".join(problems))
