// vector_helpers.h: constants of the packed formats and small vector helpers.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// helpers

// The values IQ4_NL's and IQ4_XS's 4-bit indices stand for (ggml's kvalues_iq4nl). 4-bit codes with zero
// point 128 (no linear 4-bit code has one) are such indices: the weight is (kIq4Values[code] + 128 - 128)
// * scale, the table's bytes + 128 taking the place of the nibbles in the unsigned side of vpdpbusd, so
// IQ4 weights run at 4 bits instead of as int8 codes. AVX2 and AVX-VNNI look the nibbles up into int8
// codes in the int8 tile's layout and run those (the int4 tile's int16 pair sums would overflow on
// bytes up to 241).
constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
constexpr int64_t kIq4ZeroPoint = 128;
inline bool iq4_table(int64_t bits, int64_t zero_point) { return bits == 4 && zero_point == kIq4ZeroPoint; }

// GGUF Q6_K as the kernels hold it ("6 bits"): per 32 inputs of a 16-row tile, two runs of 192 bytes, one
// per sub-block of 16 (quads 4s .. 4s + 3, quad v: inputs 4v .. 4v + 3 of the 16 rows, byte 4r + j), each
// three 64-byte vectors holding the first three quads' 6-bit codes in bits 0-5 and the fourth quad's code
// two bits at a time in their bits 6-7 (low, middle, high pair); then the int8 scales of the two
// sub-blocks for the 16 rows. The code is q (0..63) on zero point 32; the float scale d is per 256 inputs.
constexpr int64_t kQ6BlockBytes = 416, kQ6Group = 256, kQ6ZeroPoint = 32;

// Software prefetch distance in bytes ahead of the weight streams; 0 (the default) issues none. Each
// thread reads its tiles as one sequential stream, which the hardware prefetchers follow on their own:
// on the Zen 4 we measured, prefetching 1-4 KB ahead made a decode step's matrix-vector products 8-25%
// slower (bf16 most), so it is off; -DQK_PREFETCH=N turns it on for a CPU where it pays.
#ifndef QK_PREFETCH
#define QK_PREFETCH 0
#endif
inline void prefetch(const void* p) {
  if constexpr (QK_PREFETCH > 0) _mm_prefetch(static_cast<const char*>(p) + QK_PREFETCH, _MM_HINT_T0);
}

// The next tile of a pass with 8 or more rows, fetched into L2 block by block while this tile is
// worked on. With that many rows a tile's arithmetic takes longer than reading it, the hardware
// prefetchers stop running ahead of the loads, and memory would idle while the cores compute: fetching
// the next tile meanwhile made 16-row products of the 0.5B model 20-25% faster. (At 1-4 rows the passes
// are memory bound and the hardware prefetchers keep up; see QK_PREFETCH.) HINT T0 fetches into L1 instead.
template <int64_t BYTES, _mm_hint HINT = _MM_HINT_T1>
inline void prefetch_lines(const uint8_t* p) {
#pragma GCC unroll 8
  for (int64_t l = 0; l < BYTES; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + l), HINT);
}

inline __m512 load_bf16_as_f32(const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

inline __m512 maskz_load_bf16_as_f32(__mmask16 m, const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

// 16 floats rounded to bf16 (nearest even, as torch) and widened back.
inline __m512 round_bf16(__m512 v) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store_bf16(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v)); }

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

// Rows of x are processed in tiles of a power of two (padding with zero rows), so only five tile
// sizes are compiled per kernel; the padding costs arithmetic, never memory traffic.
inline int64_t tile_rows(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16; }

// e^x for 16 floats: Cephes' expf polynomial after reduction by ln 2 (about 1 ulp), 2^n by scalef, so
// large |x| give inf and 0 as expf does.
inline __m512 exp512(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
