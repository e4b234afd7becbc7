"""Whether this CPU's float multiply-adds share the pipes of its 512-bit byte dot products (not a test).

The integer tiles' 16-row decode (``int_tiles_avx512.h``) issues, per block of 32 inputs and activation
row, 8 ``vpdpbusd`` and then float work: the block scale, the weight scale and, for Q4_1-style weights,
the minimum times the activations' sum (three multiply-adds). Where those share the dot products'
pipes, the tile can reach at most 8 / 11 of the dot-product peak, however it is scheduled. This probe
compiles four loops with the C++ compiler qwenkit's kernels use, each with 8 independent accumulators,
and prints nanoseconds per dot product: alone (the broadcast from a register or from memory), and with
one multiply-add beside each (with and without an int-to-float conversion). Equal times mean the float
work rides on other pipes; a doubled time means it waits for the same ones.

    .venv/bin/python benchmarks/probe_dot_pipes.py [--iterations 50000000]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from qwenkit.kernels.build import compiler

SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
static int32_t xi[4096] __attribute__((aligned(64)));
static float xf[4096] __attribute__((aligned(64)));
template <int MODE>
__attribute__((noinline)) double ns_per_dot(long iterations) {
  __m512i acc[8];
  __m512 f[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_set1_epi32(i), f[i] = _mm512_set1_ps(i);
  __m512i w = _mm512_set1_epi8(3);
  const __m512 s = _mm512_set1_ps(1.0001f);
  const auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iterations; ++it) {
    const int32_t* x = xi + (it & 255) * 8;
#pragma GCC unroll 8
    for (int m = 0; m < 8; ++m)
      acc[m] = _mm512_dpbusd_epi32(acc[m], w, _mm512_set1_epi32(MODE == 0 ? m + 1 : x[m]));
    if constexpr (MODE == 2)
#pragma GCC unroll 8
      for (int m = 0; m < 8; ++m) f[m] = _mm512_fmadd_ps(f[m], s, _mm512_set1_ps(xf[m + (it & 255)]));
    if constexpr (MODE == 3)
#pragma GCC unroll 8
      for (int m = 0; m < 8; ++m)
        f[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_set1_ps(xf[m + (it & 255)]), f[m]);
    __asm__ volatile("" : "+v"(w));
  }
  const auto t1 = std::chrono::steady_clock::now();
  __m512i r = acc[0];
  __m512 rf = f[0];
  for (int i = 1; i < 8; ++i) r = _mm512_add_epi32(r, acc[i]), rf = _mm512_add_ps(rf, f[i]);
  volatile float sink = _mm512_reduce_add_epi32(r) + _mm512_reduce_add_ps(rf);
  (void)sink;
  return std::chrono::duration<double>(t1 - t0).count() / (iterations * 8.0) * 1e9;
}
int main(int argc, char** argv) {
  const long n = std::atol(argv[1]);
  std::printf("%.3f %.3f ", ns_per_dot<0>(n), ns_per_dot<1>(n));
  std::printf("%.3f %.3f\n", ns_per_dot<2>(n), ns_per_dot<3>(n));
}
"""

LOOPS = (
    "vpdpbusd alone, broadcast from a register",
    "vpdpbusd alone, broadcast from memory",
    "vpdpbusd + one vfmadd each",
    "vpdpbusd + vcvtdq2ps and vfmadd each",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=50_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cxx = compiler()
    if cxx is None:
        raise SystemExit("error: no C++ compiler found (the probe compiles a small program)")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.cpp", Path(tmp) / "probe"
        src.write_text(SOURCE)
        built = subprocess.run(
            [cxx, "-O2", "-march=native", "-o", str(exe), str(src)], capture_output=True, text=True
        )
        if built.returncode != 0:
            raise SystemExit(
                f"error: the probe needs AVX-512 VNNI; the compiler said:\n{built.stderr[-800:]}"
            )
        rounds = [
            [
                float(v)
                for v in subprocess.run(
                    [str(exe), str(args.iterations)], capture_output=True, text=True, check=True
                ).stdout.split()
            ]
            for _ in range(args.rounds)
        ]
    print(f"ns per 512-bit dot product (64 byte products), best of {args.rounds} rounds, one thread")
    print("| loop | ns | vs alone |\n|---|---:|---:|")
    best = [min(r[i] for r in rounds) for i in range(len(LOOPS))]
    for name, ns in zip(LOOPS, best, strict=True):
        print(f"| {name} | {ns:.3f} | {ns / best[0]:.2f}x |")


if __name__ == "__main__":
    main()
