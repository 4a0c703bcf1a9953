"""Graph -> native code: lowering, kernel schedules, memory plan, LLVM -O3, JIT."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import math
import os
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import llvmlite.binding as llvm
import numpy as np

from kiln.backends.kernel_profile import KernelProfile
from kiln.backends.llvm.cache import cache_key, load_cached, store_cached
from kiln.backends.llvm.codegen import (
    Binding,
    ModuleBuilder,
    emit_entry,
    emit_index_check,
    emit_kernel,
)
from kiln.backends.llvm.objcheck import (
    ObjectCodeError,
    check_image,
    encode_signature,
    signature_global,
)
from kiln.backends.llvm.threads import ThreadChooser
from kiln.ir import DType, Graph, InternalError, KilnError, verify
from kiln.ir import kernel as K
from kiln.ir.kernel import Kernel, structure_key
from kiln.ir.ops.index import index_operands
from kiln.passes.compile import (
    CODE,
    Compilation,
    Stage,
    compile_kernels,
    kernel_stages,
    register_stage,
)
from kiln.passes.instruments import Timing
from kiln.passes.lower import LoweredGraph
from kiln.passes.memory_plan import MemoryPlan
from kiln.passes.target import Target, host_caches, target_from_env
from kiln.passes.tuning import DEFAULT as DEFAULT_TUNING
from kiln.passes.tuning import Tuning


@functools.cache
def host_target() -> Target:
    """The machine kiln runs on: LLVM's host CPU name and features (AVX-512 -> 512-bit
    vectors, AVX2 -> 256, else 128), its caches and cores."""
    feats = llvm.get_host_cpu_features()
    if feats.get("avx512f"):
        bits = 512
    elif feats.get("avx2") and feats.get("fma"):
        bits = 256
    else:
        bits = 128
    return Target(llvm.get_process_triple(), llvm.get_host_cpu_name(), feats.flatten(), bits,
                  **host_caches())


def default_target() -> Target:
    """What ``compile_graph`` compiles for when not told: the host, or the narrower
    instruction set named by ``KILN_TARGET`` (``avx2``, ``sse2``...)."""
    return target_from_env(host_target())


# The OpenMP entry points kiln's code calls (objcheck.py allows no others).
OMP_SYMBOLS = ("GOMP_parallel", "GOMP_barrier", "omp_get_thread_num", "omp_get_num_threads")
_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
             "/usr/lib", "/lib")
_GOMP = None   # kiln's own instance of libgomp, kept loaded


def _gomp_path() -> str | None:
    """The system's libgomp file: ``ldconfig -p``'s answer, else the usual folders."""
    try:
        import subprocess

        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                             timeout=10).stdout
        for line in out.splitlines():
            name, _, path = line.strip().partition(" => ")
            if name.startswith("libgomp.so.1 ") and "x86-64" in name and os.path.isfile(path):
                return path
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return next((f"{d}/libgomp.so.1" for d in _LIB_DIRS if os.path.isfile(f"{d}/libgomp.so.1")),
                None)


@functools.cache
def _init_llvm() -> None:
    """LLVM's native target, and kiln's OpenMP runtime: a private instance of the system's
    libgomp (loaded by path, RTLD_LOCAL, its entry points given to LLVM's linker by name).
    PyTorch ships its own libgomp.so.1, which a load by name would share: its intra-op pool
    then counts against the same libgomp's thread budget as kiln's, and once the two
    together outnumber the cores libgomp makes every worker sleep instead of spin (see
    _PoolThread). Where no system libgomp is found, the process's is used."""
    global _GOMP
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    path = _gomp_path()
    if path is not None:
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_LOCAL", 0))
            for sym in OMP_SYMBOLS:
                llvm.add_symbol(sym, ctypes.cast(getattr(lib, sym), ctypes.c_void_p).value)
            _GOMP = lib
            return
        except (OSError, AttributeError):
            pass
    gomp = ctypes.util.find_library("gomp") or "libgomp.so.1"
    try:
        llvm.load_library_permanently(gomp)
    except RuntimeError as e:
        raise KilnError(f"the OpenMP runtime ({gomp}) could not be loaded: {e}",
                        hint="install libgomp (it ships with gcc)") from None


def optimize_module(ir_text: str, target: Target) -> tuple[llvm.ModuleRef, llvm.TargetMachine]:
    """Parse, verify and optimize (-O3, new pass manager) an LLVM module for ``target``."""
    _init_llvm()
    try:
        mod = llvm.parse_assembly(ir_text)
        mod.verify()
    except RuntimeError as e:
        raise InternalError(f"generated LLVM IR is invalid: {e}") from None
    tm = _target_machine(target)
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    # kiln's schedules unroll what pays (the GEMM micro-kernel); LLVM's unroller on top of
    # them multiplies the code and the JIT time (ResNet-18: 9 s -> 3.5 s without it). Its
    # loop vectorizer still helps the scalar loops kiln leaves (padding copies, tails).
    pto.loop_unrolling = False
    pb = llvm.create_pass_builder(tm, pto)
    pm = pb.getModulePassManager()
    pm.run(mod, pb)
    return mod, tm


@functools.cache
def cycles_per_second() -> float:
    """The cycle counter's rate, measured once against the wall clock."""
    _init_llvm()
    mod = llvm.parse_assembly(
        "declare i64 @llvm.readcyclecounter()\n"
        "define i64 @now() {\n  %t = call i64 @llvm.readcyclecounter()\n  ret i64 %t\n}\n")
    tm = llvm.Target.from_default_triple().create_target_machine(codemodel="large")
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    now = ctypes.CFUNCTYPE(ctypes.c_int64)(engine.get_function_address("now"))
    c0, t0 = now(), time.perf_counter()
    time.sleep(0.05)
    c1, t1 = now(), time.perf_counter()
    return (c1 - c0) / (t1 - t0)


@dataclass
class ProgramImage:
    """Everything needed to run a compiled model without compiling it again: object code,
    the constant blob, the arena size and the signature. It is what the cache stores."""

    object_code: bytes
    const_blob: np.ndarray
    arena_bytes: int
    inputs: list[tuple[str, str, tuple[int, ...]]]      # (name, dtype, shape)
    outputs: list[tuple[str, str, tuple[int, ...]]]
    output_copies: dict[int, tuple[str, int]]           # output -> ("input"|"output", index)
    copy_constants: dict[int, np.ndarray]               # outputs that are graph constants
    steps: list[dict]                                   # kernel, root, op, flops, bytes
    target: dict[str, str]
    # (input, rows, node): integer inputs that index a table of ``rows`` rows at ``node``;
    # each call checks them (the code reads NaN rows for an index outside the table).
    index_checks: list[tuple[int, int, str]] = field(default_factory=list)


def load_code(object_code: bytes, target: Target):
    """JIT-link object code; returns (engine, entry): ``entry(inputs, outputs, arena, consts,
    nthreads)`` is the program's ``kiln_run``."""
    _init_llvm()
    # Linking generates no code: a machine of the triple alone (the image's CPU name and
    # features are checked against the host elsewhere, and reach LLVM only when compiling).
    tm = llvm.Target.from_triple(target.triple).create_target_machine(
        opt=0, reloc="pic", codemodel="large")
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
    engine.add_object_file(llvm.ObjectFileRef.from_data(object_code))
    engine.finalize_object()
    entry = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_int32)(
        engine.get_function_address("kiln_run"))
    return engine, entry


class _PoolThread:
    """The one thread of this process that runs multi-threaded calls of kiln's code.

    libgomp keeps a pool of worker threads for each thread that starts a parallel region.
    Calls from several Python threads (a web server's request threads) would each grow a
    pool; once the pools hold more threads than there are cores, libgomp shortens every
    worker's spin to almost nothing, and each parallel region then waits for the OS to wake
    its workers: on this 2-core VM a ResNet-18 call from a second thread took 15 ms instead
    of 5. So every call that uses more than one thread is handed to this thread (about 15
    microseconds), which owns the only pool; calls on one thread run on their caller, many
    at once. While the pool thread is busy, a call runs on its caller with one thread
    instead of waiting: concurrent callers keep every core busy, none waits for another."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self.busy = 0   # jobs handed over and not finished (written under _count)
        self._count = threading.Lock()

    def run(self, job: Callable[[], None], release: Callable[[], None]) -> None:
        """Run ``job`` on the pool thread and wait for it; ``release`` runs after the job, on
        the pool thread, even if the caller stops waiting (an interrupt): what the job writes
        is given back only once it has finished writing."""
        if self._thread is None or not self._thread.is_alive():
            with self._start:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name="kiln-omp",
                                                    daemon=True)
                    self._thread.start()
        done = threading.Event()
        box: list[BaseException | None] = [None]
        with self._count:
            self.busy += 1
        self._jobs.put((job, release, done, box))
        done.wait()
        if box[0] is not None:
            raise box[0]

    def _loop(self) -> None:
        while True:
            job, release, done, box = self._jobs.get()
            try:
                job()
            except BaseException as e:  # handed back to the caller
                box[0] = e
            finally:
                release()
                with self._count:
                    self.busy -= 1
                done.set()


_POOL_THREAD = _PoolThread()


class CompiledProgram:
    """A compiled model in this process: ``run(list of arrays)`` makes one native call."""

    def __init__(self, image: ProgramImage, *, lowered: LoweredGraph | None = None,
                 ir_text: str = "", timings: dict[str, float] | None = None) -> None:
        self.image = image
        self.lowered = lowered
        self.ir_text = ir_text
        self.timings = dict(timings or {})
        target = Target.from_dict(image.target) if image.target else host_target()
        # Nothing reaches LLVM's linker unchecked: bounds, kinds and the signature record
        # against this image's arena, constants, steps, inputs and outputs (objcheck.py).
        check_image(image)
        self.engine, self.entry = load_code(image.object_code, target)
        # The native index check (absent from code compiled before kiln had it: then NumPy
        # checks the indices, as run_into always did).
        address = (self.engine.get_function_address("kiln_check")
                   if image.index_checks else 0)
        self._native_check = (ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)(address)
                              if address else None)
        # Kernels load weights with full-width vector loads at 64-byte offsets in the blob; a
        # blob that itself starts off a 64-byte boundary splits every such load across two
        # cache lines (a 256-hidden LSTM layer: 1.4 ms instead of 0.9).
        self._consts = aligned_copy(image.const_blob)
        self._out_specs = [(shape, np.dtype(DType(dt).numpy)) for _, dt, shape in image.outputs]
        # The constants never move: their address is taken once (each ``.ctypes.data`` costs
        # about a microsecond on the per-call path).
        self._consts_ptr = self._consts.ctypes.data
        # Each call needs an arena and argument arrays of its own (ctypes lets other Python
        # threads run during the call): calls take one from this pool, or make one, and give
        # it back. list.pop and list.append are atomic, so concurrent callers never share.
        self._free: list[_CallState] = [self._call_state()]
        self._chooser: ThreadChooser | None = None
        self._fixed = 0               # the thread count of every call when not adaptive
        self._choosing = threading.Lock()
        self.threads(0)
        _PROGRAMS.add(self)

    def _call_state(self) -> _CallState:
        arena = aligned_zeros(max(self.image.arena_bytes, 64) + 64)
        return _CallState(arena, arena.ctypes.data,
                          (ctypes.c_void_p * max(len(self.image.inputs), 1))(),
                          (ctypes.c_void_p * max(len(self.image.outputs), 1))())

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Outputs for inputs already checked against the signature. Safe to call from many
        threads at once."""
        return self.run_into(inputs, None)

    __call__ = run

    @property
    def output_specs(self) -> list[tuple[tuple[int, ...], np.dtype]]:
        """Each output's shape and NumPy dtype."""
        return list(self._out_specs)

    @property
    def writes_every_output(self) -> bool:
        """Whether the native code computes every output (none is a copy of an input or a
        constant made after the call): then ``run_into`` can take the output buffers."""
        return not self.image.output_copies and not self.image.copy_constants

    def run_into(self, inputs: list[np.ndarray], outputs: Sequence[int] | None) -> Any:
        """``run`` writing into output buffers the caller owns: ``outputs`` holds the address
        of a C-contiguous buffer of each output's shape and dtype (``output_specs``), which
        the caller keeps alive through the call; None: fresh arrays, returned (``run``).
        Caller-owned buffers need a program that ``writes_every_output``. CompiledModel
        hands it torch tensors allocated ahead of time: after the kernels have streamed a
        model's weights through the caches, making an output tensor costs 20-30 us of cold
        Python and torch code per call, more than some models' kernels."""
        arrays = [a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in inputs]
        if self._native_check is None:
            self._check_indices(arrays)   # else run_addresses checks them natively
        outs = None
        if outputs is None:
            outs = [np.empty(shape, dt) for shape, dt in self._out_specs]
            outputs = [o.ctypes.data for o in outs]
        elif self.image.output_copies or self.image.copy_constants:
            raise InternalError("run_into with output buffers on a program whose outputs "
                                "are copies")
        self.run_addresses([a.ctypes.data for a in arrays], outputs)
        if outs is None:
            return None
        for j, (kind, index) in self.image.output_copies.items():
            outs[j][...] = arrays[index] if kind == "input" else outs[index]
        for j, arr in self.image.copy_constants.items():
            outs[j][...] = arr
        return outs

    def _check_indices(self, arrays: Sequence[np.ndarray]) -> None:
        """A KilnError naming the first input index outside the axis it selects from."""
        for i, rows, node in self.image.index_checks:
            ids = arrays[i]
            # rows < 0: the ops reading this input count negative indices from the end.
            lo, hi = (rows, -rows) if rows < 0 else (0, rows)
            if ids.size and (ids.min() < lo or ids.max() >= hi):
                bad = ids[(ids < lo) | (ids >= hi)].flat[0]
                raise KilnError(f"input %{self.image.inputs[i][0]} holds index {bad}, out of "
                                f"range [{lo}, {hi}) of the axis it selects from",
                                node=node.partition(":")[2] or node,
                                op=node.partition(":")[0] if ":" in node else "embedding",
                                hint="check the indices (token ids) fed to the model")

    def _native_check_failed(self, state: _CallState) -> None:
        """The KilnError for a call whose indices ``kiln_check`` refused, found again on
        NumPy views of the inputs (the failing call only)."""
        arrays = []
        for i, (_, dtype, shape) in enumerate(self.image.inputs):
            dt = np.dtype(DType(dtype).numpy)
            n = math.prod(shape)
            raw = (ctypes.c_byte * (n * dt.itemsize)).from_address(state.inputs[i]) \
                if n else b""
            arrays.append(np.frombuffer(raw, dt, n).reshape(shape))
        self._check_indices(arrays)
        raise InternalError("kiln_check refused indices that NumPy finds in range")

    @property
    def checks_indices(self) -> bool:
        """Whether some input holds indices whose range each call checks (token ids)."""
        return bool(self.image.index_checks)

    @property
    def checks_indices_natively(self) -> bool:
        """Whether ``run_addresses`` itself checks the indices (in native code)."""
        return self._native_check is not None

    def run_addresses(self, inputs: Sequence[int], outputs: Sequence[int]) -> None:
        """The native call on buffers given by address: ``inputs`` C-contiguous, of the
        signature's shapes and dtypes, ``outputs`` as in ``run_into``; the caller keeps them
        alive and has checked them (indices included, where the program ``checks_indices``
        and not ``checks_indices_natively``).
        ``run_into`` ends here; CompiledModel's short path passes torch tensors'
        ``data_ptr()`` here directly (0.06 us each, where a NumPy view and its ``ctypes.data``
        take 1.4 us)."""
        try:
            state = self._free.pop()
        except IndexError:
            state = self._call_state()
        try:
            for i, address in enumerate(inputs):
                state.inputs[i] = address
            for j, address in enumerate(outputs):
                state.outputs[j] = address
            if self._native_check is not None and self._native_check(state.inputs) >= 0:
                self._native_check_failed(state)
        except BaseException:
            self._free.append(state)
            raise
        self._execute(state)

    def _execute(self, state: _CallState) -> None:
        """The native call on ``state`` at the thread count the chooser picks; gives the state
        back to the pool."""
        chooser = self._chooser
        n = self._fixed if chooser is None else chooser.current
        if n != 1 and _POOL_THREAD.busy:
            n, chooser = 1, None   # another call has the pool: run beside it, not after it
        t0 = time.perf_counter()
        if n == 1:
            try:
                self.entry(state.inputs, state.outputs, state.arena_ptr, self._consts_ptr, 1)
            finally:
                self._free.append(state)
        else:
            _POOL_THREAD.run(lambda: self.entry(state.inputs, state.outputs, state.arena_ptr,
                                                self._consts_ptr, n),
                             lambda: self._free.append(state))
        if chooser is not None:
            t1 = time.perf_counter()
            with self._choosing:  # callers in other threads record theirs too
                chooser.after_call(t1 - t0, t1)


    def threads(self, n: int, adaptive: bool = True) -> None:
        """Use up to ``n`` threads (0: one per core). With ``adaptive``, each call uses the
        count (``n``, halved down to 1) that measured fastest on this machine lately (see
        threads.py: small models and loaded machines run faster on fewer); otherwise
        exactly ``n``."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) \
                or not 0 <= n <= MAX_THREADS:
            raise KilnError(f"threads must be an integer from 0 to {MAX_THREADS}, got {n!r}",
                            hint="0 uses every core; 1 runs on the calling thread")
        n = int(n)
        if _IN_FORKED_CHILD:
            n, adaptive = 1, False  # libgomp's pool did not survive fork()
        most = n or _default_threads()
        if adaptive and most > 1:
            self._chooser = ThreadChooser(most, lambda count: None)
        else:
            self._chooser = None
            self._fixed = n

    def _cycles(self) -> np.ndarray:
        n = len(self.image.steps)
        addr = self.engine.get_global_value_address("kiln_cycles")
        return np.ctypeslib.as_array((ctypes.c_int64 * max(n, 1)).from_address(addr))[:n]

    def profile(self, inputs: list[np.ndarray], repeat: int = 10) -> list[KernelProfile]:
        """Per-kernel time (median over ``repeat`` runs), FLOPs and bytes, slowest first; every
        run with the thread count calls use now."""
        self.run(inputs)
        chooser, self._chooser = self._chooser, None
        fixed = self._fixed
        try:
            if chooser is not None:
                self._fixed = chooser.best
            cycles = self._cycles()
            samples = []
            for _ in range(repeat):
                cycles[:] = 0
                self.run(inputs)
                samples.append(cycles.copy())
        finally:
            self._fixed = fixed
            self._chooser = chooser
        per_run = np.median(np.stack(samples), axis=0) / cycles_per_second()
        out = [KernelProfile(s["kernel"], s["root"], s["op"], float(sec), s["flops"], s["bytes"])
               for s, sec in zip(self.image.steps, per_run)]
        return sorted(out, key=lambda p: -p.seconds)


ALIGNMENT = 64
"""Byte alignment of the constant blob and of each call's arena: a cache line, and the width
of an AVX-512 vector (the memory plan aligns every value inside them to it too)."""


def aligned_zeros(nbytes: int) -> np.ndarray:
    """``nbytes`` zeroed bytes starting at a multiple of ALIGNMENT (a view into a slightly
    larger buffer, which it keeps alive)."""
    raw = np.zeros(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes]


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """The bytes of ``array`` in a buffer starting at a multiple of ALIGNMENT (``array``
    itself when it already does)."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    if flat.ctypes.data % ALIGNMENT == 0:
        return flat
    out = aligned_zeros(flat.nbytes)
    out[...] = flat
    return out


@dataclass
class _CallState:
    """What one call of a program writes: its arena and its argument pointer arrays."""

    arena: np.ndarray
    arena_ptr: int
    inputs: ctypes.Array
    outputs: ctypes.Array


# Threads a program may be asked for: beyond this, libgomp tries to allocate a pool for them
# and exits the process when it cannot.
MAX_THREADS = 1024
_PROGRAMS: weakref.WeakSet = weakref.WeakSet()
_IN_FORKED_CHILD = False


def _after_fork_in_child() -> None:
    """libgomp is not fork-safe: its worker threads do not exist in a child, and a parallel
    region there waits for them for ever. Programs in the child run on the calling thread
    (the generated code then never enters libgomp)."""
    global _IN_FORKED_CHILD
    _IN_FORKED_CHILD = True
    for prog in list(_PROGRAMS):
        prog._chooser = None
        prog._fixed = 1
    _POOL_THREAD.__init__()  # its thread did not survive fork() either


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _default_threads() -> int:
    """Threads when the caller asks for none in particular: ``OMP_NUM_THREADS`` when set,
    else one per core this process may run on."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        n = 0
    return n if n > 0 else host_target().cores


def _bindings(step, t: int, plan: MemoryPlan) -> list[Binding]:
    out = []
    for b in step.kernel.params:
        value = step.reads.get(b.name) or step.writes.get(b.name)
        if b.name in step.temps:
            key = f"{t}:{b.name}"
        else:
            key = value if value in plan.storage else b.name
        st = plan.storage[key]
        out.append(Binding(st.kind, st.index))
    return out


def _target_machine(target: Target):
    # The large code model: every reference to another section or to a library function is
    # a 64-bit address. With the small one, code reaches data (constants, the thread count)
    # and libgomp through 32-bit offsets, and where the OS maps the JIT's sections or the
    # library more than 2 GB apart LLVM's linker aborts the whole process (an assertion,
    # seen under QEMU; possible in any large process). Position independent, so the same
    # object code also links into the C library.
    return llvm.Target.from_triple(target.triple).create_target_machine(
        cpu=target.cpu, features=target.features, opt=3, reloc="pic", codemodel="large")


@register_stage
class LlvmIR(Stage):
    """Kernel IR -> one LLVM module: every kernel (identical ones once), the ``kiln_run``
    entry that calls them with their buffers, and the signature record."""

    name = "llvm_ir"
    description = "generate LLVM IR: every kernel, the kiln_run entry, the signature record"
    level = CODE

    def apply(self, c: Compilation) -> Compilation:
        plan, lowered, g = c.memory, c.lowered, c.graph
        m = ModuleBuilder(c.target)
        calls = []
        # Kernels of identical layers (same loops over the same buffer shapes: ResNet's
        # repeated blocks, BERT's 12 layers) are emitted once and called with each layer's
        # buffers; LLVM's time grows with the code, not with the number of calls.
        emitted: dict[str, Kernel] = {}
        for t, step in enumerate(lowered.steps):
            kernel = emitted.setdefault(structure_key(step.kernel), step.kernel)
            if kernel is step.kernel:
                emit_kernel(m, kernel)
            calls.append((kernel, _bindings(step, t, plan)))
        emit_entry(m, calls)
        emit_index_check(m, native_index_checks(g))
        # What the code was generated for, in the code itself: a loader compares it with the
        # header or manifest that comes with the code (objcheck.py).
        m.functions.append(signature_global(encode_signature(
            plan.arena_bytes, np.asarray(plan.const_blob).nbytes, len(calls),
            _signature(g, g.inputs), _signature(g, g.outputs))))
        text = m.text()
        return c.with_code(text, llvm_ir=text)


@register_stage
class LlvmOptimize(Stage):
    """LLVM's -O3 (new pass manager) for the target CPU."""

    name = "llvm_opt"
    description = "verify and optimize the LLVM module at -O3 for the target CPU"
    level = CODE

    def apply(self, c: Compilation) -> Compilation:
        mod, tm = optimize_module(c.code["llvm_ir"], c.target)
        return c.with_code("", llvm_module=mod, target_machine=tm)

    def text(self, c: Compilation) -> str:
        """The optimized module (printed only when a dump asks for it)."""
        return str(c.code["llvm_module"])


@register_stage
class ObjectCode(Stage):
    """Machine code: the optimized module emitted as a relocatable object."""

    name = "object"
    description = "emit the optimized module as object code"
    level = CODE

    def apply(self, c: Compilation) -> Compilation:
        obj = bytes(c.code["target_machine"].emit_object(c.code["llvm_module"]))
        return c.with_code("", object=obj)

    def text(self, c: Compilation) -> str:
        """The machine code as assembly (generated only when a dump asks for it)."""
        return (f"; object code for {c.target.cpu} ({c.target.triple}): "
                f"{len(c.code['object'])} bytes\n"
                + c.code["target_machine"].emit_assembly(c.code["llvm_module"]))


CODEGEN = ("llvm_ir", "llvm_opt", "object")
"""The LLVM backend's stages after the shared kernel pipeline."""


def _signature(g: Graph, names) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(n, g.types[n].dtype.value, g.types[n].shape) for n in names]


@contextlib.contextmanager
def _collector_paused():
    """Python's cycle collector off for a while (back on after, if it was on).

    Lowering and scheduling make millions of small kernel-IR objects and keep many of them:
    each of the collector's full passes then walks the whole process (the model, torch,
    every kernel so far), about a third of their time (DenseNet-121: lowering 1.3 s of CPU
    with it, 0.7 without). Kernel IR is immutable trees, so reference counting frees it;
    the few cycles made meanwhile wait for the next collection."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def build_image(graph: Graph, target: Target, tuning: Tuning = DEFAULT_TUNING,
                instruments=()) -> tuple[ProgramImage, LoweredGraph, str, dict]:
    """The whole compilation of ``graph`` through the shared pipeline (``compile_kernels``):
    fusion, lowering, scheduling, memory plan, then LLVM IR, -O3 and object code."""
    verify(graph)
    timing = Timing()
    with _collector_paused():
        c = compile_kernels(graph, width=target.f32_lanes, target=target, tuning=tuning,
                            code_stages=CODEGEN, instruments=[timing, *instruments])
    plan, lowered, g = c.memory, c.lowered, graph
    copies, copy_consts = {}, {}
    for j, src in plan.output_copies.items():
        if src in g.inputs:
            copies[j] = ("input", g.inputs.index(src))
        elif src in g.constants:
            copy_consts[j] = np.array(g.constants[src])
        else:
            copies[j] = ("output", g.outputs.index(src))
    steps = [{"kernel": s.kernel.name, "root": s.root,
              "op": "/".join(filter(None, (s.kernel.meta.get("op", ""),
                                           s.kernel.meta.get("algorithm", "")))),
              "schedule": s.kernel.meta.get("schedule", ""),
              "flops": int(s.kernel.flops),
              "bytes": int(sum(b.nbytes for b in s.kernel.params if b.name not in s.temps))}
             for s in lowered.steps]
    image = ProgramImage(
        object_code=c.code["object"], const_blob=plan.const_blob, arena_bytes=plan.arena_bytes,
        inputs=_signature(g, g.inputs), outputs=_signature(g, g.outputs), output_copies=copies,
        copy_constants=copy_consts, steps=steps, index_checks=_index_checks(graph),
        target=target.to_dict())
    seconds = {r.name: r.seconds for r in timing.records}
    timings = {"lower": sum(seconds.get(n, 0.0) for n in kernel_stages()),
               "codegen": seconds["llvm_ir"], "optimize": seconds["llvm_opt"],
               "emit": seconds["object"]}
    return image, lowered, c.code["llvm_ir"], timings


# Ops whose output holds only values of their (first) input: an index traced back through them
# to a graph input is checked on that input.
_SAME_VALUES = ("reshape", "permute", "expand", "flatten", "squeeze", "unsqueeze")


def _index_checks(graph: Graph) -> list[tuple[int, int, str]]:
    """(input index, rows, "op:node") for every input that indexes an axis of ``rows``
    entries (embedding, take, gather_elements), directly or through ops that only move
    values (or an integer cast). ``rows`` is negative where every op reading the input counts
    negative indices from the end (allowed: [rows, -rows)); one check per input, the
    narrowest range of its uses."""
    producers = graph.producers()
    checks: dict[int, tuple[int, int, str]] = {}
    for node in graph.nodes:
        for operand, size, wrap in index_operands(node, graph.types):
            v = operand
            while v in producers and (producers[v].op in _SAME_VALUES or (
                    producers[v].op == "cast"
                    and not graph.types[producers[v].inputs[0]].dtype.is_float)):
                v = producers[v].inputs[0]
            if v not in graph.inputs:
                continue
            i = graph.inputs.index(v)
            rows = -size if wrap else size
            if i in checks:
                old = checks[i][1]
                # The intersection of [lo, hi) ranges: negative only if both allow it.
                n = min(abs(old), size)
                rows = -n if (old < 0 and wrap) else n
                if rows == old:
                    continue
            checks[i] = (i, rows, f"{node.op}:{node.name}")
    return sorted(checks.values())


def native_index_checks(graph: Graph) -> list[tuple[int, str, int, int, int]]:
    """``_index_checks`` as ``kiln_check`` takes them: (input index, dtype, element count,
    lo, hi), inputs without elements left out."""
    checks = []
    for i, rows, _ in _index_checks(graph):
        t = graph.types[graph.inputs[i]]
        count = math.prod(t.shape)
        if count:
            lo, hi = (rows, -rows) if rows < 0 else (0, rows)
            checks.append((i, t.dtype.value, count, lo, hi))
    return checks


def compile_graph(graph: Graph, *, target: Target | None = None, threads: int = 0,
                  cache: bool = True, tuning: Tuning = DEFAULT_TUNING) -> CompiledProgram:
    """Compile ``graph`` to native code for ``target`` (default: this machine) with the
    schedule choices of ``tuning``.

    With ``cache`` (and a writable cache directory), the program image is stored on disk under
    a key of the graph, its weights, the target, the tuning and kiln's version, and a later
    compile of the same graph loads it instead of compiling."""
    target = target or default_target()
    t0 = time.perf_counter()
    key = cache_key(graph, target, tuning) if cache else None
    image = load_cached(key) if key else None
    prog = None
    if image is not None:
        try:
            prog = CompiledProgram(image, timings={"cache_load": time.perf_counter() - t0})
        except ObjectCodeError as e:  # a damaged or edited entry: compile afresh
            warnings.warn(f"kiln: ignoring cache entry {key}: {e.message}", stacklevel=2)
    if prog is None:
        image, lowered, ir_text, timings = build_image(graph, target, tuning)
        t1 = time.perf_counter()
        prog = CompiledProgram(image, lowered=lowered, ir_text=ir_text, timings=timings)
        prog.timings["jit"] = time.perf_counter() - t1
        if key:
            store_cached(key, image)
    if threads:
        prog.threads(threads)
    return prog


def run_kernel_llvm(kernel: Kernel, buffers: dict[str, np.ndarray],
                    target: Target | None = None, threads: int = 1) -> None:
    """Run one kernel as native code, in place on flat NumPy ``buffers`` (by parameter name),
    as ``kiln.ir.kernel.run_kernel`` does in the interpreter.

    For the debugger: the kernel is compiled alone (through the same code generator and LLVM
    pipeline as a whole model), so a kernel can be checked against the graph nodes it covers
    at any stage of the pipeline, and codegen against the kernel-IR interpreter."""
    target = target or default_target()
    m = ModuleBuilder(target)
    emit_kernel(m, kernel)
    emit_entry(m, [(kernel, [Binding("input", i) for i in range(len(kernel.params))])])
    mod, tm = optimize_module(m.text(), target)
    engine, entry = load_code(bytes(tm.emit_object(mod)), target)
    arrays = []
    for p in kernel.params:
        arr = buffers.get(p.name)
        if (arr is None or arr.ndim != 1 or arr.size < p.size
                or arr.dtype != np.dtype(K.np_dtype(p.dtype)) or not arr.flags.c_contiguous):
            raise KilnError(f"run_kernel_llvm: buffer {p.name} must be a contiguous flat "
                            f"{p.dtype}[{p.size}] array")
        arrays.append(arr)
    pointers = (ctypes.c_void_p * max(len(arrays), 1))(*[a.ctypes.data for a in arrays])
    entry(ctypes.cast(pointers, ctypes.c_void_p), None, None, None, threads)
    del engine
