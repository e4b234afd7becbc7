"""Python face of the C++ CPU kernels: availability, weight packing and the linears. Reading packed
weights back (codes, float weights, rows) and stacking them is ``unpack``'s; the decode step's small row
ops (sampling, norms, attention, whole layers) are in ``step_ops``."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qwenkit.env_switch import ON_OFF, env_choice
from qwenkit.errors import QwenkitError

ENV_SWITCH = "QWENKIT_KERNELS"  # "torch": the plain PyTorch path; a level name: at most that build
CAPS = ("avx512", "avx512vnni", "avxvnni", "avx2")  # build.ISA_LEVELS: the levels QWENKIT_KERNELS can cap at
KERNEL_CHOICES = {"auto": "auto", "torch": "torch"} | {cap: cap for cap in CAPS}  # another: named, "auto"
AMX_SWITCH = "QWENKIT_AMX"  # "off": bf16 products on the AVX-512 vector tiles even where AMX exists
_loaded: bool | None = None  # None: not tried yet in this process
_level: str | None = None  # the instruction-set level of the loaded library
_amx = False  # bf16 products on AMX (use_amx); the library's own switch, mirrored
_load_lock = threading.Lock()


TILE = 16  # output rows per tile of the packed layouts
# ggml's kvalues_iq4nl: the int8 values IQ4_NL's and IQ4_XS's 4-bit indices stand for. 4-bit codes with
# zero point IQ4_ZERO_POINT (no linear 4-bit code has one) are such indices: w = (value + 128 - 128) * scale.
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
IQ4_ZERO_POINT = 128


class KernelInputError(QwenkitError, ValueError):
    """Weights handed to prepare_int8/prepare_int4 do not have the shapes or ranges the kernels need."""


def _note(text: str) -> None:
    print(f"qwenkit: {text}; using the plain PyTorch path", file=sys.stderr)


def available() -> bool:
    """True when the C++ kernels are loaded (building them on first use if needed).

    The library is built for the best level the CPU has (AVX-512 BF16/VNNI, else AVX-512 VNNI, else AVX2
    with AVX-VNNI, else AVX2; QWENKIT_KERNELS=avx512vnni, =avxvnni or =avx2 caps it, to compare or test
    the lower builds). False, after one line on stderr, when the CPU has none of them, there is no
    compiler or the build fails; False silently when QWENKIT_KERNELS=torch asks for the plain path. The
    level is fixed by the first call in a process.
    """
    global _loaded
    if env_choice(ENV_SWITCH, KERNEL_CHOICES, "auto") == "torch":
        return False
    if _loaded is not None:
        return _loaded
    with _load_lock:  # threads asking at once build and load once
        if _loaded is None:
            _loaded = _load()
    return _loaded


def loaded() -> bool:
    """True when the library is already loaded in this process; unlike :func:`available`, never builds it."""
    return _loaded is True


def _load() -> bool:
    """Load (or build, then load) the library; on failure say why in one line."""
    from qwenkit.kernels import build  # not at import: `python -m qwenkit.kernels.build` runs it as main

    global _level, _amx
    choice = env_choice(ENV_SWITCH, KERNEL_CHOICES, "auto")
    cap = choice if choice in CAPS else None
    reason, level, failed = build.missing_isa(cap), None, []
    if reason is None:  # the best level that builds: a compiler too old for one tries the next
        try:
            level, failed = build.first_that_builds(build.runnable_levels(cap), build.load)
        except (build.KernelBuildError, OSError) as e:  # OSError: e.g. the C++ source missing
            reason = str(e)
    if reason or level is None:
        _note(f"CPU kernels unavailable: {reason}")
        return False
    if failed:
        print(f"qwenkit: CPU kernels: {'; '.join(failed)}; using the {level} build", file=sys.stderr)
    elif cap and level != cap:  # asked for a build to compare or test: say it is not the one running
        lacks = ", ".join(sorted(set(build.ISA_LEVELS[cap]) - build.cpu_flags()))
        print(
            f"qwenkit: {ENV_SWITCH}={cap}: this CPU lacks {lacks}; using the {level} build",
            file=sys.stderr,
        )
    _level = level
    _amx = bool(torch.ops.qwenkit.use_amx(env_choice(AMX_SWITCH, ON_OFF, "on") == "on"))
    return True


def use_amx(on: bool = True) -> bool:
    """Turn AMX on or off for bf16 products (every row count, layers whose K is a multiple of 64) and
    integer products of many rows (:func:`int_amx_rows`); True
    when it is now in use: the kernels are loaded, the CPU has AMX-BF16 and Linux lets the process use
    its tiles. On by default where it can be (``QWENKIT_AMX=off`` at load turns it off).

    AMX rounds its sums its own way, so its results differ from the vector tiles' in last bits; each
    layer's rows all take one path whatever their number, so a row's result is still the same alone
    or in any batch. Measured on a Xeon: prompts 3x faster, one-row decode at 92-98% of the read
    bandwidth against 83-85%, and 16 rows 2.4x faster (tests/kernels/test_amx.py checks the sums).
    Switch it only between whole requests: a request whose rows took both paths could differ."""
    global _amx
    if available():
        _amx = bool(torch.ops.qwenkit.use_amx(on))
    return _amx


def amx_in_use() -> bool:
    """Whether bf16 products run on AMX (see use_amx)."""
    return available() and _amx


def int_amx_rows(bits: int) -> int | None:
    """The row count from which integer products of ``bits``-bit codes (8: zero point 0 or 128; 4, 5, IQ4;
    not Q6_K) run on AMX-INT8, or None where they never do (no AMX-INT8, AMX turned off, Q6_K).

    Unlike bf16's, AMX's integer sums are exact, so these products equal the vector tiles' bit for bit and
    the row count may choose the path: prompts take AMX, decode steps the vector tiles."""
    if not amx_in_use():
        return None
    return int(torch.ops.qwenkit.int_amx_rows(bits)) or None


def decode_prefetch(on: bool | None = None) -> bool:
    """Whether integer products of 1-4 rows (decode steps) prefetch each next weight tile into L2 while
    they work on one, as passes of 8 rows and more always do; ``on`` switches it, None only asks.

    On by default where it was measured faster: Intel CPUs (Xeon, 2026-12-04: batch-1 int4/int8 decode
    10-24% faster) and AMD Zen 2 (2026-12-04, benchmarks/bench_decode_prefetch.py: 1.11-1.25x, with
    AVX2's int8 passes then taking both halves of a tile at once). Other AMD CPUs leave the streams to
    the hardware prefetchers until measured (a different prefetch made Zen 4 8-11% slower). Results are
    the same bit for bit either way, so benchmarks can compare both in one process. False where the
    kernels are not loaded."""
    if not available():
        return False
    return bool(torch.ops.qwenkit.decode_prefetch(-1 if on is None else int(on)))


AMX_K_MULTIPLE = 64  # linear_bf16 takes AMX only for K a multiple of this (32 input pairs a tile step)


def bf16_runs_on_amx(in_features: int) -> bool:
    """Whether linear_bf16 over ``in_features`` inputs runs on AMX (else on the vector tiles)."""
    return amx_in_use() and in_features % AMX_K_MULTIPLE == 0


def isa_level() -> str | None:
    """The instruction-set level the loaded kernels were built for (a key of build.ISA_LEVELS), or None."""
    return _level if available() else None


class KernelsUnavailableError(QwenkitError, RuntimeError):
    """A kernel op was called where available() is False (the caller should take the plain path)."""


_ops: dict[str, Callable[..., torch.Tensor]] = {}  # op name -> its overload, looked up once


def op(name: str) -> Callable[..., torch.Tensor]:
    """The library's op ``name`` (torch.ops.qwenkit), looked up once; loads the library first."""
    found = _ops.get(name)
    if found is None:
        if not (_loaded or available()):
            raise KernelsUnavailableError(
                "the qwenkit CPU kernels are not available here; use the plain path"
            )
        found = _ops[name] = getattr(torch.ops.qwenkit, name).default
    return found


# A weight of at least this many values gets its load pass (decode, requantize, round, pack) on every
# thread the load has (see ``load_threads``); a smaller one takes a few milliseconds at most, less than a
# thread team costs to start on a machine whose other cores are busy.
PARALLEL_PASS_WEIGHTS = 1 << 22
_pass_threads = 0  # the threads a big weight's pass runs on inside load_threads; 0: outside one


@contextmanager
def load_threads(enabled: bool) -> Iterator[None]:
    """Within: torch runs on one thread, and a load pass over a big weight (:func:`run_pass`) on all of
    the process's threads. A load is hundreds of small, memory-bound ops (transposes, scales, copies) and
    each parallel region costs more than it saves: on a machine whose other cores were busy, a thread
    team waiting for a core made the bundled model's load 6x slower (2.2 s vs 12.8 s). The passes over
    the weights' blocks are the other kind: a 1.5B model's are seconds of arithmetic, and split over the
    threads in chunks they take from each other, a thread that waits for its core only does less."""
    global _pass_threads
    if not enabled:
        yield
        return
    threads, outer = torch.get_num_threads(), _pass_threads
    torch.set_num_threads(1)
    _pass_threads = threads
    try:
        yield
    finally:
        _pass_threads = outer
        torch.set_num_threads(threads)


def run_pass(name: str, weights: int, *args: object) -> object:
    """The library's load pass ``name`` over a weight of ``weights`` values, with ``args``: on
    ``load_threads``' threads where the weight is big enough (``PARALLEL_PASS_WEIGHTS``), else on
    torch's current setting (one thread inside a load)."""
    threads = _pass_threads
    if threads <= 1 or weights < PARALLEL_PASS_WEIGHTS or torch.get_num_threads() != 1:
        return op(name)(*args)
    torch.set_num_threads(threads)
    try:
        return op(name)(*args)
    finally:
        torch.set_num_threads(1)


def _as_rows(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    """x as (M, K): the kernels take rows; leading dims are restored by the caller."""
    if x.shape[-1] != k:
        raise KernelInputError(f"{what}: x has {x.shape[-1]} inputs, the weights {k}")
    return x if x.dim() == 2 else x.reshape(-1, k)


@dataclass(frozen=True)
class PackedInt:
    """Integer weights in the kernels' layout: w[n, k] = (code - zero_point) * scale[g, n] + shift[g, n].

    Rows come in tiles of 16 (N padded with zero rows), each tile one sequential stream: codes
    (N/16, K * 16) uint8 for 8 bits, where each 64 bytes hold 4 consecutive inputs of the 16 rows, or
    (N/16, K * 8) for 4 bits, where each 64 bytes hold 8 inputs as nibbles (byte 4r + i: input i low,
    input 4 + i high), or (N/16, K * 10) for 5 bits, each 32 inputs as 4-bit's 256 bytes of low nibbles
    and 64 bytes of fifth bits (byte 4r + i, bit q: input 4q + i). scale and shift: (N/16, K / group_size,
    16), float32 or float16; shift may be None.
    """

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor | None
    group_size: int
    in_features: int
    out_features: int
    zero_point: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes a matrix-vector product reads."""
        return sum(t.nbytes for t in (self.codes, self.scale, self.shift) if t is not None)


@dataclass(frozen=True)
class PackedBf16:
    """bf16 weights in tiles of 16 rows (N padded with zero rows): (N/16, Kp * 16) with Kp = K rounded up
    to even, each 64 bytes holding inputs k, k+1 of the 16 rows, so a tile is one sequential stream."""

    weight: torch.Tensor
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


def prepare_bf16(w: torch.Tensor) -> PackedBf16:
    """Pack a (N, K) weight (any float dtype; rounded to bf16) for linear_bf16."""
    if w.dim() != 2:
        raise KernelInputError(f"prepare_bf16: w must be (N, K), got shape {tuple(w.shape)}")
    n, k = w.shape
    # One pass of the library into the one allocation it returns (a padded copy, then a transposed one,
    # held three copies of each weight at once; torch's strided copy into the tiles took 3 s of every
    # start of a bf16 Qwen2.5-0.5B checkpoint).
    tiles = run_pass("pack_bf16_tiles", w.numel(), w.to(torch.bfloat16).contiguous())
    return PackedBf16(tiles, k, n)


def linear_bf16(x: torch.Tensor, p: PackedBf16, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16 @ w.T (+ bias) -> (..., N) bf16, fp32 accumulation. Best for M <= 16."""
    y = op("linear_bf16")(_as_rows(x, p.in_features, "linear_bf16"), p.weight, bias, p.out_features)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], p.out_features)


def unpack_bf16(p: PackedBf16, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, K) bf16 weight back, or only `rows` of it (an embedding lookup)."""
    tiles, k = p.weight.shape[0], p.in_features
    kp = k + k % 2
    w = p.weight.view(tiles, kp // 2, TILE, 2).transpose(1, 2).reshape(tiles * TILE, kp)
    w = w[: p.out_features, :k]
    return w if rows is None else w[rows]


def _pick_scale_dtype(scale: torch.Tensor, shift: torch.Tensor | None) -> torch.dtype:
    """float16 when it holds every value exactly (GGUF and GPTQ scales are float16), else float32:
    packing never changes the weights unless the caller asks for float16."""
    for t in (scale, shift):
        if t is not None and not torch.equal(t.to(torch.float16).to(t.dtype), t):
            return torch.float32
    return torch.float16


def _tiled(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(G, N) per-group values -> (N/16, G, 16), zero rows padding N."""
    g, n = t.shape
    tiles = -(-n // TILE)
    out = torch.zeros(g, tiles * TILE, dtype=dtype)
    out[:, :n] = t
    return out.view(g, tiles, TILE).transpose(0, 1).contiguous()


def _prepare(
    bits: int,
    codes: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    group_size: int,
    zero_point: int,
    scale_dtype: torch.dtype | None,
) -> PackedInt:
    what = f"prepare_int{bits}"
    if not (0 <= zero_point < 2**bits or (bits == 4 and zero_point == IQ4_ZERO_POINT)):
        table = f" (or be {IQ4_ZERO_POINT}: IQ4 table codes)" if bits == 4 else ""
        raise KernelInputError(f"{what}: zero_point must lie in 0..{2**bits - 1}{table}, got {zero_point}")
    if codes.dim() != 2:
        raise KernelInputError(f"{what}: codes must be (N, K), got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if group_size <= 0 or group_size % 32 or k % group_size:
        raise KernelInputError(
            f"{what}: group_size must be a multiple of 32 dividing K={k}, got {group_size}"
        )
    groups = k // group_size
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and tuple(t.shape) != (groups, n):
            raise KernelInputError(
                f"{what}: {name} must be (K/group_size, N) = {(groups, n)}, got {tuple(t.shape)}"
            )
    if codes.dtype != torch.uint8:
        raise KernelInputError(f"{what}: codes must be uint8, got {codes.dtype}")
    top = int(codes.max()) if bits < 8 and codes.numel() else 0
    if top >= 2**bits:
        raise KernelInputError(f"{what}: {bits}-bit codes must lie in 0..{2**bits - 1}, got {top}")
    sdt = scale_dtype or _pick_scale_dtype(scale, shift)
    h = None if shift is None else _tiled(shift, sdt)
    return PackedInt(bits, _tile_codes(bits, codes), _tiled(scale, sdt), h, group_size, k, n, zero_point)


def _tile_codes(bits: int, codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes -> (N/16, K * 2 * bits) tiles, zero rows padding N: one pass in C++
    (``pack_int_tiles``) straight into the result, no temporaries beside it."""
    return run_pass("pack_int_tiles", codes.numel(), codes, bits)


def prepare_int8(
    codes: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    group_size: int,
    zero_point: int = 0,
    scale_dtype: torch.dtype | None = None,
) -> PackedInt:
    """Pack uint8 codes (N, K) with per-group scale/shift (K/group_size, N) for linear_int8.

    w = (code - zero_point) * scale + shift: Q8_0 is codes = q + 128, zero_point=128, shift None.
    scale_dtype None keeps the values exact (float16 if that holds them, else float32).
    """
    return _prepare(8, codes, scale, shift, group_size, zero_point, scale_dtype)


def prepare_int4(
    codes: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    group_size: int,
    zero_point: int = 0,
    scale_dtype: torch.dtype | None = None,
) -> PackedInt:
    """Pack 4-bit codes (N, K) as uint8 in 0..15 with per-group scale/shift (K/group_size, N).

    Q4_0 is zero_point=8, shift None; Q4_1 is zero_point=0, shift = m; GPTQ asymmetric is
    shift = -zero * scale. IQ4_NL/IQ4_XS are indices into ``IQ4_VALUES`` with zero_point=IQ4_ZERO_POINT
    (w = IQ4_VALUES[code] * scale, :func:`runs_iq4_table`).
    """
    return _prepare(4, codes, scale, shift, group_size, zero_point, scale_dtype)


def prepare_int5(
    codes: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    group_size: int,
    zero_point: int = 0,
    scale_dtype: torch.dtype | None = None,
) -> PackedInt:
    """Pack 5-bit codes (N, K) as uint8 in 0..31 (GGUF Q5_0 is zero_point=16; Q5_1 and Q5_K carry a
    shift) for linear_int5 (:func:`runs_int5`). K a multiple of 32."""
    return _prepare(5, codes, scale, shift, group_size, zero_point, scale_dtype)


Q6_K_GROUP, Q6_K_ZERO_POINT = 256, 32  # Q6_K's d covers 256 inputs; its codes are q - 32


def prepare_q6_k(codes: torch.Tensor, sub: torch.Tensor, d: torch.Tensor) -> PackedInt:
    """Pack a GGUF Q6_K weight for linear_q6_k: codes (N, K) uint8 in 0..63, int8 sub-block scales
    (K/16, N) and d (K/256, N), the weight being ``d * sub * (code - 32)``. K a multiple of 256; d is
    held as float16 (the file's own width; a value it cannot hold is refused)."""
    if codes.dim() != 2 or codes.dtype != torch.uint8 or codes.shape[1] % Q6_K_GROUP:
        raise KernelInputError(
            f"prepare_q6_k: codes must be (N, K) uint8 with K a multiple of {Q6_K_GROUP}, got "
            f"{codes.dtype} {tuple(codes.shape)}"
        )
    n, k = codes.shape
    if codes.numel() and int(codes.max()) > 63:
        raise KernelInputError(f"prepare_q6_k: codes must lie in 0..63, got {int(codes.max())}")
    if sub.dtype != torch.int8 or tuple(sub.shape) != (k // 16, n):
        raise KernelInputError(f"prepare_q6_k: sub must be (K/16, N) = {(k // 16, n)} int8, got {sub.dtype} "
                               f"{tuple(sub.shape)}")  # fmt: skip
    if tuple(d.shape) != (k // Q6_K_GROUP, n) or not torch.equal(d.half().float(), d.float()):
        raise KernelInputError(f"prepare_q6_k: d must be (K/256, N) = {(k // Q6_K_GROUP, n)} float16 values")
    tiles = run_pass("pack_q6_k_tiles", codes.numel(), codes.contiguous(), sub.contiguous())
    return PackedInt(6, tiles, _tiled(d, torch.float16), None, Q6_K_GROUP, k, n, Q6_K_ZERO_POINT)


def linear_q6_k(x: torch.Tensor, p: PackedInt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """As linear_int8, for weights packed by prepare_q6_k."""
    rows = _as_rows(x, p.in_features, "linear_q6_k")
    y = op("linear_q6_k")(rows, p.codes, p.scale, None, bias, p.group_size, p.out_features, p.zero_point)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], p.out_features)


def q6_k_sub_scales(p: PackedInt) -> torch.Tensor:
    """The (N, K/16) int8 sub-block scales a Q6_K PackedInt carries in its tiles."""
    tiles, k = p.codes.shape[0], p.in_features
    sub = p.codes.view(tiles, k // 32, 416)[:, :, 384:].reshape(tiles, k // 32, 2, TILE)
    return sub.permute(0, 3, 1, 2).reshape(tiles * TILE, k // 16)[: p.out_features].view(torch.int8)


def _linear_int(bits: int, x: torch.Tensor, p: PackedInt, bias: torch.Tensor | None) -> torch.Tensor:
    if p.bits != bits:
        raise KernelInputError(f"linear_int{bits} got weights packed for {p.bits} bits")
    rows = _as_rows(x, p.in_features, f"linear_int{bits}")
    y = op(f"linear_int{bits}")(
        rows, p.codes, p.scale, p.shift, bias, p.group_size, p.out_features, p.zero_point
    )
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], p.out_features)


def linear_int8(x: torch.Tensor, p: PackedInt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16/fp32 @ dequantized weights.T (+ bias) -> (..., N) in x's dtype. Best for M <= 16.

    x is rounded per row in blocks of 32 to int8 (as llama.cpp's q8 activations); the result is
    dot(w, x_rounded) computed exactly in float.
    """
    return _linear_int(8, x, p, bias)


def linear_int4(x: torch.Tensor, p: PackedInt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """As linear_int8, for weights packed by prepare_int4."""
    return _linear_int(4, x, p, bias)


def linear_int5(x: torch.Tensor, p: PackedInt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """As linear_int8, for weights packed by prepare_int5."""
    return _linear_int(5, x, p, bias)


def is_iq4_table(p: PackedInt) -> bool:
    """True for 4-bit codes that index ``IQ4_VALUES``."""
    return p.bits == 4 and p.zero_point == IQ4_ZERO_POINT


def runs_iq4_table() -> bool:
    """True when the loaded kernels run IQ4 table codes (every build)."""
    return available()


def runs_q6_k() -> bool:
    """True when the loaded kernels run GGUF Q6_K weights as the file holds them (every build)."""
    return available()


def runs_int5() -> bool:
    """True when the loaded kernels run 5-bit codes (every build: AVX-512, AVX-VNNI and AVX2)."""
    return available()


def iq4_codes(indices: torch.Tensor) -> torch.Tensor:
    """IQ4 indices (uint8, 0..15) -> the int8 codes they stand for (value + 128, uint8)."""
    table = torch.tensor(IQ4_VALUES, dtype=torch.int16) + IQ4_ZERO_POINT
    return table.to(torch.uint8)[indices.long()]
