"""Ahead-of-time export to C: a compiled model as a shared library with a small C API.

``export_c(compiled, out_dir, name="model")`` writes into ``out_dir``:

    <name>.o            kiln's object code (ELF, PIC), exporting kiln_run
    <name>_weights.bin  the constant blob (and any outputs that are constants), loaded at run time
    <name>.h            the documented C API and the model's signature
    <name>.c            the wrapper: loads and checks the weights, owns the arena, calls kiln_run
    lib<name>.so        <name>.o + <name>.c linked with the system C compiler (-pthread -lgomp
                        -lm)

Only the ``<name>_*`` functions are exported from the library (a version script hides
``kiln_run`` and the kernels), so several exported models can live in one process. The code is
compiled for the CPU that exported it, like a ``kiln.export`` artifact: build and run the library
on a machine of the same kind.

A loaded model may be shared by threads: its calls take turns on a per-model mutex (the model
owns one scratch arena), while models loaded separately run in parallel.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from kiln.ir import KilnError
from kiln.ir.types import DType

_ALIGN = 64
# The C enum's values; the order is part of the ABI of every generated header.
_DTYPE_ENUM = {"f32": 0, "f16": 1, "i8": 2, "u8": 3, "i32": 4, "i64": 5, "bool": 6}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _image_of(compiled_or_image: Any) -> Any:
    """The ProgramImage of a CompiledModel (llvm backend), or the image itself."""
    if hasattr(compiled_or_image, "object_code"):
        return compiled_or_image
    program = getattr(getattr(compiled_or_image, "executable", None), "program", None)
    image = getattr(program, "image", None)
    if image is None:
        backend = getattr(compiled_or_image, "backend", type(compiled_or_image).__name__)
        raise KilnError(f"{backend!s} has no native code to export to C",
                        hint="compile with backend='llvm'")
    return image


def _weights_layout(image: Any) -> tuple[list[bytes], dict[int, tuple[int, int]]]:
    """The weights file's parts (each padded to 64 bytes) and, for every output that is a
    graph constant, its (offset, size) in the file."""
    consts = np.ascontiguousarray(image.const_blob).tobytes()
    parts = [consts, b"\0" * (-len(consts) % _ALIGN)]
    offset = len(consts) + len(parts[1])
    constant_outputs = {}
    for j, arr in sorted(image.copy_constants.items()):
        data = np.ascontiguousarray(arr).tobytes()
        constant_outputs[int(j)] = (offset, len(data))
        pad = b"\0" * (-len(data) % _ALIGN)
        parts += [data, pad]
        offset += len(data) + len(pad)
    return parts, constant_outputs


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _common_types() -> list[str]:
    """The types every generated header shares (guarded, so several headers mix)."""
    return [
        "#ifndef KILN_COMMON_TYPES",
        "#define KILN_COMMON_TYPES",
        "/* Element types; kiln_dtype_size() gives their size in bytes. */",
        "typedef enum kiln_dtype {",
        *(f"    KILN_{k.upper()} = {v}," for k, v in _DTYPE_ENUM.items()),
        "} kiln_dtype;",
        "",
        "static inline size_t kiln_dtype_size(kiln_dtype t) {",
        "    switch (t) {",
        "    case KILN_F16: return 2;",
        "    case KILN_I8: case KILN_U8: case KILN_BOOL: return 1;",
        "    case KILN_I64: return 8;",
        "    default: return 4;",
        "    }",
        "}",
        "",
        "/* One input or output: its name, dtype, rank, shape, elements and bytes. */",
        "typedef struct kiln_tensor_info {",
        "    const char* name;",
        "    kiln_dtype dtype;",
        "    int32_t ndim;",
        "    const int64_t* shape;",
        "    int64_t numel;",
        "    size_t nbytes;",
        "} kiln_tensor_info;",
        "",
        "/* A loaded model: its weights, its scratch arena and that arena's mutex. Opaque. */",
        "typedef struct kiln_model kiln_model;",
        "#endif",
        "",
    ]


def _header_open(up: str) -> list[str]:
    """A generated header's include guard, includes, ``extern "C"`` and shared types."""
    return [f"#ifndef KILN_{up}_H", f"#define KILN_{up}_H", "", "#include <stddef.h>",
            "#include <stdint.h>", "", "#ifdef __cplusplus", 'extern "C" {', "#endif", "",
            *_common_types()]


def _header_close(up: str) -> list[str]:
    """The end of what ``_header_open`` opened."""
    return ["#ifdef __cplusplus", "}", "#endif", f"#endif /* KILN_{up}_H */"]


def _header(image: Any, name: str, weights_bytes: int) -> str:
    up = name.upper()
    lines = [
        f"/* {name}.h: C API of a model compiled ahead of time by kiln.",
        " *",
        f" * Build: link lib{name}.so (or {name}.o + {name}.c with -pthread -lgomp -lm).",
        " *",
        f" *     kiln_model* m = {name}_load(\"{name}_weights.bin\");  // NULL on failure:",
        f" *     if (!m) fprintf(stderr, \"%s\\n\", {name}_error());      // says why",
        f" *     const void* in[{up}_NUM_INPUTS] = {{x}};",
        f" *     void* out[{up}_NUM_OUTPUTS] = {{y}};",
        f" *     {name}_run(m, in, out);                               // 0 on success",
        f" *     {name}_free(m);",
        " *",
        " * Tensors are dense, C-contiguous (row-major) buffers of the dtype and shape the",
        " * constants below give; the caller owns them.",
        " *",
        f" * Threads: a model from {name}_load may be shared by threads. It owns one scratch",
        f" * arena, so its {name}_run calls are serialized by a mutex of that model: calls",
        " * from several threads on one model are correct and take turns, one inference at a",
        f" * time. Models loaded separately ({name}_load twice) have their own arenas and",
        " * mutexes and run in parallel: load one per thread for throughput. "
        f"{name}_free must",
        f" * not overlap a call on the same model. {name}_error is per thread; "
        f"{name}_set_threads",
        " * is process-wide. OpenMP (libgomp) keeps a pool of workers per thread that runs",
        " * parallel code: running multi-threaded models from many threads at once grows one",
        " * pool per calling thread, and once they outnumber the cores every parallel region",
        " * waits for the OS to wake its workers. For many calling threads, use",
        f" * {name}_set_threads(1) (each call then runs on its caller, in parallel with the",
        " * others), or make all multi-threaded calls from one thread.",
        " *",
        " * The code was compiled for (and may use every feature of) this CPU; run it on",
        " * a machine of the same kind:",
        f" *     target {image.target.get('triple', '?')}, cpu {image.target.get('cpu', '?')}",
        " */",
        *_header_open(up),
        f"#define {up}_NUM_INPUTS {len(image.inputs)}",
        f"#define {up}_NUM_OUTPUTS {len(image.outputs)}",
        f"/* Size in bytes of {name}_weights.bin; {name}_load refuses a file of another size. */",
        f"#define {up}_WEIGHTS_BYTES {weights_bytes}ULL",
        f"#define {up}_ARENA_BYTES {int(image.arena_bytes)}ULL",
    ]
    for kind, entries in (("INPUT", image.inputs), ("OUTPUT", image.outputs)):
        for i, (tname, dtype, shape) in enumerate(entries):
            lines += [
                f"/* {kind.lower()} {i}: %{tname}, {dtype}{list(shape)} */",
                f"#define {up}_{kind}{i}_DTYPE KILN_{dtype.upper()}",
                f"#define {up}_{kind}{i}_NDIM {len(shape)}",
                f"#define {up}_{kind}{i}_NUMEL {math.prod(shape)}",
                f"#define {up}_{kind}{i}_BYTES {math.prod(shape) * DType(dtype).itemsize}ULL",
            ]
    lines += [
        "",
        "/* Input/output i's description; NULL when i is out of range. */",
        f"const kiln_tensor_info* {name}_input_info(int i);",
        f"const kiln_tensor_info* {name}_output_info(int i);",
        "",
        f"/* Read the weights file ({up}_WEIGHTS_BYTES bytes) into 64-byte aligned memory and",
        " * allocate the arena. Returns NULL (and sets the message of " + name + "_error) when the",
        " * file cannot be read, has the wrong size, or memory (or a mutex) runs out. */",
        f"kiln_model* {name}_load(const char* weights_path);",
        "",
        "/* Run one inference: inputs[i] points to input i, outputs[j] to a buffer for output",
        " * j (see the constants above). Returns 0, or -1 (and sets the message of "
        + name + "_error)",
        " * when the model or a pointer is NULL. Thread-safe: a call on a model that another",
        " * thread is running waits for it (see Threads above). */",
        f"int {name}_run(kiln_model* model, const void* const* inputs, void* const* outputs);",
        "",
        f"/* Release a model from {name}_load (NULL is allowed); no call on it may be running. */",
        f"void {name}_free(kiln_model* model);",
        "",
        "/* Worker threads of every later run, in every model of this library (0: the OpenMP",
        " * default, all cores). Returns 0, or -1 for a negative n. */",
        f"int {name}_set_threads(int n);",
        "",
        f"/* Why the last {name}_load or {name}_run of this thread failed (\"\" if none). */",
        f"const char* {name}_error(void);",
        "",
        *_header_close(up),
    ]
    return "\n".join(lines) + "\n"


def _infos(name: str, kind: str, entries: list, static: bool = False) -> list[str]:
    """Shape arrays, the tensor-info table and ``<name>_<kind>_info(i)`` (a file-local
    function with ``static``)."""
    lines = []
    for i, (_, _, shape) in enumerate(entries):
        dims = ", ".join(f"{d}LL" for d in shape) or "0"
        lines.append(f"static const int64_t {name}_{kind}_shape{i}[] = {{{dims}}};")
    lines.append(f"static const kiln_tensor_info {name}_{kind}_info_table[] = {{")
    for i, (tname, dtype, shape) in enumerate(entries):
        n = math.prod(shape)
        lines.append(f"    {{{_c_string(tname)}, KILN_{dtype.upper()}, {len(shape)}, "
                     f"{name}_{kind}_shape{i}, {n}LL, {n * DType(dtype).itemsize}ULL}},")
    if not entries:  # C has no empty arrays
        lines.append("    {NULL, KILN_F32, 0, NULL, 0, 0},")
    lines += ["};", "",
              f"{'static ' if static else ''}const kiln_tensor_info* {name}_{kind}_info(int i) {{",
              f"    return i >= 0 && i < {len(entries)} ? &{name}_{kind}_info_table[i] : NULL;",
              "}", ""]
    return lines


def _shared_definitions(name: str, threads: int) -> list[str]:
    """The C both library kinds share: the thread setting, the model struct, the per-thread
    error, and load / free / set_threads (sized by <NAME>_WEIGHTS_BYTES / _ARENA_BYTES)."""
    up = name.upper()
    return [
        "/* Threads of every run of every model of this library (0: the OpenMP default). */",
        f"static atomic_int kiln_threads = {int(threads)};"
        + (f"  /* exported with threads={threads} */" if threads else ""),
        "",
        "struct kiln_model {",
        "    unsigned char* weights;",
        "    void* arena;",
        "    /* kiln_run uses the arena for every intermediate: one run at a time per model. */",
        "    pthread_mutex_t lock;",
        "    int lock_ready;",
        "};",
        "",
        "static _Thread_local char last_error[512];",
        "",
        f"const char* {name}_error(void) {{ return last_error; }}",
        "",
        "static void* aligned(size_t bytes) {",
        "    void* p = NULL;",
        f"    if (posix_memalign(&p, {_ALIGN}, bytes ? bytes : {_ALIGN}) != 0) return NULL;",
        "    return p;",
        "}",
        "",
        f"kiln_model* {name}_load(const char* weights_path) {{",
        "    last_error[0] = '\\0';",
        "    if (!weights_path) {",
        "        snprintf(last_error, sizeof last_error, \"weights path is NULL\");",
        "        return NULL;",
        "    }",
        "    FILE* f = fopen(weights_path, \"rb\");",
        "    if (!f) {",
        "        snprintf(last_error, sizeof last_error, \"cannot open %s: %s\", weights_path,",
        "                 strerror(errno));",
        "        return NULL;",
        "    }",
        "    kiln_model* m = calloc(1, sizeof *m);",
        f"    if (m) m->weights = aligned({up}_WEIGHTS_BYTES);",
        f"    if (m) m->arena = aligned({up}_ARENA_BYTES);",
        "    if (!m || !m->weights || !m->arena) {",
        "        snprintf(last_error, sizeof last_error, \"out of memory\");",
        "        fclose(f);",
        f"        {name}_free(m);",
        "        return NULL;",
        "    }",
        "    int lock_error = pthread_mutex_init(&m->lock, NULL);",
        "    if (lock_error != 0) {",
        "        snprintf(last_error, sizeof last_error, \"cannot create the model's mutex: %s\",",
        "                 strerror(lock_error));",
        "        fclose(f);",
        f"        {name}_free(m);",
        "        return NULL;",
        "    }",
        "    m->lock_ready = 1;",
        f"    memset(m->arena, 0, {up}_ARENA_BYTES);",
        f"    size_t got = fread(m->weights, 1, {up}_WEIGHTS_BYTES, f);",
        "    /* One byte more than expected would be read if the file were too long. */",
        "    int longer = fgetc(f) != EOF;",
        "    int failed = ferror(f);",
        "    fclose(f);",
        f"    if (failed || got != {up}_WEIGHTS_BYTES || longer) {{",
        "        snprintf(last_error, sizeof last_error,",
        "                 \"%s is not the weights of this model: expected %llu bytes, %s\",",
        f"                 weights_path, {up}_WEIGHTS_BYTES,",
        "                 failed ? \"read error\" : longer ? \"the file is longer\"",
        "                                                : \"the file is shorter\");",
        f"        {name}_free(m);",
        "        return NULL;",
        "    }",
        "    return m;",
        "}",
        "",
        f"void {name}_free(kiln_model* model) {{",
        "    if (!model) return;",
        "    if (model->lock_ready) pthread_mutex_destroy(&model->lock);",
        "    free(model->weights);",
        "    free(model->arena);",
        "    free(model);",
        "}",
        "",
        f"int {name}_set_threads(int n) {{",
        "    if (n < 0) return -1;",
        "    atomic_store(&kiln_threads, n);",
        "    return 0;",
        "}",
    ]


def _pointer_checks(up: str) -> list[str]:
    """The run functions' checks that no input or output pointer is NULL."""
    return [
        f"    for (int i = 0; i < {up}_NUM_INPUTS; i++)",
        "        if (!inputs[i]) {",
        "            snprintf(last_error, sizeof last_error, \"input %d is NULL\", i);",
        "            return -1;",
        "        }",
        f"    for (int j = 0; j < {up}_NUM_OUTPUTS; j++)",
        "        if (!outputs[j]) {",
        "            snprintf(last_error, sizeof last_error, \"output %d is NULL\", j);",
        "            return -1;",
        "        }",
    ]


def _index_messages(image: Any) -> list[str]:
    """What the run function says when ``kiln_check`` reports check number c: one message per
    check of an input that has elements, in kiln_check's order (native_index_checks)."""
    messages = []
    for i, rows, node in image.index_checks:
        if math.prod(image.inputs[i][2]):
            lo, hi = (rows, -rows) if rows < 0 else (0, rows)
            messages.append(f"input {i} (%{image.inputs[i][0]}) holds an index out of range "
                            f"[{lo}, {hi}) of the axis it selects from (node {node}); check "
                            "the indices (token ids) fed to the model")
    return messages


def _index_check(check: str, messages: list[str], inputs: str) -> list[str]:
    """The run functions' refusal of out-of-range indices (the kernels would clamp them), by
    the object code's ``check`` function (weak: code made before it existed lacks it)."""
    if not messages:
        return []
    return [
        f"    if ({check}) {{",
        _index_errors(messages, "        "),
        f"        int64_t bad = {check}((void**){inputs});",
        *_index_refusal(len(messages), "        "),
        "    }",
    ]


def _index_errors(messages: list[str], indent: str) -> str:
    """The C table of ``_index_messages``."""
    table = ", ".join(_c_string(m[:400]) for m in messages)
    return f"{indent}static const char* const index_errors[] = {{{table}}};"


def _index_refusal(count: int, indent: str) -> list[str]:
    """Return -1 with check ``bad``'s message when ``bad`` >= 0."""
    return [f"{indent}{line}" for line in (
        "if (bad >= 0) {",
        "    snprintf(last_error, sizeof last_error, \"%s\",",
        f"             bad < {count} ? index_errors[bad]",
        "                          : \"an input holds an index out of range\");",
        "    return -1;",
        "}")]


def _dynamic_index_check(up: str, messages: list[str]) -> list[str]:
    """``_index_check`` for a dynamic model: each program of the plan checks its rows (the
    index ranges are the same at every size)."""
    if not messages:
        return []
    return [
        "    {",
        _index_errors(messages, "        "),
        "        int64_t seen = 0;",
        "        for (int k = 0; k < parts; k++) {",
        "            int q = plan[k];",
        f"            const void* in[{up}_NUM_INPUTS > 0 ? {up}_NUM_INPUTS : 1];",
        f"            int64_t rows = {up}_ROWS_SIZE >= 0 ? programs[q].sizes[{up}_ROWS_SIZE] : 1;",
        f"            for (int i = 0; i < {up}_NUM_INPUTS; i++)",
        "                in[i] = (const char*)inputs[i] + (row_inputs[i]",
        "                        ? seen * (programs[q].input_info(i)->nbytes / rows) : 0);",
        "            int64_t bad = programs[q].check ? programs[q].check((void**)in) : -1;",
        *_index_refusal(len(messages), "            "),
        "            seen += rows;",
        "        }",
        "    }",
    ]


def _wrapper(image: Any, name: str, constant_outputs: dict[int, tuple[int, int]],
             threads: int) -> str:
    up = name.upper()
    copies = []
    for j, (kind, index) in sorted(image.output_copies.items()):
        src = "inputs" if kind == "input" else "outputs"
        copies.append(f"    memcpy(outputs[{j}], {src}[{index}], "
                      f"{name}_output_info({j})->nbytes);")
    for j, (offset, size) in sorted(constant_outputs.items()):
        copies.append(f"    memcpy(outputs[{j}], model->weights + {offset}, {size});")
    lines = [
        f"/* {name}.c: generated by kiln; see {name}.h. */",
        "#define _POSIX_C_SOURCE 200112L",
        f'#include "{name}.h"',
        "",
        "#include <errno.h>",
        "#include <pthread.h>",
        "#include <stdatomic.h>",
        "#include <stdio.h>",
        "#include <stdlib.h>",
        "#include <string.h>",
        "",
        "/* kiln's object code. */",
        "void kiln_run(void** inputs, void** outputs, void* arena, const void* consts,",
        "              int32_t nthreads);",
        "int64_t kiln_check(void** inputs) __attribute__((weak));",
        "",
        *_shared_definitions(name, threads),
        *_infos(name, "input", image.inputs),
        *_infos(name, "output", image.outputs),
        f"int {name}_run(kiln_model* model, const void* const* inputs, void* const* outputs) {{",
        "    if (!model || !outputs",
        f"        || ({up}_NUM_INPUTS > 0 && !inputs)) {{",
        "        snprintf(last_error, sizeof last_error, \"model, inputs or outputs is NULL\");",
        "        return -1;",
        "    }",
        *_pointer_checks(up),
        *_index_check("kiln_check", _index_messages(image), "inputs"),
        "    int lock_error = pthread_mutex_lock(&model->lock);",
        "    if (lock_error != 0) {",
        "        snprintf(last_error, sizeof last_error, \"cannot lock the model: %s\",",
        "                 strerror(lock_error));",
        "        return -1;",
        "    }",
        "    /* kiln_run only reads the inputs; its ABI has no const. */",
        "    kiln_run((void**)inputs, (void**)outputs, model->arena, model->weights,",
        "             (int32_t)atomic_load(&kiln_threads));",
        "    pthread_mutex_unlock(&model->lock);",
        "    /* The copies read only the inputs and the weights: no lock needed. */",
        *copies,
        "    return 0;",
        "}",
        "",
    ]
    return "\n".join(lines) + "\n"


def build_command(out_dir: str | Path, name: str = "model", cc: str = "cc",
                  programs: int = 0) -> list[str]:
    """The command that links ``lib<name>.so`` from ``<name>.o`` (or, for a dynamic model's
    ``programs``, ``<name>_p0.o`` ...) and ``<name>.c``."""
    d = Path(out_dir)
    objects = ([str(d / f"{name}_p{k}.o") for k in range(programs)] if programs
               else [str(d / f"{name}.o")])
    return [cc, "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-std=c11", "-pthread",
            f"-Wl,--version-script={d / (name + '.map')}", "-Wl,-z,noexecstack",
            str(d / f"{name}.c"), *objects, "-o", str(d / f"lib{name}.so"), "-lgomp", "-lm"]


# ---- dynamic models: one program per exported set of sizes ------------------------------------
# The globals kiln's object code defines; each program's copy is renamed to <symbol>_p<k> so
# that several link into one library (a new global would show up as a duplicate at link time).
_OBJECT_GLOBALS = ("kiln_run", "kiln_cycles", "kiln_signature", "kiln_steps", "kiln_check")


def _size_names(dims: list[tuple[int, int, str]]) -> list[str]:
    return list(dict.fromkeys(n for _, _, n in dims))


def _dynamic_header(images: list, dims: list[tuple[int, int, str]], name: str,
                    weights_bytes: int, arena_bytes: int, rows: str | None = None) -> str:
    """The C API of a dynamic model's library (see _dynamic_wrapper)."""
    up = name.upper()
    names = _size_names(dims)
    first = images[0]
    programs = "; ".join(", ".join(f"{n}={image.inputs[i][2][d]}"
                                   for n, (i, d) in _name_positions(dims).items())
                         for image in images)
    lines = [
        f"/* {name}.h: C API of a model with dynamic sizes, compiled ahead of time by kiln.",
        " *",
        f" * It holds one program per exported set of sizes ({len(images)}): {programs}.",
        f" * {name}_run takes the sizes of the call ({up}_NUM_SIZES values, in the order of",
        f" * the {up}_SIZE<k>_NAME constants) and runs the program compiled for them. Where",
        f" * {up}_ROWS_SIZE is a size's index (not -1), that size's rows never meet: a call of",
        " * a row count without a program runs as calls (at most 64) of programs with fewer",
        " * rows, largest first, on consecutive rows of the inputs and outputs (the threads of",
        " * one model take turns for the whole call). Other sizes are refused (-1,",
        f" * and {name}_error says which sizes the library has).",
        " *",
        f" *     kiln_model* m = {name}_load(\"{name}_weights.bin\");",
        f" *     int64_t sizes[{up}_NUM_SIZES] = {{...}};",
        f" *     {name}_run(m, sizes, in, out);  // tensors shaped as {name}_input_info(p, i)",
        " *",
        " * Tensors are dense, C-contiguous buffers; the caller owns them. A model from",
        f" * {name}_load may be shared by threads: its calls take turns on the model's mutex.",
        " * The code was compiled for (and may use every feature of) this CPU:",
        f" *     target {first.target.get('triple', '?')}, cpu {first.target.get('cpu', '?')}",
        " */",
        *_header_open(up),
        f"#define {up}_NUM_INPUTS {len(first.inputs)}",
        f"#define {up}_NUM_OUTPUTS {len(first.outputs)}",
        f"#define {up}_NUM_SIZES {len(names)}",
        *(f"#define {up}_SIZE{k}_NAME {_c_string(n)}" for k, n in enumerate(names)),
        f"#define {up}_NUM_PROGRAMS {len(images)}",
        f"#define {up}_ROWS_SIZE {names.index(rows) if rows in names else -1}",
        f"#define {up}_WEIGHTS_BYTES {weights_bytes}ULL",
        f"#define {up}_ARENA_BYTES {arena_bytes}ULL",
        "",
        f"/* Program p's sizes into sizes[0..{up}_NUM_SIZES); -1 when p is out of range. */",
        f"int {name}_program_sizes(int p, int64_t* sizes);",
        "/* Input/output i of program p; NULL when p or i is out of range. */",
        f"const kiln_tensor_info* {name}_input_info(int p, int i);",
        f"const kiln_tensor_info* {name}_output_info(int p, int i);",
        "",
        f"/* Read the weights file ({up}_WEIGHTS_BYTES bytes, every program's) and allocate",
        f" * the arena. NULL (and {name}_error) on failure. */",
        f"kiln_model* {name}_load(const char* weights_path);",
        "/* Run the program for `sizes` (or, see above, programs on row slices). 0, or -1 (and",
        f" * {name}_error) for NULL pointers or sizes no program or sum of rows has. */",
        f"int {name}_run(kiln_model* model, const int64_t* sizes, const void* const* inputs,",
        "             void* const* outputs);",
        f"void {name}_free(kiln_model* model);",
        "/* Worker threads of every later run (0: the OpenMP default); -1 for n < 0. */",
        f"int {name}_set_threads(int n);",
        f"const char* {name}_error(void);",
        "",
        *_header_close(up),
    ]
    return "\n".join(lines) + "\n"


def _name_positions(dims: list[tuple[int, int, str]]) -> dict[str, tuple[int, int]]:
    """Each size name's first (input, dimension)."""
    out: dict[str, tuple[int, int]] = {}
    for i, d, n in dims:
        out.setdefault(n, (i, d))
    return out


def _dynamic_wrapper(images: list, dims: list[tuple[int, int, str]], name: str,
                     weights: list[tuple[int, dict[int, tuple[int, int]]]], threads: int,
                     rows: str | None = None) -> str:
    """The wrapper of a dynamic model's library: the shared load/free/threads/error code,
    per-program tensor tables, and a run that picks the program by the call's sizes."""
    up = name.upper()
    names = _size_names(dims)
    positions = _name_positions(dims)
    lines = [
        f"/* {name}.c: generated by kiln; see {name}.h. */",
        "#define _POSIX_C_SOURCE 200112L",
        f'#include "{name}.h"',
        "",
        "#include <errno.h>",
        "#include <inttypes.h>",
        "#include <pthread.h>",
        "#include <stdatomic.h>",
        "#include <stdio.h>",
        "#include <stdlib.h>",
        "#include <string.h>",
        "",
        "typedef void (*kiln_entry)(void**, void**, void*, const void*, int32_t);",
        *(f"void kiln_run_p{k}(void** inputs, void** outputs, void* arena, const void* consts,"
          f" int32_t nthreads);" for k in range(len(images))),
        *(f"int64_t kiln_check_p{k}(void** inputs) __attribute__((weak));"
          for k in range(len(images))),
        "",
        *_shared_definitions(name, threads),
    ]
    for k, image in enumerate(images):
        lines += _infos(f"{name}_p{k}", "input", image.inputs, static=True)
        lines += _infos(f"{name}_p{k}", "output", image.outputs, static=True)
        offset, constant_outputs = weights[k]
        lines += [f"static void copies_p{k}(const void* const* inputs, void* const* outputs,",
                  "                       const unsigned char* weights) {",
                  "    (void)inputs; (void)outputs; (void)weights;"]
        for j, (kind, index) in sorted(image.output_copies.items()):
            src = "inputs" if kind == "input" else "outputs"
            lines.append(f"    memcpy(outputs[{j}], {src}[{index}], "
                         f"{name}_p{k}_output_info({j})->nbytes);")
        for j, (off, size) in sorted(constant_outputs.items()):
            lines.append(f"    memcpy(outputs[{j}], weights + {offset + off}, {size});")
        lines += ["}", ""]
    lines += [
        "static const struct {",
        "    kiln_entry run;",
        "    int64_t (*check)(void**);",
        f"    int64_t sizes[{len(names)}];",
        "    size_t weights_offset;",
        "    const kiln_tensor_info* (*input_info)(int);",
        "    const kiln_tensor_info* (*output_info)(int);",
        "    void (*copies)(const void* const*, void* const*, const unsigned char*);",
        "} programs[] = {",
    ]
    for k, image in enumerate(images):
        sizes = ", ".join(f"{image.inputs[i][2][d]}LL" for i, d in positions.values())
        lines.append(f"    {{kiln_run_p{k}, kiln_check_p{k}, {{{sizes}}}, {weights[k][0]}, "
                     f"{name}_p{k}_input_info, "
                     f"{name}_p{k}_output_info, copies_p{k}}},")
    listing = "; ".join(", ".join(f"{n}={image.inputs[i][2][d]}" for n, (i, d) in
                                  positions.items()) for image in images)
    row_inputs = [int(any(i == j and d == 0 and n == rows for j, d, n in dims))
                  for i in range(len(images[0].inputs))] or [0]
    lines += [
        "};",
        "",
        "/* Inputs that hold the rows of the ROWS_SIZE size as their leading dimension. */",
        f"static const int row_inputs[] = {{{', '.join(map(str, row_inputs))}}};",
        "",
        "/* The programs whose rows add up to sizes[ROWS_SIZE] (largest first, the other sizes",
        " * equal), into plan[]; their count, or -1. */",
        "static int rows_plan(const int64_t* sizes, int* plan, int most) {",
        f"    int r = {up}_ROWS_SIZE, n = 0;",
        "    if (r < 0 || sizes[r] < 1) return -1;",
        "    for (int64_t left = sizes[r]; left > 0; n++) {",
        "        int best = -1;",
        f"        for (int q = 0; q < {up}_NUM_PROGRAMS; q++) {{",
        "            int same = 1;",
        f"            for (int s = 0; s < {up}_NUM_SIZES; s++)",
        "                if (s != r && programs[q].sizes[s] != sizes[s]) same = 0;",
        "            if (same && programs[q].sizes[r] <= left",
        "                && (best < 0 || programs[q].sizes[r] > programs[best].sizes[r]))",
        "                best = q;",
        "        }",
        "        if (best < 0 || n == most) return -1;",
        "        plan[n] = best;",
        "        left -= programs[best].sizes[r];",
        "    }",
        "    return n;",
        "}",
        "",
        f"int {name}_program_sizes(int p, int64_t* sizes) {{",
        f"    if (p < 0 || p >= {up}_NUM_PROGRAMS || !sizes) return -1;",
        "    memcpy(sizes, programs[p].sizes, sizeof programs[p].sizes);",
        "    return 0;",
        "}",
        "",
        f"const kiln_tensor_info* {name}_input_info(int p, int i) {{",
        f"    return p >= 0 && p < {up}_NUM_PROGRAMS ? programs[p].input_info(i) : NULL;",
        "}",
        f"const kiln_tensor_info* {name}_output_info(int p, int i) {{",
        f"    return p >= 0 && p < {up}_NUM_PROGRAMS ? programs[p].output_info(i) : NULL;",
        "}",
        "",
        f"int {name}_run(kiln_model* model, const int64_t* sizes, const void* const* inputs,",
        "             void* const* outputs) {",
        "    if (!model || !sizes || !outputs",
        f"        || ({up}_NUM_INPUTS > 0 && !inputs)) {{",
        "        snprintf(last_error, sizeof last_error,",
        "                 \"model, sizes, inputs or outputs is NULL\");",
        "        return -1;",
        "    }",
        "    int p = 0;",
        f"    while (p < {up}_NUM_PROGRAMS",
        "           && memcmp(programs[p].sizes, sizes, sizeof programs[p].sizes) != 0) p++;",
        "    int plan[64], parts = 1;",
        f"    if (p < {up}_NUM_PROGRAMS) {{",
        "        plan[0] = p;",
        "    } else if ((parts = rows_plan(sizes, plan, 64)) < 0) {",
        "        snprintf(last_error, sizeof last_error,",
        f"                 \"no program for these sizes; this library has: %s\", "
        f"{_c_string(listing[:400])});",
        "        return -1;",
        "    }",
        *_pointer_checks(up),
        *_dynamic_index_check(up, _index_messages(images[0])),
        "    int lock_error = pthread_mutex_lock(&model->lock);",
        "    if (lock_error != 0) {",
        "        snprintf(last_error, sizeof last_error, \"cannot lock the model: %s\",",
        "                 strerror(lock_error));",
        "        return -1;",
        "    }",
        "    int64_t done = 0;",
        "    for (int k = 0; k < parts; k++) {",
        "        int q = plan[k];",
        f"        const void* in[{up}_NUM_INPUTS > 0 ? {up}_NUM_INPUTS : 1];",
        f"        void* out[{up}_NUM_OUTPUTS > 0 ? {up}_NUM_OUTPUTS : 1];",
        f"        int64_t rows = {up}_ROWS_SIZE >= 0 ? programs[q].sizes[{up}_ROWS_SIZE] : 1;",
        "        /* One program: done stays 0. On row slices every output holds the rows. */",
        f"        for (int i = 0; i < {up}_NUM_INPUTS; i++)",
        "            in[i] = (const char*)inputs[i]",
        "                    + (row_inputs[i] ? done * (programs[q].input_info(i)->nbytes / rows)",
        "                                     : 0);",
        f"        for (int j = 0; j < {up}_NUM_OUTPUTS; j++)",
        "            out[j] = (char*)outputs[j]",
        "                     + done * (programs[q].output_info(j)->nbytes / rows);",
        "        programs[q].run((void**)in, (void**)out, model->arena,",
        "                        model->weights + programs[q].weights_offset,",
        "                        (int32_t)atomic_load(&kiln_threads));",
        "        programs[q].copies(in, out, model->weights);",
        "        done += rows;",
        "    }",
        "    pthread_mutex_unlock(&model->lock);",
        "    return 0;",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _export_dynamic(dynamic: Any, out: Path, name: str, threads: int) -> None:
    """Write a dynamic model's library sources and objects into ``out``."""
    programs = dynamic.programs()
    images = [_image_of(p) for p in programs]
    dims = [(i, d, n) for i, ds in sorted(dynamic.dims.items()) for d, n in sorted(ds.items())]
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        raise KilnError("exporting a dynamic model to C needs objcopy (binutils), to link "
                        "one program per size into one library",
                        hint="install binutils, or export one size: "
                             "export_c(dynamic_model.specialize(*inputs), out_dir)")
    blob, weights, offset = [], [], 0
    for image in images:
        parts, constant_outputs = _weights_layout(image)
        weights.append((offset, constant_outputs))
        blob += parts
        offset += sum(len(p) for p in parts)
    arena = max(int(image.arena_bytes) for image in images)
    out.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        raw = out / f".{name}_p{k}.raw.o"
        raw.write_bytes(bytes(image.object_code))
        renames = [a for g in _OBJECT_GLOBALS for a in ("--redefine-sym", f"{g}={g}_p{k}")]
        done = subprocess.run([objcopy, *renames, str(raw), str(out / f"{name}_p{k}.o")],
                              capture_output=True, text=True)
        raw.unlink()
        if done.returncode != 0:
            raise KilnError(f"objcopy failed on program {k}: {done.stderr.strip()}")
    (out / f"{name}_weights.bin").write_bytes(b"".join(blob))
    rows = dynamic.rows[0] if getattr(dynamic, "split_rows", False) else None
    (out / f"{name}.h").write_text(_dynamic_header(images, dims, name, offset, arena, rows))
    (out / f"{name}.c").write_text(_dynamic_wrapper(images, dims, name, weights, threads, rows))


def find_c_compiler() -> str | None:
    """The system C compiler (``cc``, else ``gcc``, else ``clang``), or None."""
    for cc in ("cc", "gcc", "clang"):
        path = shutil.which(cc)
        if path:
            return path
    return None


def export_c(compiled_or_image: Any, out_dir: str | Path, name: str = "model", *,
             threads: int = 0, overwrite: bool = False) -> Path:
    """Write ``compiled_or_image`` (a CompiledModel of the llvm backend, or its ProgramImage)
    as a C library in ``out_dir`` and build ``lib<name>.so``; returns ``out_dir``. A
    DynamicModel (``kiln.compile(..., dynamic=...)``) gives a library holding a program per
    set of sizes it has compiled, whose ``<name>_run`` takes the sizes (see its header).

    ``name`` prefixes every file and every C function (``<name>_load`` ...); it must be a C
    identifier. ``threads`` (when not 0) is the worker threads ``<name>_load`` sets, as if it
    called ``<name>_set_threads(threads)``. An existing ``out_dir`` that is not empty is
    refused unless ``overwrite``.

    Raises:
        KilnError: for a model without native code, a bad name, an existing output, a folder
            that cannot be written, no C compiler (the sources are written first, and the
            message says how to build them), or a failed build (with the compiler's message).
    """
    dynamic = compiled_or_image if hasattr(compiled_or_image, "programs") else None
    if threads < 0:
        raise KilnError(f"threads must be 0 or more, got {threads}")
    if not _NAME.fullmatch(name):
        raise KilnError(f"library name {name!r} is not a C identifier",
                        hint="use letters, digits and underscores, e.g. name='model'")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise KilnError(f"{out} exists and is not a directory", hint="choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise KilnError(f"{out} already exists and is not empty",
                        hint="choose another directory or pass overwrite=True (--overwrite)")
    try:
        if dynamic is not None:
            _export_dynamic(dynamic, out, name, threads)
        else:
            image = _image_of(compiled_or_image)
            parts, constant_outputs = _weights_layout(image)
            weights_bytes = sum(len(p) for p in parts)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.o").write_bytes(bytes(image.object_code))
            (out / f"{name}_weights.bin").write_bytes(b"".join(parts))
            (out / f"{name}.h").write_text(_header(image, name, weights_bytes))
            (out / f"{name}.c").write_text(_wrapper(image, name, constant_outputs, threads))
        (out / f"{name}.map").write_text(f"{{\n  global: {name}_*;\n  local: *;\n}};\n")
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise KilnError(f"cannot write the C library into {out}: {e.strerror or e}{where}",
                        hint="choose a folder you can write to") from e
    cc = find_c_compiler()
    command = build_command(out, name, cc or "cc",
                            len(dynamic.programs()) if dynamic is not None else 0)
    if cc is None:
        raise KilnError(f"no C compiler found; the sources are in {out}",
                        hint="install gcc, then run: " + " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise KilnError(f"building lib{name}.so failed:\n{done.stderr.strip()}",
                        hint="run: " + " ".join(command))
    return out
