"""The machine kiln generates code for: instruction set, vector width, caches, cores.

A ``Target`` is a value. Lowering derives its schedules from it (register tiles from the vector
register count, cache blocking from the cache sizes, the int8 kernel from the dot-product
instructions, the parallel split from the core count) and the compile cache hashes it whole.
The LLVM backend makes the host's (``kiln.backends.llvm.host_target``); ``named_target``
makes a narrower one that runs on this machine, so that code for CPUs kiln's users have
(AVX2 without AVX-512 or VNNI: AMD Zen 1-3, Intel before Ice Lake) is compiled and tested
here too. ``KILN_TARGET=avx2`` (or ``x86-64-v3``) makes that the default for every compile.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from kiln.ir import KilnError

# LLVM CPU names and the feature sets that make them; the first name of each is canonical.
_ISAS = {
    "avx512": ("skylake-avx512",
               "+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+avx512f,+avx512cd,+avx512bw,"
               "+avx512dq,+avx512vl", 512),
    "avx512-vnni": ("cascadelake",
                    "+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+avx512f,+avx512cd,"
                    "+avx512bw,+avx512dq,+avx512vl,+avx512vnni", 512),
    "avx2": ("haswell", "+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi,+bmi2", 256),
    "sse2": ("x86-64", "+sse2", 128),
}
_ALIASES = {"x86-64-v4": "avx512", "x86-64-v3": "avx2", "haswell": "avx2", "x86-64": "sse2",
            "skylake-avx512": "avx512", "cascadelake": "avx512-vnni"}
NAMES = tuple(_ISAS) + tuple(_ALIASES)


@dataclass(frozen=True)
class Target:
    """A CPU to compile for. ``features`` is LLVM's feature string (``+avx2,+fma,...``).

    Cache sizes are per core (L1 data, L2) and per package (L3), in bytes."""

    triple: str
    cpu: str
    features: str
    vector_bits: int
    name: str = "host"
    l1d_bytes: int = 32 * 1024
    l2_bytes: int = 1024 * 1024
    l3_bytes: int = 8 * 1024 * 1024
    cores: int = 1

    @property
    def f32_lanes(self) -> int:
        return self.vector_bits // 32

    def has(self, feature: str) -> bool:
        """Whether the LLVM feature (``avx512vnni``, ``avx2``...) is enabled."""
        return f"+{feature}" in self.features.split(",")

    @property
    def vector_registers(self) -> int:
        """Architectural vector registers: 32 with AVX-512, else 16."""
        return 32 if self.has("avx512f") else 16

    def dot4_instruction(self, lanes: int, s_max: int = 128) -> str:
        """How a ``lanes``-wide u8 x i8 four-term dot product (kernel IR ``dot_add4``) whose
        signed operand stays within +-``s_max`` is computed here:

        - ``vnni``: one exact instruction (vpdpbusd: AVX-512 VNNI, or AVX-VNNI up to 256 bits);
        - ``maddubs``: pmaddubsw + pmaddwd (SSSE3 / AVX2 / AVX-512BW); its pair sums saturate
          at 16 bits, so only for |s| <= 64 (2 x 255 x 64 < 2^15);
        - ``widen``: both operands widened to 16 bits (exact for any operand, slow)."""
        if lanes * 32 > self.vector_bits or lanes not in (4, 8, 16):
            return "widen"
        if self.has("avx512vnni") and (lanes == 16 or self.has("avx512vl")):
            return "vnni"
        if lanes in (4, 8) and self.has("avxvnni"):
            return "vnni"
        if s_max <= 64 and ((lanes == 16 and self.has("avx512bw"))
                            or (lanes == 8 and self.has("avx2"))
                            or (lanes == 4 and (self.has("ssse3") or self.has("avx")))):
            return "maddubs"
        return "widen"

    @property
    def int8_dot(self) -> str:
        """The int8 dot product of full-width vectors with weights quantized for this target
        (see ``dot4_instruction``)."""
        return self.dot4_instruction(self.f32_lanes, self.int8_weight_max)

    @property
    def int8_weight_max(self) -> int:
        """The largest |weight| int8 layers may use on this target: 127, or 64 where the dot
        product's 16-bit pair sums would otherwise saturate (2 x 255 x 64 < 2^15)."""
        if self.dot4_instruction(self.f32_lanes) == "vnni":
            return 127
        return 64 if self.dot4_instruction(self.f32_lanes, 64) == "maddubs" else 127

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Target:
        """A target from ``to_dict`` output (older records without cache sizes included)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def key(self) -> str:
        """Everything about the target that can change generated code, as text."""
        return repr(sorted(self.to_dict().items()))


def _size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def host_caches() -> dict[str, int]:
    """L1d, L2, L3 sizes of CPU 0 from sysfs, and the usable core count (defaults where the
    OS does not say)."""
    out = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(base.glob("index*")):
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            size = _size((idx / "size").read_text())
            if level == "1" and kind == "Data":
                out["l1d_bytes"] = size
            elif level == "2" and kind != "Instruction":
                out["l2_bytes"] = size
            elif level == "3" and kind != "Instruction":
                out["l3_bytes"] = size
    except (OSError, ValueError):
        pass
    try:
        out["cores"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        out["cores"] = os.cpu_count() or 1
    return out


def named_target(name: str, host: Target) -> Target:
    """``host`` with the instruction set of ``name`` (``avx2``, ``avx512``, ``sse2``... or
    ``host``): its caches and cores stay the host's, as the code runs here."""
    if name in ("host", "native", ""):
        return host
    isa = _ALIASES.get(name, name)
    if isa not in _ISAS:
        raise KilnError(f"unknown target {name!r}",
                        hint=f"use one of host, {', '.join(NAMES)}")
    cpu, features, bits = _ISAS[isa]
    need = {f[1:] for f in features.split(",")}
    missing = sorted(f for f in need if not host.has(f))
    if missing:
        raise KilnError(f"target {name!r} needs CPU features this machine lacks: "
                        f"{', '.join(missing)}",
                        hint="compile for a narrower target (avx2, sse2) or for host")
    return replace(host, cpu=cpu, features=features, vector_bits=bits, name=isa)


def target_from_env(host: Target) -> Target:
    """The default target: ``KILN_TARGET`` when set, else the host."""
    return named_target(os.environ.get("KILN_TARGET", "host").strip().lower(), host)
