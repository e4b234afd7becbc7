// The two AVX-512 BF16 instructions cpu_kernels.cpp uses, written on AVX-512F/BW, for CPUs with AVX-512
// and VNNI but no BF16 (Cascade Lake and Ice Lake Xeons, Ice Lake and Tiger Lake laptops): build.py's
// "avx512vnni" level. The results are the instructions' own, as csrc/avx2_compat.h's on AVX2: a product
// of two bf16 values is exact in fp32, so vdpbf16ps is two FMAs (the odd pair member first), and
// vcvtneps2bf16 rounds to nearest even and keeps NaNs quiet.
#pragma once

#include <immintrin.h>

static inline __attribute__((always_inline)) __m512 qk512_dpbf16_ps(__m512 acc, __m512bh a, __m512bh b) {
  const __m512i ai = (__m512i)a, bi = (__m512i)b, high = _mm512_set1_epi32(int(0xffff0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(ai, high)), _mm512_castsi512_ps(_mm512_and_si512(bi, high)),
                        acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(ai, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(bi, 16)),
                         acc);
}

static inline __attribute__((always_inline)) __m256i qk512_cvtneps_pbh(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan =
      _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

#define _mm512_dpbf16_ps qk512_dpbf16_ps
#define _mm512_cvtneps_pbh qk512_cvtneps_pbh
