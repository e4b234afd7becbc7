// int_tiles_avx2.h: the integer tiles on AVX2 and AVX-VNNI.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

#ifndef __AVX512F__
// Bit 4 of every byte: bit Q of a 5-bit block's fifth-bit bytes (quad Q's), as high_bit_at_4, masked.
template <int Q>
__attribute__((always_inline)) inline __m256i fifth_bit_at_4(__m256i v) {
  const __m256i bit4 = _mm256_set1_epi8(0x10);
  if constexpr (Q <= 4) return _mm256_and_si256(_mm256_slli_epi16(v, 4 - Q), bit4);
  else return _mm256_and_si256(_mm256_srli_epi16(v, Q - 4), bit4);
}

// Step O of a 4- or 5-bit block, one half: v the 32 bytes of nibbles, fifth the half's 32 fifth-bit bytes
// (BITS 5). lo: the codes of quad 2O (inputs 8O..8O+3), hi: of quad 2O + 1, one byte each (0..15 or 0..31).
template <int BITS, int O>
__attribute__((always_inline)) inline void unpack_step(__m256i v, __m256i fifth, __m256i& lo, __m256i& hi) {
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  lo = _mm256_and_si256(v, nibble);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
  if constexpr (BITS == 5) {
    lo = _mm256_or_si256(lo, fifth_bit_at_4<2 * O>(fifth));
    hi = _mm256_or_si256(hi, fifth_bit_at_4<2 * O + 1>(fifth));
  }
}

template <int... O, typename F>
__attribute__((always_inline)) inline void for_steps(std::integer_sequence<int, O...>, F&& f) {
  (f(std::integral_constant<int, O>{}), ...);
}

// The fifth-bit bytes of H halves of a 5-bit block at wb (nothing for 4-bit codes).
template <int BITS, int H>
__attribute__((always_inline)) inline void load_fifth(const uint8_t* wb, __m256i (&fifth)[H]) {
  if constexpr (BITS == 5)
    for (int h = 0; h < H; ++h) fifth[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 256 + 32 * h));
}

// unpack_step for H halves of the block at wb (half h at wb + 32 h).
template <int BITS, int O, int H>
__attribute__((always_inline)) inline void unpack_halves(const uint8_t* wb, const __m256i (&fifth)[H],
                                                         __m256i (&lo)[H], __m256i (&hi)[H]) {
#pragma GCC unroll 4
  for (int h = 0; h < H; ++h)
    unpack_step<BITS, O>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + O * 64 + 32 * h)),
                         BITS == 5 ? fifth[h] : __m256i{}, lo[h], hi[h]);
}

// A block's int4 or int5 codes (4 steps of 64 bytes; int5: then 64 fifth-bit bytes) as the 4x2 tiles read
// them, a byte a code: per step, quad 2o of both halves, then quad 2o + 1 (128 bytes).
// TABLE: IQ4 indices, looked up into their int8 codes (kIq4Values + 128), as the int8 tile's layout.
template <int BITS, bool TABLE = false>
__attribute__((always_inline)) inline void unpack_block(const uint8_t* w, uint8_t* u) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_add_epi8(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values)), _mm_set1_epi8(char(kIq4ZeroPoint))));
  __m256i fifth[2];
  load_fifth<BITS, 2>(w, fifth);
  for_steps(std::make_integer_sequence<int, 4>{}, [&](auto o_) {
    constexpr int o = decltype(o_)::value;
    __m256i* out = reinterpret_cast<__m256i*>(u + 128 * o);
    __m256i lo[2], hi[2];
    unpack_halves<BITS, o, 2>(w, fifth, lo, hi);
    for (int h = 0; h < 2; ++h) {
      if constexpr (TABLE) lo[h] = _mm256_shuffle_epi8(table, lo[h]), hi[h] = _mm256_shuffle_epi8(table, hi[h]);
      _mm256_store_si256(out + h, lo[h]);
      _mm256_store_si256(out + 2 + h, hi[h]);
    }
  });
}

#ifdef QK_AVXVNNI
// One block (32 inputs) of R rows against H halves of the tile on AVX-VNNI: the int32 sums from the block
// starts, the u8 codes (int4/int5 codes or int8 bytes, zero point not removed: int8_zero_point) times the
// s8 activations in vpdpbusd, exact as the AVX2 chains' sums are, so every result is the AVX2 build's.
template <int BITS, int R, int H, int MT>
__attribute__((always_inline)) inline void vnni_block(const uint8_t* wb, const int32_t* xb, const int32_t* start,
                                                      __m256i (&iacc)[R][H]) {
#pragma GCC unroll 4
  for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) iacc[m][h] = _mm256_set1_epi32(start[m]);
  if constexpr (BITS == 8) {
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      __m256i w[H];
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) w[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * 64 + 32 * h));
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h)
          iacc[m][h] = _mm256_dpbusd_avx_epi32(iacc[m][h], w[h], _mm256_set1_epi32(xb[q * MT + m]));
    }
    return;
  }
  __m256i fifth[H];
  load_fifth<BITS, H>(wb, fifth);
  for_steps(std::make_integer_sequence<int, 4>{}, [&](auto o_) {
    constexpr int o = decltype(o_)::value;
    __m256i lo[H], hi[H];
    unpack_halves<BITS, o, H>(wb, fifth, lo, hi);
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) {
        iacc[m][h] = _mm256_dpbusd_avx_epi32(iacc[m][h], lo[h], _mm256_set1_epi32(xb[(2 * o) * MT + m]));
        iacc[m][h] = _mm256_dpbusd_avx_epi32(iacc[m][h], hi[h], _mm256_set1_epi32(xb[(2 * o + 1) * MT + m]));
      }
  });
}
#endif

// The AVX2 form of the tile for passes of 1-2 rows: vpmaddubsw (u8 x s8 pairs -> int16) and vpmaddwd in
// place of vpdpbusd, for R rows of the pass and H 8-output halves of the tile (32 of each 64 bytes) at a
// time, so the accumulators fit AVX2's 16 registers: int4 takes both halves (each broadcast serves 16
// outputs; 15% faster at one row), int8 one half at a time (the tile is read again from cache for the
// other) unless the next tile is being prefetched (int_tile). Passes of 4-8 rows (two passes of 8
// together) take int_tile_quads. int4 codes (0..15) times int8 activations never saturate vpmaddubsw's
// int16 pairs, so a block's 8 pairs are summed in int16 before one widening. int8 codes are made signed (code - 128, which int8_zero_point has already
// moved into the block starts) and multiplied as |w| . sign(x, w), which keeps each int16 pair in range.
// On AVX-VNNI, vnni_block does the integer part. The float arithmetic is the AVX-512 tile's, in the same
// order.
template <int BITS, typename S, int R, int H, int MT, bool TABLE = false>
void int_tile_rows(const QuantizedRows& qr, int64_t p, int64_t r0, int h0, const uint8_t* tile, const S* tscale,
                   const S* tshift, int64_t group_size, float (*y)[16], const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = qr.groups, blocks_per_group = group_size / 32;
  constexpr int64_t kBlockBytes = 64 * BITS;  // 16 rows x 32 inputs
  const int32_t* xq = qr.q.data() + p * (K / 4) * MT + r0;
  const float* xs = qr.scale.data() + p * blocks * MT + r0;
  const int32_t* xstart = qr.start.data() + p * blocks * MT + r0;
  const float* xg = qr.gsum.data() + p * groups * MT + r0;
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  constexpr int kCodeBits = TABLE ? 8 : BITS;  // the codes the arithmetic takes
  alignas(32) uint8_t table_codes[TABLE ? 512 : 1];
  const auto half = [&](const qk_m512& v, int h) { return (H == 2 ? h : h0) == 0 ? v.lo : v.hi; };  // of 16 scales
  __m256 facc[R][H];
#pragma GCC unroll 4
  for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) facc[m][h] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const qk_m512 sv = load16_f32<S>(tscale + g * kTile);
    if (tshift != nullptr) {
      const qk_m512 sh = load16_f32<S>(tshift + g * kTile);
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h) facc[m][h] = _mm256_fmadd_ps(half(sh, h), _mm256_set1_ps(xg[g * MT + m]), facc[m][h]);
    }
    __m256 gacc[R][H];
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) gacc[m][h] = _mm256_setzero_ps();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      const uint8_t* wb = tile + b * kBlockBytes + (H == 2 ? 0 : 32 * h0);
      if constexpr (TABLE) {  // IQ4 indices: looked up into int8 codes, the int8 tile's layout, run as those
        unpack_block<4, true>(tile + b * kBlockBytes, table_codes);
        wb = table_codes + (H == 2 ? 0 : 32 * h0);
      }
      const int32_t* xb = xq + b * 8 * MT;
      if (next != nullptr) prefetch_lines<kBlockBytes>(next + b * kBlockBytes);
      __m256i iacc[R][H];
#ifdef QK_AVXVNNI
      vnni_block<kCodeBits, R, H, MT>(wb, xb, xstart + b * MT, iacc);
#else
      if constexpr (kCodeBits == 8) {
#pragma GCC unroll 4
        for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
          for (int h = 0; h < H; ++h) iacc[m][h] = _mm256_set1_epi32(xstart[b * MT + m]);
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) {
          __m256i w[H], aw[H];
#pragma GCC unroll 4
          for (int h = 0; h < H; ++h) {
            w[h] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * 64 + 32 * h)), flip);
            aw[h] = _mm256_abs_epi8(w[h]);
          }
#pragma GCC unroll 4
          for (int m = 0; m < R; ++m) {
            const __m256i xv = _mm256_set1_epi32(xb[q * MT + m]);
#pragma GCC unroll 4
            for (int h = 0; h < H; ++h)
              iacc[m][h] = _mm256_add_epi32(
                  iacc[m][h], _mm256_madd_epi16(_mm256_maddubs_epi16(aw[h], _mm256_sign_epi8(xv, w[h])), ones));
          }
        }
      } else {
        // int16 pair sums, widened to int32 every kWiden steps: int4 after all 4 (16 products of at most
        // 15 x 128 each), int5 after 2 (8 of at most 31 x 128), within int16 either way
        constexpr int kWiden = BITS == 4 ? 4 : 2;
        __m256i sum16[R][H], fifth[H];
#pragma GCC unroll 4
        for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
          for (int h = 0; h < H; ++h) {
            sum16[m][h] = _mm256_setzero_si256();
            iacc[m][h] = _mm256_set1_epi32(xstart[b * MT + m]);
          }
        load_fifth<BITS, H>(wb, fifth);
        for_steps(std::make_integer_sequence<int, 4>{}, [&](auto o_) {
          constexpr int o = decltype(o_)::value;
          __m256i lo[H], hi[H];
          unpack_halves<BITS, o, H>(wb, fifth, lo, hi);
#pragma GCC unroll 4
          for (int m = 0; m < R; ++m) {
            const __m256i x0 = _mm256_set1_epi32(xb[(2 * o) * MT + m]), x1 = _mm256_set1_epi32(xb[(2 * o + 1) * MT + m]);
#pragma GCC unroll 4
            for (int h = 0; h < H; ++h) {
              sum16[m][h] = _mm256_add_epi16(sum16[m][h], _mm256_maddubs_epi16(lo[h], x0));
              sum16[m][h] = _mm256_add_epi16(sum16[m][h], _mm256_maddubs_epi16(hi[h], x1));
            }
          }
          if constexpr (o % kWiden == kWiden - 1) {
#pragma GCC unroll 4
            for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
              for (int h = 0; h < H; ++h) {
                iacc[m][h] = _mm256_add_epi32(iacc[m][h], _mm256_madd_epi16(sum16[m][h], ones));
                sum16[m][h] = _mm256_setzero_si256();
              }
          }
        });
      }
#endif
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h)
          gacc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m][h]), _mm256_set1_ps(xs[b * MT + m]), gacc[m][h]);
    }
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) facc[m][h] = _mm256_fmadd_ps(gacc[m][h], half(sv, h), facc[m][h]);
  }
#pragma GCC unroll 4
  for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) _mm256_storeu_ps(y[m] + 8 * (H == 2 ? h : h0), facc[m][h]);
}

// One block of 32 int4 inputs for 4 rows of a pass of MT rows and both halves of the tile: sum[m][h] +=
// the int16 pair sums of vpmaddubsw. Written out: given the same intrinsics, GCC reassociated the int16
// sums across the block, computed every product first and spilled them (an asm block keeps this order).
// x: the pass's 4-byte activation groups, MT rows apart (row m of group j at x[MT j + m]).
#define QK_I4_ROW(o, m, a0, a1)                                                                   \
  "vpbroadcastd " #o "*2*%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                            \
  "vpmaddubsw %[xv], %[lo0], %[t]\n\tvpaddw %[t], %[" #a0 "], %[" #a0 "]\n\t"                      \
  "vpmaddubsw %[xv], %[lo1], %[t]\n\tvpaddw %[t], %[" #a1 "], %[" #a1 "]\n\t"                      \
  "vpbroadcastd " #o "*2*%c[st]+%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                          \
  "vpmaddubsw %[xv], %[hi0], %[t]\n\tvpaddw %[t], %[" #a0 "], %[" #a0 "]\n\t"                      \
  "vpmaddubsw %[xv], %[hi1], %[t]\n\tvpaddw %[t], %[" #a1 "], %[" #a1 "]\n\t"
// Step o's codes, both halves, as unpack_block left them: lo0/lo1 quad 2o's, hi0/hi1 quad 2o + 1's.
#define QK_I4_UNPACKED(o)                                                                         \
  "vmovdqa " #o "*128(%[u]), %[lo0]\n\tvmovdqa " #o "*128+32(%[u]), %[lo1]\n\t"                     \
  "vmovdqa " #o "*128+64(%[u]), %[hi0]\n\tvmovdqa " #o "*128+96(%[u]), %[hi1]\n\t"
#define QK_I4_STEP(o) \
  QK_I4_UNPACKED(o) QK_I4_ROW(o, 0, a00, a01) QK_I4_ROW(o, 1, a10, a11) QK_I4_ROW(o, 2, a20, a21) QK_I4_ROW(o, 3, a30, a31)
template <int MT>
__attribute__((always_inline)) inline void int4_block_4x2(
    const uint8_t* u, const int32_t* x, __m256i (*sum)[2]) {
  __m256i lo0, lo1, hi0, hi1, xv, t;
  asm(QK_I4_STEP(0) QK_I4_STEP(1) QK_I4_STEP(2) QK_I4_STEP(3)
      : [a00] "+x"(sum[0][0]), [a01] "+x"(sum[0][1]), [a10] "+x"(sum[1][0]), [a11] "+x"(sum[1][1]),
        [a20] "+x"(sum[2][0]), [a21] "+x"(sum[2][1]), [a30] "+x"(sum[3][0]), [a31] "+x"(sum[3][1]),
        [lo0] "=&x"(lo0), [lo1] "=&x"(lo1), [hi0] "=&x"(hi0), [hi1] "=&x"(hi1), [xv] "=&x"(xv), [t] "=&x"(t)
      : [u] "r"(u), [x] "r"(x), [st] "i"(4 * MT), "m"(*reinterpret_cast<const uint8_t(*)[512]>(u)),
        "m"(*reinterpret_cast<const int32_t(*)[8 * MT]>(x)));
}
// Steps 0 and 1 only (8 products a lane: int_block_4x2 widens 5-bit codes' sums after each two steps).
template <int MT>
__attribute__((always_inline)) inline void int4_half_block_4x2(
    const uint8_t* u, const int32_t* x, __m256i (*sum)[2]) {
  __m256i lo0, lo1, hi0, hi1, xv, t;
  asm(QK_I4_STEP(0) QK_I4_STEP(1)
      : [a00] "+x"(sum[0][0]), [a01] "+x"(sum[0][1]), [a10] "+x"(sum[1][0]), [a11] "+x"(sum[1][1]),
        [a20] "+x"(sum[2][0]), [a21] "+x"(sum[2][1]), [a30] "+x"(sum[3][0]), [a31] "+x"(sum[3][1]),
        [lo0] "=&x"(lo0), [lo1] "=&x"(lo1), [hi0] "=&x"(hi0), [hi1] "=&x"(hi1), [xv] "=&x"(xv), [t] "=&x"(t)
      : [u] "r"(u), [x] "r"(x), [st] "i"(4 * MT), "m"(*reinterpret_cast<const uint8_t(*)[256]>(u)),
        "m"(*reinterpret_cast<const int32_t(*)[4 * MT]>(x)));
}
#undef QK_I4_STEP
#undef QK_I4_ROW

// The same for int8 codes (made signed by XOR 0x80, as int_tile_rows does): sum[m][h] += the int32 sums of
// |w| . sign(x, w), 8 groups of 4 inputs.
#define QK_I8_ROW(q, m, a0, a1)                                                                   \
  "vpbroadcastd " #q "*%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                         \
  "vpsignb %[w0], %[xv], %[t]\n\tvpmaddubsw %[t], %[a0], %[t]\n\t"                                \
  "vpmaddwd %[ones], %[t], %[t]\n\tvpaddd %[t], %[" #a0 "], %[" #a0 "]\n\t"                        \
  "vpsignb %[w1], %[xv], %[t]\n\tvpmaddubsw %[t], %[a1], %[t]\n\t"                                \
  "vpmaddwd %[ones], %[t], %[t]\n\tvpaddd %[t], %[" #a1 "], %[" #a1 "]\n\t"
#define QK_I8_STEP(q)                                                                             \
  "vpxor " #q "*64(%[w]), %[flip], %[w0]\n\tvpxor " #q "*64+32(%[w]), %[flip], %[w1]\n\t"           \
  "vpabsb %[w0], %[a0]\n\tvpabsb %[w1], %[a1]\n\t"                                                 \
  QK_I8_ROW(q, 0, s00, s01) QK_I8_ROW(q, 1, s10, s11) QK_I8_ROW(q, 2, s20, s21) QK_I8_ROW(q, 3, s30, s31)
template <int MT>
__attribute__((always_inline)) inline void int8_block_4x2(
    const uint8_t* w, const int32_t* x, __m256i flip, __m256i ones, __m256i (*sum)[2]) {
  __m256i w0, w1, a0, a1, xv, t;
  asm(QK_I8_STEP(0) QK_I8_STEP(1) QK_I8_STEP(2) QK_I8_STEP(3) QK_I8_STEP(4) QK_I8_STEP(5) QK_I8_STEP(6)
          QK_I8_STEP(7)
      : [s00] "+x"(sum[0][0]), [s01] "+x"(sum[0][1]), [s10] "+x"(sum[1][0]), [s11] "+x"(sum[1][1]),
        [s20] "+x"(sum[2][0]), [s21] "+x"(sum[2][1]), [s30] "+x"(sum[3][0]), [s31] "+x"(sum[3][1]),
        [w0] "=&x"(w0), [w1] "=&x"(w1), [a0] "=&x"(a0), [a1] "=&x"(a1), [xv] "=&x"(xv), [t] "=&x"(t)
      : [w] "r"(w), [x] "r"(x), [st] "i"(4 * MT), [flip] "x"(flip), [ones] "x"(ones),
        "m"(*reinterpret_cast<const uint8_t(*)[512]>(w)), "m"(*reinterpret_cast<const int32_t(*)[8 * MT]>(x)));
}
#undef QK_I8_STEP
#undef QK_I8_ROW

#ifdef QK_AVXVNNI
// The same two blocks on AVX-VNNI: sum[m][h] += the int32 sums of vpdpbusd (u8 codes, s8 activations),
// no int16 stage, the int8 codes as they are (their zero point in the block starts, as on AVX-512).
#define QK_V4_ROW(o, m, a0, a1)                                                                   \
  "vpbroadcastd " #o "*2*%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                            \
  "%{vex%} vpdpbusd %[xv], %[lo0], %[" #a0 "]\n\t%{vex%} vpdpbusd %[xv], %[lo1], %[" #a1 "]\n\t"          \
  "vpbroadcastd " #o "*2*%c[st]+%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                      \
  "%{vex%} vpdpbusd %[xv], %[hi0], %[" #a0 "]\n\t%{vex%} vpdpbusd %[xv], %[hi1], %[" #a1 "]\n\t"
#define QK_V4_STEP(o) \
  QK_I4_UNPACKED(o) QK_V4_ROW(o, 0, a00, a01) QK_V4_ROW(o, 1, a10, a11) QK_V4_ROW(o, 2, a20, a21) QK_V4_ROW(o, 3, a30, a31)
template <int MT>
__attribute__((always_inline)) inline void int4_block_4x2_vnni(
    const uint8_t* u, const int32_t* x, __m256i (*sum)[2]) {
  __m256i lo0, lo1, hi0, hi1, xv;
  asm(QK_V4_STEP(0) QK_V4_STEP(1) QK_V4_STEP(2) QK_V4_STEP(3)
      : [a00] "+x"(sum[0][0]), [a01] "+x"(sum[0][1]), [a10] "+x"(sum[1][0]), [a11] "+x"(sum[1][1]),
        [a20] "+x"(sum[2][0]), [a21] "+x"(sum[2][1]), [a30] "+x"(sum[3][0]), [a31] "+x"(sum[3][1]),
        [lo0] "=&x"(lo0), [lo1] "=&x"(lo1), [hi0] "=&x"(hi0), [hi1] "=&x"(hi1), [xv] "=&x"(xv)
      : [u] "r"(u), [x] "r"(x), [st] "i"(4 * MT), "m"(*reinterpret_cast<const uint8_t(*)[512]>(u)),
        "m"(*reinterpret_cast<const int32_t(*)[8 * MT]>(x)));
}
#undef QK_V4_STEP
#undef QK_V4_ROW

#define QK_V8_ROW(q, m, a0, a1)                                                                   \
  "vpbroadcastd " #q "*%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                         \
  "%{vex%} vpdpbusd %[xv], %[w0], %[" #a0 "]\n\t%{vex%} vpdpbusd %[xv], %[w1], %[" #a1 "]\n\t"
#define QK_V8_STEP(q)                                                                             \
  "vmovdqu " #q "*64(%[w]), %[w0]\n\tvmovdqu " #q "*64+32(%[w]), %[w1]\n\t"                         \
  QK_V8_ROW(q, 0, s00, s01) QK_V8_ROW(q, 1, s10, s11) QK_V8_ROW(q, 2, s20, s21) QK_V8_ROW(q, 3, s30, s31)
template <int MT>
__attribute__((always_inline)) inline void int8_block_4x2_vnni(
    const uint8_t* w, const int32_t* x, __m256i (*sum)[2]) {
  __m256i w0, w1, xv;
  asm(QK_V8_STEP(0) QK_V8_STEP(1) QK_V8_STEP(2) QK_V8_STEP(3) QK_V8_STEP(4) QK_V8_STEP(5) QK_V8_STEP(6)
          QK_V8_STEP(7)
      : [s00] "+x"(sum[0][0]), [s01] "+x"(sum[0][1]), [s10] "+x"(sum[1][0]), [s11] "+x"(sum[1][1]),
        [s20] "+x"(sum[2][0]), [s21] "+x"(sum[2][1]), [s30] "+x"(sum[3][0]), [s31] "+x"(sum[3][1]),
        [w0] "=&x"(w0), [w1] "=&x"(w1), [xv] "=&x"(xv)
      : [w] "r"(w), [x] "r"(x), [st] "i"(4 * MT), "m"(*reinterpret_cast<const uint8_t(*)[512]>(w)),
        "m"(*reinterpret_cast<const int32_t(*)[8 * MT]>(x)));
}
#undef QK_V8_STEP
#undef QK_V8_ROW
#endif
#undef QK_I4_UNPACKED

// One block's int32 sums for rows 0-3 of the pass and both halves, the block's start included; w: the
// block's int8 codes, or its int4/int5 codes as unpack_block left them.
template <int BITS, int MT>
__attribute__((always_inline)) inline void int_block_4x2(const uint8_t* w, const int32_t* x, const int32_t* start,
                                                         __m256i (*iacc)[2]) {
#ifdef QK_AVXVNNI
  for (int m = 0; m < 4; ++m) iacc[m][0] = iacc[m][1] = _mm256_set1_epi32(start[m]);
  if constexpr (BITS == 8)
    int8_block_4x2_vnni<MT>(w, x, iacc);
  else
    int4_block_4x2_vnni<MT>(w, x, iacc);  // 5-bit codes alike: vpdpbusd has no int16 stage
  return;
#endif
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {
    for (int m = 0; m < 4; ++m) iacc[m][0] = iacc[m][1] = _mm256_set1_epi32(start[m]);
    int8_block_4x2<MT>(w, x, _mm256_set1_epi8(char(0x80)), ones, iacc);
  } else if constexpr (BITS == 5) {  // two steps at a time, so the int16 pair sums stay in range
    for (int m = 0; m < 4; ++m) iacc[m][0] = iacc[m][1] = _mm256_set1_epi32(start[m]);
    for (int half = 0; half < 2; ++half) {
      __m256i sum16[4][2];
      for (int m = 0; m < 4; ++m) sum16[m][0] = sum16[m][1] = _mm256_setzero_si256();
      int4_half_block_4x2<MT>(w + 256 * half, x + 4 * MT * half, sum16);
      for (int m = 0; m < 4; ++m)
        for (int h = 0; h < 2; ++h) iacc[m][h] = _mm256_add_epi32(iacc[m][h], _mm256_madd_epi16(sum16[m][h], ones));
    }
  } else {
    __m256i sum16[4][2];
    for (int m = 0; m < 4; ++m) sum16[m][0] = sum16[m][1] = _mm256_setzero_si256();
    int4_block_4x2<MT>(w, x, sum16);
    for (int m = 0; m < 4; ++m)
      for (int h = 0; h < 2; ++h)
        iacc[m][h] = _mm256_add_epi32(_mm256_set1_epi32(start[m]), _mm256_madd_epi16(sum16[m][h], ones));
  }
}

constexpr int kMaxQuads = 4;  // 4-row groups a tile call works on: 16 rows, two passes of 8

// `quads` groups of 4 rows (quad i: rows 4i..4i+3 from pass p's first, in passes of MT rows) against both
// halves of an int8, int4, int5 or IQ4 tile (prompts and decode steps of 3-16 rows): block by block, so a block is
// read from L1 (and int4/int5 unpacked) once for all the quads, int_block_4x2 for a quad's integer part, then
// int_tile_rows' float arithmetic in the same order, so a row's result is the same in any pass. The float
// sums live in L1, through a pointer GCC cannot see through (kept in registers, they and the values GCC
// hoisted were spilled at every group). 16 rows of a 4864 x 896 product, g32 with minimums, one thread:
// int4 1.50 -> 0.97 ms, int8 1.92 -> 1.42 (a pass of 4 rows at a time, unpacking per pass).
template <int BITS, typename S, int MT, bool TABLE = false>
void int_tile_quads(const QuantizedRows& qr, int64_t p, int quads, const uint8_t* tile, const S* tscale,
                    const S* tshift, int64_t group_size, float (*y)[16], const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = qr.groups, blocks_per_group = group_size / 32;
  const int32_t* xq[kMaxQuads];
  const float* xs[kMaxQuads];
  const int32_t* xstart[kMaxQuads];
  const float* xg[kMaxQuads];
  for (int i = 0; i < quads; ++i) {
    const int64_t pass = p + 4 * i / MT, r0 = 4 * i % MT;
    xq[i] = qr.q.data() + pass * (K / 4) * MT + r0;
    xs[i] = qr.scale.data() + pass * blocks * MT + r0;
    xstart[i] = qr.start.data() + pass * blocks * MT + r0;
    xg[i] = qr.gsum.data() + pass * groups * MT + r0;
  }
  constexpr int64_t kBlockBytes = 64 * BITS;  // 16 rows x 32 inputs
  alignas(32) uint8_t unpacked[512];
  alignas(32) __m256 sums[2][4 * kMaxQuads][2];
  __m256(*acc)[4 * kMaxQuads][2] = sums;
  asm("" : "+r"(acc));
  __m256(&F)[4 * kMaxQuads][2] = acc[0];
  __m256(&G)[4 * kMaxQuads][2] = acc[1];
  for (int m = 0; m < 4 * quads; ++m)
    for (int h = 0; h < 2; ++h) F[m][h] = _mm256_setzero_ps();
  // the block's codes as int_block_4x2 reads them
  const auto block_codes = [&](int64_t b) -> const uint8_t* {
    if (next != nullptr) prefetch_lines<kBlockBytes>(next + b * kBlockBytes);
    if constexpr (BITS == 8) return tile + b * kBlockBytes;
    unpack_block<BITS, TABLE>(tile + b * kBlockBytes, unpacked);
    return unpacked;
  };
  if (blocks_per_group == 1) {  // a group per block (GGUF, g32): no group sums, the same roundings
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* w = block_codes(b);
      const qk_m512 sv = load16_f32<S>(tscale + b * kTile);
      const qk_m512 sh = tshift != nullptr ? load16_f32<S>(tshift + b * kTile) : qk_m512{};
      for (int i = 0; i < quads; ++i) {
        __m256i iacc[4][2];
        int_block_4x2<TABLE ? 8 : BITS, MT>(w, xq[i] + b * 8 * MT, xstart[i] + b * MT, iacc);
        for (int m = 0; m < 4; ++m) {
          const __m256 xsm = _mm256_set1_ps(xs[i][b * MT + m]), xgm = _mm256_set1_ps(xg[i][b * MT + m]);
          for (int h = 0; h < 2; ++h) {
            __m256 f = F[4 * i + m][h];
            if (tshift != nullptr) f = _mm256_fmadd_ps(h == 0 ? sh.lo : sh.hi, xgm, f);
            const __m256 gsum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m][h]), xsm, _mm256_setzero_ps());
            F[4 * i + m][h] = _mm256_fmadd_ps(gsum, h == 0 ? sv.lo : sv.hi, f);
          }
        }
      }
    }
  }
  for (int64_t g = 0; blocks_per_group > 1 && g < groups; ++g) {
    if (tshift != nullptr) {
      const qk_m512 sh = load16_f32<S>(tshift + g * kTile);
      for (int i = 0; i < quads; ++i)
        for (int m = 0; m < 4; ++m) {
          const __m256 xgm = _mm256_set1_ps(xg[i][g * MT + m]);
          F[4 * i + m][0] = _mm256_fmadd_ps(sh.lo, xgm, F[4 * i + m][0]);
          F[4 * i + m][1] = _mm256_fmadd_ps(sh.hi, xgm, F[4 * i + m][1]);
        }
    }
    for (int m = 0; m < 4 * quads; ++m)
      for (int h = 0; h < 2; ++h) G[m][h] = _mm256_setzero_ps();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      const uint8_t* w = block_codes(b);
      for (int i = 0; i < quads; ++i) {
        __m256i iacc[4][2];
        int_block_4x2<TABLE ? 8 : BITS, MT>(w, xq[i] + b * 8 * MT, xstart[i] + b * MT, iacc);
        for (int m = 0; m < 4; ++m) {
          const __m256 xsm = _mm256_set1_ps(xs[i][b * MT + m]);
          for (int h = 0; h < 2; ++h)
            G[4 * i + m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m][h]), xsm, G[4 * i + m][h]);
        }
      }
    }
    const qk_m512 sv = load16_f32<S>(tscale + g * kTile);
    for (int m = 0; m < 4 * quads; ++m) {
      F[m][0] = _mm256_fmadd_ps(G[m][0], sv.lo, F[m][0]);
      F[m][1] = _mm256_fmadd_ps(G[m][1], sv.hi, F[m][1]);
    }
  }
  for (int m = 0; m < 4 * quads; ++m) {
    _mm256_storeu_ps(y[m], F[m][0]);
    _mm256_storeu_ps(y[m] + 8, F[m][1]);
  }
}

template <int BITS, typename S, int MT, bool TABLE = false>
void int_tile(const QuantizedRows& qr, int64_t p, const uint8_t* tile, const S* tscale, const S* tshift,
              int64_t group_size, const Output& out, int64_t m0, int64_t n0, const uint8_t* next) {
  alignas(32) float y[MT][16];
  if constexpr (MT >= 4) {
    int_tile_quads<BITS, S, MT, TABLE>(qr, p, MT / 4, tile, tscale, tshift, group_size, y, next);
  } else if constexpr (BITS == 8 && !TABLE) {
    // While the next tile is fetched (prefetch_decode_tiles), both halves in one pass: the tile's own
    // loads and the next tile's prefetches then run side by side through the whole tile. One half at a
    // time, the first pass drew every line of the tile and the whole next tile from memory, and memory
    // idled in the second (on the Zen 2 that made int8 decode 7-17% slower than no prefetch at all).
    // Without it, one half at a time (the tile read again from cache for the other), as measured fastest.
    if (next != nullptr) {
      int_tile_rows<BITS, S, MT, 2, MT, TABLE>(qr, p, 0, 0, tile, tscale, tshift, group_size, y, next);
    } else {
      for (int h0 = 0; h0 < 2; ++h0)
        int_tile_rows<BITS, S, MT, 1, MT, TABLE>(qr, p, 0, h0, tile, tscale, tshift, group_size, y, nullptr);
    }
  } else {
    constexpr int H = TABLE ? 1 : 2;  // as measured fastest (int4)
    for (int h0 = 0; h0 < 2; h0 += H)
      int_tile_rows<BITS, S, MT, H, MT, TABLE>(qr, p, 0, h0, tile, tscale, tshift, group_size, y,
                                                h0 == 0 ? next : nullptr);
  }
  for (int m = 0; m < MT; ++m) out.store(m0 + m, n0, _mm512_loadu_ps(y[m]));
}

// Passes p and p + 1 of 8 rows each, as one call: every block of the tile read, and int4/int5 unpacked, once
// for the 16 rows (a decode step of 9-16 rows, a prompt's rows 16 at a time).
template <int BITS, typename S, bool TABLE = false>
void int_tile_pair(const QuantizedRows& qr, int64_t p, const uint8_t* tile, const S* tscale, const S* tshift,
                   int64_t group_size, const Output& out, int64_t m0, int64_t n0, const uint8_t* next) {
  alignas(32) float y[16][16];
  int_tile_quads<BITS, S, 8, TABLE>(qr, p, 4, tile, tscale, tshift, group_size, y, next);
  for (int m = 0; m < 16; ++m) out.store(m0 + m, n0, _mm512_loadu_ps(y[m]));
}
#endif
