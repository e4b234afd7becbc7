// int_tiles_avx512.h: the integer tiles on AVX-512 (VNNI).
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

#ifdef __AVX512F__
// Bit 4 of every byte: bit `Q` of the 5-bit tile's high-bit byte (the code of quad Q's input), moved up
// or down within its 16-bit word and masked to its own byte by the caller.
template <int Q>
inline __m512i high_bit_at_4(__m512i v) {
  if constexpr (Q <= 4) return _mm512_slli_epi16(v, 4 - Q);
  else return _mm512_srli_epi16(v, Q - 4);
}

constexpr int64_t kNextTileL1Bytes = 16 << 10;  // of a 32 KB L1 (48 KB on recent Intel cores)

// One tile of 16 outputs (from n0) against the MT activation rows of pass `p` (rows m0 = p * MT ..),
// stored to out. TABLE: int4 codes are IQ4 indices (kIq4Values), looked up with one vpshufb per 64 codes.
// BITS 5: a block's low nibbles as int4's, then 64 bytes whose bit q is the fifth bit of quad q's code.
template <int BITS, typename S, int MT, bool TABLE = false>
void int_tile(const QuantizedRows& qr, int64_t p, const uint8_t* tile, const S* tscale, const S* tshift,
              int64_t group_size, const Output& out, int64_t m0, int64_t n0, const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = qr.groups, blocks_per_group = group_size / 32;
  constexpr int64_t kBlockBytes = 64 * BITS;  // 16 rows x 32 inputs
  const int32_t* xq = qr.q.data() + p * (K / 4) * MT;
  const float* xs = qr.scale.data() + p * blocks * MT;
  const int32_t* xstart = qr.start.data() + p * blocks * MT;
  const float* xg = qr.gsum.data() + p * groups * MT;
  // The next tile goes to L1 where it fits there beside this one and the activations: on the Zen 4
  // (2026-12-05) an 8-row pass of a 576-wide product over weights from memory then took 1.06-1.09x its
  // time from cache instead of 1.17x, and the bundled model's 16-row step 3-5% less (14 KB). Larger, into
  // L1 was slower: Qwen2.5-0.5B's 16-row int4 step 2-4% (28 KB), the bundled model's int8 head 1.16x at 8
  // rows (23 KB) and 1.10x at 16 (28 KB); so L2 for them, as before.
  const bool next_to_l1 = 2 * blocks * kBlockBytes + K * qr.rows <= kNextTileL1Bytes;
  __m512 facc[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) facc[m] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0f), fifth = _mm512_set1_epi8(0x10);
  const __m512i table = _mm512_broadcast_i32x4(_mm_add_epi8(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values)), _mm_set1_epi8(char(kIq4ZeroPoint))));
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 sv = load16_f32<S>(tscale + g * kTile);
    if (tshift != nullptr) {
      const __m512 sh = load16_f32<S>(tshift + g * kTile);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) facc[m] = _mm512_fmadd_ps(sh, _mm512_set1_ps(xg[g * MT + m]), facc[m]);
    }
    // A group's blocks are summed scaled by the activations' block scales, and the sum times the weight
    // scale once per group: a multiply per block and row fewer than scaling every block by both.
    __m512 gacc[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) gacc[m] = _mm512_setzero_ps();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      const uint8_t* wb = tile + b * kBlockBytes;
      const int32_t* xb = xq + b * 8 * MT;
      prefetch(wb);
      if (next != nullptr) {
        if (next_to_l1) prefetch_lines<kBlockBytes, _MM_HINT_T0>(next + b * kBlockBytes);
        else prefetch_lines<kBlockBytes>(next + b * kBlockBytes);
      }
      __m512i iacc[MT];
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) iacc[m] = _mm512_set1_epi32(xstart[b * MT + m]);
      if constexpr (BITS == 8) {
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) {
          const __m512i w = _mm512_loadu_si512(wb + q * 64);
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) iacc[m] = dpbusd_bcast(iacc[m], w, xb + q * MT + m);
        }
      } else {
        const auto quads = [&](auto o_) {
          constexpr int o = decltype(o_)::value;
          const __m512i v = _mm512_loadu_si512(wb + o * 64);
          __m512i lo = _mm512_and_si512(v, nibble);
          __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          if constexpr (TABLE) lo = _mm512_shuffle_epi8(table, lo), hi = _mm512_shuffle_epi8(table, hi);
          if constexpr (BITS == 5) {  // (high & 0x10) | nibble, one vpternlogd each
            const __m512i h = _mm512_loadu_si512(wb + 256);
            lo = _mm512_ternarylogic_epi32(high_bit_at_4<2 * o>(h), fifth, lo, 0xEA);
            hi = _mm512_ternarylogic_epi32(high_bit_at_4<2 * o + 1>(h), fifth, hi, 0xEA);
          }
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) {
            iacc[m] = dpbusd_bcast(iacc[m], lo, xb + (2 * o) * MT + m);
            iacc[m] = dpbusd_bcast(iacc[m], hi, xb + (2 * o + 1) * MT + m);
          }
        };
        quads(std::integral_constant<int, 0>{});
        quads(std::integral_constant<int, 1>{});
        quads(std::integral_constant<int, 2>{});
        quads(std::integral_constant<int, 3>{});
      }
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m)
        gacc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m]), _mm512_set1_ps(xs[b * MT + m]), gacc[m]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) facc[m] = _mm512_fmadd_ps(gacc[m], sv, facc[m]);
  }
  // unrolled, so facc stays in registers (a loop over it kept the array on the stack, stored every group)
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) out.store(m0 + m, n0, facc[m]);
}

// int_tile for GGUF Q6_K (kQ6BlockBytes per 32 inputs): a block's two sub-blocks of 16 are summed apart,
// each from -32 x its activations' sum (the zero point), times its int8 scale in int32 (exact: at most
// 16 x 127 x 32 x 128 a sub-block), then the block as int_tile's, times d once per 256 inputs.
template <typename S, int MT>
void q6k_tile(const QuantizedRows& qr, int64_t p, const uint8_t* tile, const S* tscale, const Output& out,
              int64_t m0, int64_t n0, const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = K / kQ6Group;
  const int32_t* xq = qr.q.data() + p * (K / 4) * MT;
  const float* xs = qr.scale.data() + p * blocks * MT;
  const int32_t* xstart = qr.start.data() + p * blocks * MT;  // -32 x the block's sum
  const int32_t* xhalf = qr.half.data() + p * blocks * MT;    // -32 x the sum of its first 16
  __m512 facc[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) facc[m] = _mm512_setzero_ps();
  // bitwise selects (ternlog 0xE4: C ? A : B) by these masks, and the codes' six bits
  const __m512i low2 = _mm512_set1_epi8(0x03), low4 = _mm512_set1_epi8(0x0f), six = _mm512_set1_epi8(0x3f);
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 sv = load16_f32<S>(tscale + g * kTile);
    __m512 gacc[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) gacc[m] = _mm512_setzero_ps();
    for (int64_t b = g * (kQ6Group / 32); b < (g + 1) * (kQ6Group / 32); ++b) {
      const uint8_t* wb = tile + b * kQ6BlockBytes;
      const int32_t* xb = xq + b * 8 * MT;
      prefetch(wb);
      if (next != nullptr) prefetch_lines<kQ6BlockBytes>(next + b * kQ6BlockBytes);
      __m512i first[MT], second[MT];
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {  // broadcasts from memory; the second start by a vector subtract
        first[m] = _mm512_set1_epi32(xhalf[b * MT + m]);
        second[m] = _mm512_sub_epi32(_mm512_set1_epi32(xstart[b * MT + m]), first[m]);
      }
      // A sub-block's run: quads a, b, c in bits 0-5 of v0, v1, v2; quad e's pairs in their bits 6-7.
      const auto run = [&](const uint8_t* r, const int32_t* xr, __m512i(&acc)[MT]) {
        const __m512i v0 = _mm512_loadu_si512(r), v1 = _mm512_loadu_si512(r + 64), v2 = _mm512_loadu_si512(r + 128);
        const __m512i e1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v0, 6), _mm512_srli_epi16(v1, 4), low2, 0xE4);
        const __m512i e = _mm512_and_si512(_mm512_ternarylogic_epi32(e1, _mm512_srli_epi16(v2, 2), low4, 0xE4), six);
        const __m512i q[4] = {_mm512_and_si512(v0, six), _mm512_and_si512(v1, six), _mm512_and_si512(v2, six), e};
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v)
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) acc[m] = dpbusd_bcast(acc[m], q[v], xr + v * MT + m);
      };
      run(wb, xb, first);
      run(wb + 192, xb + 4 * MT, second);
      const __m512i sa = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 384)));
      const __m512i sb = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 400)));
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const __m512i iacc = _mm512_add_epi32(_mm512_mullo_epi32(first[m], sa), _mm512_mullo_epi32(second[m], sb));
        gacc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc), _mm512_set1_ps(xs[b * MT + m]), gacc[m]);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) facc[m] = _mm512_fmadd_ps(gacc[m], sv, facc[m]);
  }
  // unrolled, so facc stays in registers (a loop over it kept the array on the stack, stored every group)
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) out.store(m0 + m, n0, facc[m]);
}
#endif
