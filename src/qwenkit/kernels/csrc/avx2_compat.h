// The AVX-512 intrinsics cpu_kernels.cpp uses, written on AVX2 + FMA + F16C, for CPUs without AVX-512
// (most laptops, AMD before Zen 4, Intel client cores since Alder Lake).
//
// cpu_kernels.cpp includes this file only when the compiler targets no AVX-512 (build.py's "avx2" and
// "avxvnni" levels; the latter's AVX-VNNI instructions replace the VNNI emulations below),
// so the AVX-512 build is untouched by it. Each 512-bit type becomes a pair of 256-bit halves (lo holds
// elements 0..7 / 0..15 / 0..3, hi the rest) and each intrinsic is renamed by a macro to a function here
// that does the same to both halves, with AVX-512's results: the same integer results bit for bit, the
// same float roundings (the 8-row reductions in the same order as GCC's own), masked loads that never
// touch the masked-out elements. What AVX2 lacks (VNNI, BF16 dot products, 16-bit permutes) is built from
// what it has; the kernels' hot loops take shortcuts of their own where AVX2 allows a cheaper form.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#define QK_INLINE static inline __attribute__((always_inline))

struct qk_m512 {
  __m256 lo, hi;
};
struct qk_m512i {
  __m256i lo, hi;
};
struct qk_m512d {
  __m256d lo, hi;
};

#define __m512 qk_m512
#define __m512i qk_m512i
#define __m512d qk_m512d
#define __m512bh qk_m512i  // 32 bf16 codes: casts to it from __m512i are then the identity

// --- masks: bit i of a __mmask16 <-> lane i of the two halves ---------------------------------------

QK_INLINE __m256i qk_lanes8(unsigned bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits)), sel), sel);
}
QK_INLINE qk_m512i qk_lanes16(__mmask16 k) { return {qk_lanes8(k & 0xff), qk_lanes8(k >> 8)}; }
QK_INLINE __mmask16 qk_mask_of(__m256 lo, __m256 hi) {
  return __mmask16(unsigned(_mm256_movemask_ps(lo)) | (unsigned(_mm256_movemask_ps(hi)) << 8));
}

// --- float ----------------------------------------------------------------------------------------------

QK_INLINE qk_m512 qk_set1_ps(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
QK_INLINE qk_m512 qk_setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
QK_INLINE qk_m512 qk_loadu_ps(const void* p) {
  const float* f = static_cast<const float*>(p);
  return {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)};
}
QK_INLINE void qk_storeu_ps(void* p, qk_m512 v) {
  float* f = static_cast<float*>(p);
  _mm256_storeu_ps(f, v.lo);
  _mm256_storeu_ps(f + 8, v.hi);
}
QK_INLINE qk_m512 qk_maskz_loadu_ps(__mmask16 k, const void* p) {
  const float* f = static_cast<const float*>(p);
  const qk_m512i m = qk_lanes16(k);
  return {_mm256_maskload_ps(f, m.lo), _mm256_maskload_ps(f + 8, m.hi)};
}
QK_INLINE void qk_mask_storeu_ps(void* p, __mmask16 k, qk_m512 v) {
  float* f = static_cast<float*>(p);
  const qk_m512i m = qk_lanes16(k);
  _mm256_maskstore_ps(f, m.lo, v.lo);
  _mm256_maskstore_ps(f + 8, m.hi, v.hi);
}
QK_INLINE qk_m512 qk_add_ps(qk_m512 a, qk_m512 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
QK_INLINE qk_m512 qk_sub_ps(qk_m512 a, qk_m512 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
QK_INLINE qk_m512 qk_mul_ps(qk_m512 a, qk_m512 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
QK_INLINE qk_m512 qk_div_ps(qk_m512 a, qk_m512 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
QK_INLINE qk_m512 qk_max_ps(qk_m512 a, qk_m512 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
QK_INLINE qk_m512 qk_fmadd_ps(qk_m512 a, qk_m512 b, qk_m512 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
QK_INLINE qk_m512 qk_fnmadd_ps(qk_m512 a, qk_m512 b, qk_m512 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
QK_INLINE qk_m512 qk_abs_ps(qk_m512 a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
QK_INLINE qk_m512 qk_blend_ps(qk_m512 a, qk_m512 b, qk_m512i m) {  // b where m, else a
  return {_mm256_blendv_ps(a.lo, b.lo, _mm256_castsi256_ps(m.lo)), _mm256_blendv_ps(a.hi, b.hi, _mm256_castsi256_ps(m.hi))};
}
QK_INLINE qk_m512 qk_mask_mov_ps(qk_m512 src, __mmask16 k, qk_m512 a) { return qk_blend_ps(src, a, qk_lanes16(k)); }
QK_INLINE qk_m512 qk_maskz_mov_ps(__mmask16 k, qk_m512 a) { return qk_blend_ps(qk_setzero_ps(), a, qk_lanes16(k)); }
QK_INLINE qk_m512 qk_mask_max_ps(qk_m512 src, __mmask16 k, qk_m512 a, qk_m512 b) {
  return qk_mask_mov_ps(src, k, qk_max_ps(a, b));
}
template <int P>
QK_INLINE __mmask16 qk_cmp_ps_mask(qk_m512 a, qk_m512 b) {
  return qk_mask_of(_mm256_cmp_ps(a.lo, b.lo, P), _mm256_cmp_ps(a.hi, b.hi, P));
}
QK_INLINE qk_m512 qk_unpacklo_ps(qk_m512 a, qk_m512 b) {
  return {_mm256_unpacklo_ps(a.lo, b.lo), _mm256_unpacklo_ps(a.hi, b.hi)};
}
QK_INLINE qk_m512 qk_unpackhi_ps(qk_m512 a, qk_m512 b) {
  return {_mm256_unpackhi_ps(a.lo, b.lo), _mm256_unpackhi_ps(a.hi, b.hi)};
}
// 128-bit lane i of a (0..3).
QK_INLINE __m128 qk_lane(qk_m512 a, int i) {
  const __m256 h = i < 2 ? a.lo : a.hi;
  return (i & 1) ? _mm256_extractf128_ps(h, 1) : _mm256_castps256_ps128(h);
}
template <int IMM>
QK_INLINE qk_m512 qk_shuffle_f32x4(qk_m512 a, qk_m512 b) {
  return {_mm256_set_m128(qk_lane(a, (IMM >> 2) & 3), qk_lane(a, IMM & 3)),
          _mm256_set_m128(qk_lane(b, (IMM >> 6) & 3), qk_lane(b, (IMM >> 4) & 3))};
}
template <int IMM>
QK_INLINE qk_m512 qk_roundscale_ps(qk_m512 a) {
  static_assert((IMM & 0xf0) == 0, "only rounding to whole numbers is written here");
  return {_mm256_round_ps(a.lo, IMM & 0x0f), _mm256_round_ps(a.hi, IMM & 0x0f)};
}
// a * 2^floor(b), as vscalefps: two exact power-of-two steps so results that leave the normal range
// still overflow to inf or underflow as a product would; and its special cases for infinite b, which
// exp512 relies on (its polynomial is NaN at x = -inf, and scalef(NaN, -inf) = +0, scalef(NaN, inf) = inf).
QK_INLINE __m256 qk_scalef8(__m256 a, __m256 b) {
  const __m256 n = _mm256_min_ps(_mm256_max_ps(_mm256_floor_ps(b), _mm256_set1_ps(-252.0f)), _mm256_set1_ps(254.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 r = _mm256_mul_ps(_mm256_mul_ps(a, p1), p2);
  const __m256 inf = _mm256_set1_ps(INFINITY), zero = _mm256_setzero_ps();
  const __m256 a_nan = _mm256_cmp_ps(a, a, _CMP_UNORD_Q);
  const __m256 down = _mm256_cmp_ps(b, _mm256_sub_ps(zero, inf), _CMP_EQ_OQ), up = _mm256_cmp_ps(b, inf, _CMP_EQ_OQ);
  // b = -inf: a * 0 (a NaN: +0; a infinite: NaN, as a * 0 gives); b = +inf: a * inf (a NaN: +inf; a = 0: NaN)
  r = _mm256_blendv_ps(r, _mm256_blendv_ps(_mm256_mul_ps(a, zero), zero, a_nan), down);
  r = _mm256_blendv_ps(r, _mm256_blendv_ps(_mm256_mul_ps(a, inf), inf, a_nan), up);
  return r;
}
QK_INLINE qk_m512 qk_scalef_ps(qk_m512 a, qk_m512 b) { return {qk_scalef8(a.lo, b.lo), qk_scalef8(a.hi, b.hi)}; }

// Horizontal reductions in the order of GCC's _mm512_reduce_*: halves, then 128-bit lanes, then pairs.
QK_INLINE float qk_reduce_add_ps(qk_m512 a) {
  const __m256 h = _mm256_add_ps(a.hi, a.lo);
  const __m128 t4 = _mm_add_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
  const __m128 t8 = _mm_add_ps(t4, _mm_shuffle_ps(t4, t4, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, _MM_SHUFFLE(1, 1, 1, 1)));
}
QK_INLINE float qk_reduce_max_ps(qk_m512 a) {
  const __m256 h = _mm256_max_ps(a.hi, a.lo);
  const __m128 t4 = _mm_max_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
  const __m128 t8 = _mm_max_ps(t4, _mm_shuffle_ps(t4, t4, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_max_ss(t8, _mm_shuffle_ps(t8, t8, _MM_SHUFFLE(1, 1, 1, 1))));
}

// --- float <-> bf16 / fp16 -----------------------------------------------------------------------------

// fp32 -> bf16, round to nearest even, NaN kept quiet (as vcvtneps2bf16 and torch): 8 codes in the low
// 16 bits of each 32-bit lane.
QK_INLINE __m256i qk_bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}
// 16 x 32-bit lanes (two halves) -> 16 x 16-bit in order; pack16 narrows with packus/packs.
QK_INLINE __m256i qk_order16(__m256i packed) { return _mm256_permute4x64_epi64(packed, _MM_SHUFFLE(3, 1, 2, 0)); }
QK_INLINE __m256i qk_cvtneps_pbh(qk_m512 v) {
  return qk_order16(_mm256_packus_epi32(qk_bf16_bits8(v.lo), qk_bf16_bits8(v.hi)));
}
QK_INLINE qk_m512 qk_cvtph_ps(__m256i h) {
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}
// 32 bf16 pairs . 32 bf16 pairs + acc, per 32-bit lane: the odd products first, then the even ones, as
// vdpbf16ps specifies (each bf16 product is exact in fp32, so a fused multiply-add rounds as it does).
QK_INLINE __m256 qk_dpbf16_8(__m256 acc, __m256i a, __m256i b) {
  const __m256i high = _mm256_set1_epi32(int(0xffff0000u));
  acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, high)), _mm256_castsi256_ps(_mm256_and_si256(b, high)), acc);
  return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), acc);
}
QK_INLINE qk_m512 qk_dpbf16_ps(qk_m512 acc, qk_m512i a, qk_m512i b) {
  return {qk_dpbf16_8(acc.lo, a.lo, b.lo), qk_dpbf16_8(acc.hi, a.hi, b.hi)};
}

// --- double ------------------------------------------------------------------------------------------

QK_INLINE qk_m512d qk_setzero_pd() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
QK_INLINE qk_m512d qk_add_pd(qk_m512d a, qk_m512d b) { return {_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
QK_INLINE qk_m512d qk_fmadd_pd(qk_m512d a, qk_m512d b, qk_m512d c) {
  return {_mm256_fmadd_pd(a.lo, b.lo, c.lo), _mm256_fmadd_pd(a.hi, b.hi, c.hi)};
}
QK_INLINE qk_m512d qk_cvtps_pd(__m256 a) {
  return {_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1))};
}
QK_INLINE qk_m512d qk_unpacklo_pd(qk_m512d a, qk_m512d b) {
  return {_mm256_unpacklo_pd(a.lo, b.lo), _mm256_unpacklo_pd(a.hi, b.hi)};
}
QK_INLINE qk_m512d qk_unpackhi_pd(qk_m512d a, qk_m512d b) {
  return {_mm256_unpackhi_pd(a.lo, b.lo), _mm256_unpackhi_pd(a.hi, b.hi)};
}
QK_INLINE double qk_reduce_add_pd(qk_m512d a) {
  const __m256d h = _mm256_add_pd(a.hi, a.lo);
  const __m128d t = _mm_add_pd(_mm256_extractf128_pd(h, 1), _mm256_castpd256_pd128(h));
  return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}

// --- casts ---------------------------------------------------------------------------------------------

QK_INLINE qk_m512 qk_castsi512_ps(qk_m512i a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
QK_INLINE qk_m512i qk_castps_si512(qk_m512 a) { return {_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)}; }
QK_INLINE qk_m512d qk_castps_pd(qk_m512 a) { return {_mm256_castps_pd(a.lo), _mm256_castps_pd(a.hi)}; }
QK_INLINE qk_m512 qk_castpd_ps(qk_m512d a) { return {_mm256_castpd_ps(a.lo), _mm256_castpd_ps(a.hi)}; }
QK_INLINE __m256 qk_castps512_ps256(qk_m512 a) { return a.lo; }
QK_INLINE __m256i qk_castsi512_si256(qk_m512i a) { return a.lo; }
QK_INLINE __m256d qk_extractf64x4_pd(qk_m512d a, int i) { return i ? a.hi : a.lo; }
QK_INLINE __m256i qk_extracti64x4_epi64(qk_m512i a, int i) { return i ? a.hi : a.lo; }

// --- integer -------------------------------------------------------------------------------------------

QK_INLINE qk_m512i qk_setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
QK_INLINE qk_m512i qk_set1_epi32(int v) { return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
QK_INLINE qk_m512i qk_set1_epi8(char v) { return {_mm256_set1_epi8(v), _mm256_set1_epi8(v)}; }
QK_INLINE qk_m512i qk_setr_epi32(int a0, int a1, int a2, int a3, int a4, int a5, int a6, int a7, int a8, int a9,
                                 int a10, int a11, int a12, int a13, int a14, int a15) {
  return {_mm256_setr_epi32(a0, a1, a2, a3, a4, a5, a6, a7), _mm256_setr_epi32(a8, a9, a10, a11, a12, a13, a14, a15)};
}
QK_INLINE qk_m512i qk_loadu_si512(const void* p) {
  const __m256i* v = static_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)};
}
QK_INLINE void qk_storeu_si512(void* p, qk_m512i a) {
  __m256i* v = static_cast<__m256i*>(p);
  _mm256_storeu_si256(v, a.lo);
  _mm256_storeu_si256(v + 1, a.hi);
}
QK_INLINE qk_m512i qk_maskz_loadu_epi32(__mmask16 k, const void* p) {
  const int* v = static_cast<const int*>(p);
  const qk_m512i m = qk_lanes16(k);
  return {_mm256_maskload_epi32(v, m.lo), _mm256_maskload_epi32(v + 8, m.hi)};
}
// 16-bit lanes have no masked load or store in AVX2: a whole vector when every lane is wanted, else
// lane by lane, so nothing outside the mask is read or written.
QK_INLINE qk_m512i qk_maskz_loadu_epi16(__mmask32 k, const void* p) {
  if (k == 0xffffffffu) return qk_loadu_si512(p);
  if (k == 0xffffu) return {_mm256_loadu_si256(static_cast<const __m256i*>(p)), _mm256_setzero_si256()};
  alignas(32) uint16_t buf[32] = {};
  for (int i = 0; i < 32; ++i)
    if ((k >> i) & 1u) std::memcpy(buf + i, static_cast<const uint16_t*>(p) + i, 2);
  return qk_loadu_si512(buf);
}
QK_INLINE __m256i qk256_maskz_loadu_epi16(__mmask16 k, const void* p) {
  if (k == 0xffff) return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  alignas(32) uint16_t buf[16] = {};
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1u) std::memcpy(buf + i, static_cast<const uint16_t*>(p) + i, 2);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}
QK_INLINE void qk256_mask_storeu_epi16(void* p, __mmask16 k, __m256i a) {
  if (k == 0xffff) return _mm256_storeu_si256(static_cast<__m256i*>(p), a);
  alignas(32) uint16_t buf[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(buf), a);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1u) std::memcpy(static_cast<uint16_t*>(p) + i, buf + i, 2);
}
QK_INLINE qk_m512i qk_add_epi32(qk_m512i a, qk_m512i b) {
  return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)};
}
QK_INLINE qk_m512i qk_and_si512(qk_m512i a, qk_m512i b) {
  return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)};
}
QK_INLINE qk_m512i qk_xor_si512(qk_m512i a, qk_m512i b) {
  return {_mm256_xor_si256(a.lo, b.lo), _mm256_xor_si256(a.hi, b.hi)};
}
QK_INLINE qk_m512i qk_slli_epi32(qk_m512i a, int n) { return {_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)}; }
// 16-bit interleaves within each 128-bit lane, as AVX-512's
QK_INLINE qk_m512i qk_unpacklo_epi16(qk_m512i a, qk_m512i b) {
  return {_mm256_unpacklo_epi16(a.lo, b.lo), _mm256_unpacklo_epi16(a.hi, b.hi)};
}
QK_INLINE qk_m512i qk_unpackhi_epi16(qk_m512i a, qk_m512i b) {
  return {_mm256_unpackhi_epi16(a.lo, b.lo), _mm256_unpackhi_epi16(a.hi, b.hi)};
}
QK_INLINE qk_m512i qk_srli_epi16(qk_m512i a, int n) { return {_mm256_srli_epi16(a.lo, n), _mm256_srli_epi16(a.hi, n)}; }
QK_INLINE qk_m512i qk_cvtps_epi32(qk_m512 a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
QK_INLINE qk_m512 qk_cvtepi32_ps(qk_m512i a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
QK_INLINE qk_m512i qk_cvtepu16_epi32(__m256i a) {
  return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1))};
}
// 16 int32 -> 16 int16 / int8 with signed saturation (saturating to 16 bits first changes no int8 result).
QK_INLINE __m256i qk_cvtsepi32_epi16(qk_m512i a) { return qk_order16(_mm256_packs_epi32(a.lo, a.hi)); }
QK_INLINE __m128i qk_cvtsepi32_epi8(qk_m512i a) {
  const __m256i w = qk_cvtsepi32_epi16(a);
  return _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}
QK_INLINE qk_m512i qk_mask_mov_epi32(qk_m512i src, __mmask16 k, qk_m512i a) {
  const qk_m512i m = qk_lanes16(k);
  return {_mm256_blendv_epi8(src.lo, a.lo, m.lo), _mm256_blendv_epi8(src.hi, a.hi, m.hi)};
}
QK_INLINE __mmask16 qk_cmpeq_epi32_mask(qk_m512i a, qk_m512i b) {
  return qk_mask_of(_mm256_castsi256_ps(_mm256_cmpeq_epi32(a.lo, b.lo)), _mm256_castsi256_ps(_mm256_cmpeq_epi32(a.hi, b.hi)));
}
QK_INLINE int qk_reduce_add_epi32(qk_m512i a) {
  const __m256i h = _mm256_add_epi32(a.hi, a.lo);
  __m128i t = _mm_add_epi32(_mm256_extracti128_si256(h, 1), _mm256_castsi256_si128(h));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(t);
}
QK_INLINE long long qk_reduce_or_epi64(qk_m512i a) {
  const __m256i h = _mm256_or_si256(a.hi, a.lo);
  const __m128i t = _mm_or_si128(_mm256_extracti128_si256(h, 1), _mm256_castsi256_si128(h));
  return _mm_cvtsi128_si64(_mm_or_si128(t, _mm_unpackhi_epi64(t, t)));
}
// Any permutation of 32 16-bit lanes (vpermw): through memory, as AVX2 has no 16-bit permute.
// u8 x s8 in groups of 4, summed into int32 lanes (vpdpbusd), exact: the bytes are widened to 16 bits
// (vpmaddubsw would saturate at codes above 127).
QK_INLINE __m256i qk_dpbusd8(__m256i acc, __m256i u, __m256i s) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  const __m256i low = _mm256_set1_epi16(0x00ff);
  const __m256i u_even = _mm256_and_si256(u, low), u_odd = _mm256_srli_epi16(u, 8);
  const __m256i s_even = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), s_odd = _mm256_srai_epi16(s, 8);
  return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(u_even, s_even), _mm256_madd_epi16(u_odd, s_odd)));
#endif
}
QK_INLINE qk_m512i qk_dpbusd_epi32(qk_m512i acc, qk_m512i u, qk_m512i s) {
  return {qk_dpbusd8(acc.lo, u.lo, s.lo), qk_dpbusd8(acc.hi, u.hi, s.hi)};
}

// --- the renames -----------------------------------------------------------------------------------------

#define _mm512_set1_ps qk_set1_ps
#define _mm512_setzero_ps qk_setzero_ps
#define _mm512_loadu_ps qk_loadu_ps
#define _mm512_storeu_ps qk_storeu_ps
#define _mm512_store_ps qk_storeu_ps
#define _mm512_maskz_loadu_ps qk_maskz_loadu_ps
#define _mm512_mask_storeu_ps qk_mask_storeu_ps
#define _mm512_add_ps qk_add_ps
#define _mm512_sub_ps qk_sub_ps
#define _mm512_mul_ps qk_mul_ps
#define _mm512_div_ps qk_div_ps
#define _mm512_max_ps qk_max_ps
#define _mm512_fmadd_ps qk_fmadd_ps
#define _mm512_fnmadd_ps qk_fnmadd_ps
#define _mm512_abs_ps qk_abs_ps
#define _mm512_mask_mov_ps qk_mask_mov_ps
#define _mm512_maskz_mov_ps qk_maskz_mov_ps
#define _mm512_mask_max_ps qk_mask_max_ps
#define _mm512_cmp_ps_mask(a, b, p) qk_cmp_ps_mask<(p)>((a), (b))
#define _mm512_unpacklo_ps qk_unpacklo_ps
#define _mm512_unpackhi_ps qk_unpackhi_ps
#define _mm512_shuffle_f32x4(a, b, imm) qk_shuffle_f32x4<(imm)>((a), (b))
#define _mm512_roundscale_ps(a, imm) qk_roundscale_ps<(imm)>(a)
#define _mm512_scalef_ps qk_scalef_ps
#define _mm512_reduce_add_ps qk_reduce_add_ps
#define _mm512_reduce_max_ps qk_reduce_max_ps
#define _mm512_cvtneps_pbh qk_cvtneps_pbh
#define _mm512_cvtph_ps qk_cvtph_ps
#define _mm512_dpbf16_ps qk_dpbf16_ps
#define _mm512_setzero_pd qk_setzero_pd
#define _mm512_add_pd qk_add_pd
#define _mm512_fmadd_pd qk_fmadd_pd
#define _mm512_cvtps_pd qk_cvtps_pd
#define _mm512_unpacklo_pd qk_unpacklo_pd
#define _mm512_unpackhi_pd qk_unpackhi_pd
#define _mm512_reduce_add_pd qk_reduce_add_pd
#define _mm512_castsi512_ps qk_castsi512_ps
#define _mm512_castps_si512 qk_castps_si512
#define _mm512_castps_pd qk_castps_pd
#define _mm512_castpd_ps qk_castpd_ps
#define _mm512_castps512_ps256 qk_castps512_ps256
#define _mm512_castsi512_si256 qk_castsi512_si256
#define _mm512_extractf64x4_pd qk_extractf64x4_pd
#define _mm512_extracti64x4_epi64 qk_extracti64x4_epi64
#define _mm512_setzero_si512 qk_setzero_si512
#define _mm512_set1_epi32 qk_set1_epi32
#define _mm512_set1_epi8 qk_set1_epi8
#define _mm512_setr_epi32 qk_setr_epi32
#define _mm512_loadu_si512 qk_loadu_si512
#define _mm512_store_si512 qk_storeu_si512
#define _mm512_maskz_loadu_epi32 qk_maskz_loadu_epi32
#define _mm512_maskz_loadu_epi16 qk_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16 qk256_maskz_loadu_epi16
#define _mm256_mask_storeu_epi16 qk256_mask_storeu_epi16
#define _mm512_add_epi32 qk_add_epi32
#define _mm512_and_si512 qk_and_si512
#define _mm512_xor_si512 qk_xor_si512
#define _mm512_slli_epi32 qk_slli_epi32
#define _mm512_srli_epi16 qk_srli_epi16
#define _mm512_unpacklo_epi16 qk_unpacklo_epi16
#define _mm512_unpackhi_epi16 qk_unpackhi_epi16
#define _mm512_cvtps_epi32 qk_cvtps_epi32
#define _mm512_cvtepi32_ps qk_cvtepi32_ps
#define _mm512_cvtepu16_epi32 qk_cvtepu16_epi32
#define _mm512_cvtsepi32_epi8 qk_cvtsepi32_epi8
#define _mm512_mask_mov_epi32 qk_mask_mov_epi32
#define _mm512_cmpeq_epi32_mask qk_cmpeq_epi32_mask
#define _mm512_reduce_add_epi32 qk_reduce_add_epi32
#define _mm512_reduce_or_epi64 qk_reduce_or_epi64
#define _mm512_dpbusd_epi32 qk_dpbusd_epi32
