// q6k_tiles_avx2.h: GGUF Q6_K tiles on AVX2 and AVX-VNNI.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

#ifndef __AVX512F__
// Half h0 of Q6_K block wb's sub-block sb: its 4 quads' codes (0..63, a byte each), and its int8 scale
// per output in both int16 halves of each output's lane (s16, for vpmaddwd).
__attribute__((always_inline)) inline void q6k_unpack_half(const uint8_t* wb, int sb, int h0, __m256i (&q)[4],
                                                           __m256i& s16) {
  const __m256i six = _mm256_set1_epi8(0x3f), low2 = _mm256_set1_epi8(0x03), low16 = _mm256_set1_epi32(0xffff);
  const __m256i s32 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + 384 + 16 * sb + 8 * h0)));
  s16 = _mm256_or_si256(_mm256_and_si256(s32, low16), _mm256_slli_epi32(s32, 16));
  const uint8_t* r = wb + 192 * sb + 32 * h0;
  const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r));
  const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 64));
  const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 128));
  q[0] = _mm256_and_si256(v0, six);
  q[1] = _mm256_and_si256(v1, six);
  q[2] = _mm256_and_si256(v2, six);
  q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v0, 6), low2),
                         _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v1, 4), _mm256_slli_epi16(low2, 2)),
                                         _mm256_and_si256(_mm256_srli_epi16(v2, 2), _mm256_slli_epi16(low2, 4))));
}

// Half h0 of block wb's two sub-block scales per output as one int16 pair in each output's lane (sub-block
// 0 low, 1 high): what q6k_zero_point multiplies the activations' two sub-block sums by.
__attribute__((always_inline)) inline __m256i q6k_scale_pair(const uint8_t* wb, int h0) {
  const __m256i s0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + 384 + 8 * h0)));
  const __m256i s1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + 400 + 8 * h0)));
  return _mm256_or_si256(_mm256_and_si256(s0, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(s1, 16));
}

// One row's block zero-point term, sum over the sub-blocks of scale x (-32 x the activations' sum): the
// two sums (-32 x at most 16 x 127, so sum = half >> 5 exactly fits int16) side by side in every lane,
// one vpmaddwd against the scale pair, x 32 by a shift. (One vpmulld per sub-block before: it was the
// passes' slowest instruction, and its int32 scales held two more registers.)
__attribute__((always_inline)) inline __m256i q6k_zero_point(__m256i scale_pair, int32_t half, int32_t start) {
  const uint32_t sums = (uint32_t(half >> 5) & 0xffffu) | (uint32_t((start - half) >> 5) << 16);
  return _mm256_slli_epi32(_mm256_madd_epi16(scale_pair, _mm256_set1_epi32(int32_t(sums))), 5);
}

// One row's sum over a sub-block's codes, times its scale: two quads at a time, their pair sums in int16
// (two of at most 2 x 63 x 127 fit), widened by vpmaddwd with s16. x: the row's 4-byte activation groups
// of the sub-block, MT apart.
template <int MT>
__attribute__((always_inline)) inline __m256i q6k_sub_sum(const __m256i (&q)[4], __m256i s16, const int32_t* x) {
  __m256i sum = _mm256_setzero_si256();
#pragma GCC unroll 2
  for (int v = 0; v < 4; v += 2) {
    const __m256i pair = _mm256_add_epi16(_mm256_maddubs_epi16(q[v], _mm256_set1_epi32(x[v * MT])),
                                          _mm256_maddubs_epi16(q[v + 1], _mm256_set1_epi32(x[(v + 1) * MT])));
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pair, s16));
  }
  return sum;
}

// GGUF Q6_K on AVX2/AVX-VNNI, R rows of a pass against half h0 of the tile (its 8 outputs), the AVX-512
// q6k_tile's integer sums and float arithmetic in the same order, so the products are its bit for bit.
// A sub-block's 4 quads of 6-bit codes go through vpmaddubsw in pairs and vpmaddwd by the sub-block's int8
// scale, set in both int16 halves of each output's lane: the scaling costs nothing over the widening the
// int8 tile does anyway. The block's zero-point term is q6k_zero_point's.
template <typename S, int MT, int R>
void q6k_rows(const QuantizedRows& qr, int64_t p, int64_t r0, int h0, const uint8_t* tile, const S* tscale,
              float (*y)[16], const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = K / kQ6Group;
  const int32_t* xq = qr.q.data() + p * (K / 4) * MT + r0;
  const float* xs = qr.scale.data() + p * blocks * MT + r0;
  const int32_t* xstart = qr.start.data() + p * blocks * MT + r0;  // -32 x the block's sum
  const int32_t* xhalf = qr.half.data() + p * blocks * MT + r0;    // -32 x the sum of its first 16
  __m256 facc[R];
  for (int m = 0; m < R; ++m) facc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const qk_m512 sv = load16_f32<S>(tscale + g * kTile);
    __m256 gacc[R];
    for (int m = 0; m < R; ++m) gacc[m] = _mm256_setzero_ps();
    for (int64_t b = g * (kQ6Group / 32); b < (g + 1) * (kQ6Group / 32); ++b) {
      const uint8_t* wb = tile + b * kQ6BlockBytes;
      const int32_t* xb = xq + b * 8 * MT;
      if (next != nullptr && h0 == 0 && r0 == 0) prefetch_lines<kQ6BlockBytes>(next + b * kQ6BlockBytes);
      __m256i iacc[R];
      const __m256i scale_pair = q6k_scale_pair(wb, h0);
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m) iacc[m] = q6k_zero_point(scale_pair, xhalf[b * MT + m], xstart[b * MT + m]);
      for (int sb = 0; sb < 2; ++sb) {
        __m256i q[4], s16;
        q6k_unpack_half(wb, sb, h0, q, s16);
#pragma GCC unroll 4
        for (int m = 0; m < R; ++m) iacc[m] = _mm256_add_epi32(iacc[m], q6k_sub_sum<MT>(q, s16, xb + 4 * sb * MT + m));
      }
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m)
        gacc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_set1_ps(xs[b * MT + m]), gacc[m]);
    }
    for (int m = 0; m < R; ++m) facc[m] = _mm256_fmadd_ps(gacc[m], h0 == 0 ? sv.lo : sv.hi, facc[m]);
  }
  for (int m = 0; m < R; ++m) _mm256_storeu_ps(y[r0 + m] + 8 * h0, facc[m]);
}

// q6k_rows for passes of 4-8 rows: a block's half unpacked once into registers for every row of the
// pass (unpacking it again per pair of rows made 16-row products 30% slower than the int8 tile's), the
// float sums in L1 as int_tile_quads keeps them. The same integer sums and float order as q6k_rows.
template <typename S, int MT>
void q6k_many_rows(const QuantizedRows& qr, int64_t p, int h0, const uint8_t* tile, const S* tscale,
                   float (*y)[16], const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = K / kQ6Group;
  const int32_t* xq = qr.q.data() + p * (K / 4) * MT;
  const float* xs = qr.scale.data() + p * blocks * MT;
  const int32_t* xstart = qr.start.data() + p * blocks * MT;
  const int32_t* xhalf = qr.half.data() + p * blocks * MT;
  alignas(32) __m256 sums[2][MT];
  __m256(*acc)[MT] = sums;
  asm("" : "+r"(acc));  // through a pointer GCC cannot see through: kept in L1, not spilled per block
  __m256(&F)[MT] = acc[0];
  __m256(&G)[MT] = acc[1];
  for (int m = 0; m < MT; ++m) F[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const qk_m512 sv = load16_f32<S>(tscale + g * kTile);
    for (int m = 0; m < MT; ++m) G[m] = _mm256_setzero_ps();
    for (int64_t b = g * (kQ6Group / 32); b < (g + 1) * (kQ6Group / 32); ++b) {
      const uint8_t* wb = tile + b * kQ6BlockBytes;
      const int32_t* xb = xq + b * 8 * MT;
      if (next != nullptr && h0 == 0) prefetch_lines<kQ6BlockBytes>(next + b * kQ6BlockBytes);
      __m256i q[2][4], s16[2];
      for (int sb = 0; sb < 2; ++sb) q6k_unpack_half(wb, sb, h0, q[sb], s16[sb]);
      const __m256i scale_pair = q6k_scale_pair(wb, h0);
      for (int m = 0; m < MT; ++m) {
        __m256i iacc = q6k_zero_point(scale_pair, xhalf[b * MT + m], xstart[b * MT + m]);
#pragma GCC unroll 2
        for (int sb = 0; sb < 2; ++sb) iacc = _mm256_add_epi32(iacc, q6k_sub_sum<MT>(q[sb], s16[sb], xb + 4 * sb * MT + m));
        G[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_set1_ps(xs[b * MT + m]), G[m]);
      }
    }
    for (int m = 0; m < MT; ++m) F[m] = _mm256_fmadd_ps(G[m], h0 == 0 ? sv.lo : sv.hi, F[m]);
  }
  for (int m = 0; m < MT; ++m) _mm256_storeu_ps(y[m] + 8 * h0, F[m]);
}

// q6k_tile on AVX2/AVX-VNNI: each half of the tile apart (the registers of one half); 1-2 rows by
// q6k_rows, more by q6k_many_rows.
template <typename S, int MT>
void q6k_tile(const QuantizedRows& qr, int64_t p, const uint8_t* tile, const S* tscale, const Output& out,
              int64_t m0, int64_t n0, const uint8_t* next) {
  alignas(32) float y[MT][16];
  for (int h0 = 0; h0 < 2; ++h0) {
    if constexpr (MT >= 4)
      q6k_many_rows<S, MT>(qr, p, h0, tile, tscale, y, next);
    else
      q6k_rows<S, MT, MT>(qr, p, 0, h0, tile, tscale, y, next);
  }
  for (int m = 0; m < MT; ++m) out.store(m0 + m, n0, _mm512_loadu_ps(y[m]));
}
#endif
