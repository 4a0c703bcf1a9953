"""Schedule choices as one value: the thresholds lowering's heuristics use, the switches a user
may turn (Winograd), and the algorithms the autotuner measured per kernel.

What the target decides (vector width, register tiles, cache blocking, int8 instructions) lives
in ``Target``; what it does not decide lives here, with defaults measured on kiln's zoo (the
comments where each is used say what was measured). A ``Tuning`` is passed to lowering and
scheduling (never read from module globals) and hashed whole into the compile cache's key, so
no compile under one tuning is ever served code made under another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from kiln.ir import KilnError

CONV_ALGORITHMS = ("winograd", "direct_t", "direct_batch", "padded_direct", "batched_im2col",
                   "gemm")


@dataclass(frozen=True)
class Tuning:
    """Every schedule parameter lowering does not derive from the target."""

    # Winograd F(4,3) along the rows for 3x3 stride-1 convs with at least winograd_min_cin
    # input channels and winograd_min_pixels output pixels per batch (lower/winograd.py);
    # off: direct convolutions (an inf or NaN then stays in its own outputs).
    winograd: bool = True
    winograd_min_pixels: int = 128
    winograd_min_cin: int = 16
    # Batched direct convolution (all images in one GEMM): used while it computes at most this
    # many GEMM columns per output pixel (the columns between images are dropped).
    direct_batch_max_waste: float = 1.6
    # Up to this many output pixels per image (at any batch) convolutions run as the
    # transposed batched direct GEMM (pixels as rows, output channels as vectors), in K blocks
    # of direct_t_kc.
    direct_t_max_pixels: int = 64
    direct_t_kc: int = 64
    # 1x1 convolutions with at most this many row tiles of output channels read their input
    # in place, unpacked (MobileNetV2's projections to 16-32 channels: about 2x faster).
    direct_unpacked_max_row_tiles: int = 4
    # Stride-1 depthwise convolutions of maps up to this many pixels read a padded copy;
    # larger ones, and strided ones, read their input in place (MobileNetV2: 56x56 2x faster,
    # 112x112 15% slower).
    depthwise_padded_max_pixels: int = 4096
    # Folding images into one GEMM pays for small maps (few column tiles per image); for large
    # ones the all-images im2col buffer no longer fits in cache.
    batched_im2col_max_pixels: int = 1024
    # Threads take whole images only while the weights and an image's workspace stay small.
    image_parallel_max_weight_bytes: int = 1 << 19
    image_parallel_max_workspace_bytes: int = 1 << 22
    # Work below which a kernel runs on the calling thread (waking the pool costs more).
    parallel_min_macs: int = 1 << 18
    parallel_min_work: int = 1 << 17
    int8_parallel_min_macs: int = 1 << 19
    # Batched matmuls of runtime operands (attention's q @ k^T and p @ v) split batch entries
    # over threads only above this: BERT's 4 heads of 32x32x64 (262k MACs) took 33 us
    # per 4 layers at 2 threads against 29 at 1.
    batched_parallel_min_macs: int = 1 << 20
    # GEMM row blocking (microkernel.row_block) pays where A would stream from L3 once per column
    # tile, many times over: only with this many column tiles (with few, threads would split
    # columns instead of rows, which measured slower). Column groups per core: enough that
    # each thread's chunks of the parallel loop are whole groups (no B panel shared).
    min_blocked_column_tiles: int = 16
    column_groups_per_core: int = 2
    # Vectorizer: the widest stride a strided vector load may have; the narrowest tail vector.
    max_load_stride: int = 4
    min_tail_width: int = 2
    # Measured by the autotuner: (convolution signature, algorithm) pairs.
    conv_algorithms: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        for sig, alg in self.conv_algorithms:
            if alg not in CONV_ALGORITHMS:
                raise KilnError(f"tuning names unknown convolution algorithm {alg!r} for {sig}",
                                hint=f"use one of {', '.join(CONV_ALGORITHMS)}")

    def conv_algorithm(self, signature: str) -> str | None:
        """The measured algorithm of the convolution with ``signature``, if any."""
        for sig, alg in self.conv_algorithms:
            if sig == signature:
                return alg
        return None

    def with_conv_algorithms(self, choices: dict[str, str]) -> Tuning:
        """This tuning with ``choices`` (signature -> algorithm) added or replaced."""
        merged = dict(self.conv_algorithms)
        merged.update(choices)
        return replace(self, conv_algorithms=tuple(sorted(merged.items())))

    def key(self) -> str:
        """The whole value as text (the compile cache hashes it)."""
        return repr(sorted(asdict(self).items()))


DEFAULT = Tuning()
