// decode_attention.h: decode attention, flash-decoding style.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// Decode attention, flash-decoding style: each row's keys are cut into chunks of kAttnChunk (boundaries
// a function of that row's own key count only), each (row, KV head, chunk) is an independent partial
// softmax (max, sum, weighted values) for all G query heads sharing that KV head, and the partials are
// combined in chunk order. A row's arithmetic is thus the same alone or in any batch, on any number of
// threads, and run to run.

constexpr int64_t kAttnChunk = 128;  // keys per partial softmax
constexpr int kAttnHeads = 8;        // query heads accumulated together in one pass over the values

// attn_partial's scratch, in floats: the G heads' scores, then their bf16 weights.
inline int64_t attn_scratch_floats(int64_t G) { return G * kAttnChunk + G * kAttnChunk / 2; }

// Lane i of the result = r[i]'s 16 lanes combined by op (an add or a max): 16 horizontal reductions by a
// transpose tree (45 instructions for 16 results instead of 16 full horizontal reductions).
template <typename Op>
inline __m512 lanes16(const __m512 (&r)[16], Op op) {
  __m512 t[8], u[4], w[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // 128-bit lane: [r2i, r2i+1, r2i, r2i+1] partials
    t[i] = op(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]), _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // 128-bit lane: [r4i .. r4i+3] partials
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = op(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: [r8i..8i+3, same, r8i+4..8i+7, same]
    w[i] = op(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
              _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return op(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
            _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

inline __m512 attn_sum16(const __m512 (&r)[16]) {
  return lanes16(r, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); });
}

// q . k in 16 lanes of partial sums, by bf16 pair products (exact in fp32). qv: the query in pieces of
// 32 (the last one zero-padded when D % 32 == 16); NQ = D / 16, or 0 for a head dim known only at run time.
template <int NQ>
inline __m512 attn_dot(const __m512i* qv, const uint16_t* k, int64_t nq) {
  const int64_t n = NQ > 0 ? NQ : nq;
  __m512 a = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int64_t i = 0; i < n / 2; ++i)
    a = _mm512_dpbf16_ps(a, (__m512bh)qv[i], (__m512bh)_mm512_loadu_si512(k + 32 * i));
  if (n % 2)
    a = _mm512_dpbf16_ps(a, (__m512bh)qv[n / 2], (__m512bh)_mm512_maskz_loadu_epi16(0xffff, k + 32 * (n / 2)));
  return a;
}

// Prefetches the `bytes` of a key or value row (into L1 for T0, L2 for T1).
template <_mm_hint HINT>
inline void attn_prefetch_row(const uint16_t* row, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + o, HINT);
}

// The scores' prefetches: every key of the chunk but the first 16 into L2 up front (the gather table says
// where they are; scattered blocks defeat the hardware prefetchers), then at each 16 keys from j0 the next
// 16 keys into L1 and these 16 keys' values into L2. Always inlined, so the callers' constant head dims
// unroll the row loops (called, the 7-head scores ran 15% slower).
__attribute__((always_inline)) inline void attn_prefetch_keys(const uint16_t* const* krows, int64_t count, int64_t D) {
  for (int64_t j = 16; j < count; ++j) attn_prefetch_row<_MM_HINT_T1>(krows[j], 2 * D);
}
__attribute__((always_inline)) inline void attn_prefetch_next(const uint16_t* const* krows,
                                                              const uint16_t* const* vrows, int64_t j0, int64_t count,
                                                              int64_t D) {
  for (int64_t j = j0 + 16; j < std::min<int64_t>(count, j0 + 32); ++j) attn_prefetch_row<_MM_HINT_T0>(krows[j], 2 * D);
  for (int64_t j = j0; j < std::min<int64_t>(count, j0 + 16); ++j) attn_prefetch_row<_MM_HINT_T1>(vrows[j], 2 * D);
}

// Scaled scores of `count` keys (rows krows) for G query heads (qh, G x D) into sc[g * kAttnChunk + j]:
// 16 keys at a time, each read from memory once for all G heads (and kept in L1 while they are scored),
// prefetched as attn_prefetch_keys / attn_prefetch_next say.
template <int NQ>
void attn_scores(const uint16_t* qh, int64_t G, int64_t D, const uint16_t* const* krows,
                 const uint16_t* const* vrows, int64_t count, float scale, float* sc) {
  const int64_t nq = D / 16;
  constexpr int kMaxPieces = NQ > 0 ? (NQ + 1) / 2 : 1;
  std::vector<__m512i> qbuf(NQ > 0 ? 0 : (nq + 1) / 2);
  __m512i qfixed[kMaxPieces];
  __m512i* qv = NQ > 0 ? qfixed : qbuf.data();
  const __m512 sv = _mm512_set1_ps(scale);
  attn_prefetch_keys(krows, count, D);
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    attn_prefetch_next(krows, vrows, j0, count, D);
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* q = qh + g * D;
      for (int64_t i = 0; i < nq / 2; ++i) qv[i] = _mm512_loadu_si512(q + 32 * i);
      if (nq % 2) qv[nq / 2] = _mm512_maskz_loadu_epi16(0xffff, q + 32 * (nq / 2));
      __m512 r[16];
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj)  // keys past the end score the first key again; masked later
        r[jj] = attn_dot<NQ>(qv, krows[j0 + jj < count ? j0 + jj : 0], nq);
      _mm512_storeu_ps(sc + g * kAttnChunk + j0, _mm512_mul_ps(attn_sum16(r), sv));
    }
  }
}

// r[i] <- column i of the 16 x 16 matrix of 32-bit elements whose rows are r[0..15] (4 stages of 16
// shuffles; unpacks within 128-bit lanes, then whole lanes).
inline void transpose16(__m512 (&r)[16]) {
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {  // lane L: rows i, i+1 at columns 4L, 4L+1 | 4L+2, 4L+3
    const __m512 a = _mm512_unpacklo_ps(r[i], r[i + 1]), b = _mm512_unpackhi_ps(r[i], r[i + 1]);
    r[i] = a, r[i + 1] = b;
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {  // r[i + k], lane L: column 4L + k of rows i..i+3
    const __m512d t0 = _mm512_castps_pd(r[i]), t1 = _mm512_castps_pd(r[i + 1]);
    const __m512d t2 = _mm512_castps_pd(r[i + 2]), t3 = _mm512_castps_pd(r[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2)), r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3)), r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {  // column 4L + k: lane L of r[k], r[4 + k], r[8 + k], r[12 + k]
    const __m512 a02 = _mm512_shuffle_f32x4(r[k], r[4 + k], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 a13 = _mm512_shuffle_f32x4(r[k], r[4 + k], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512 b02 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 b13 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], _MM_SHUFFLE(3, 1, 3, 1));
    r[k] = _mm512_shuffle_f32x4(a02, b02, _MM_SHUFFLE(2, 0, 2, 0));
    r[8 + k] = _mm512_shuffle_f32x4(a02, b02, _MM_SHUFFLE(3, 1, 3, 1));
    r[4 + k] = _mm512_shuffle_f32x4(a13, b13, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + k] = _mm512_shuffle_f32x4(a13, b13, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// attn_scores for GH query heads (4..8) and head dim 32 * NB: each 16 keys' 16 x (D / 2) bf16 pairs
// transposed once (64 shuffles per 16 pairs), then every head's scores accumulate in key-wide lanes, one
// vdpbf16ps per pair with the head's query pair broadcast: no per-head horizontal sums (45 instructions
// per head and 16 keys, and a dependent tail the out-of-order window could not hide at 7 heads).
template <int GH, int NB>
void attn_scores_t(const uint16_t* qh, const uint16_t* const* krows, const uint16_t* const* vrows, int64_t count,
                   float scale, float* sc) {
  constexpr int64_t D = 32 * NB;
  const __m512 sv = _mm512_set1_ps(scale);
  attn_prefetch_keys(krows, count, D);
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    attn_prefetch_next(krows, vrows, j0, count, D);
    __m512 acc[GH];
#pragma GCC unroll 8
    for (int g = 0; g < GH; ++g) acc[g] = _mm512_setzero_ps();
    for (int b = 0; b < NB; ++b) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj)  // keys past the end score the first key again; masked later
        r[jj] = _mm512_loadu_ps(krows[j0 + jj < count ? j0 + jj : 0] + 32 * b);
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const __m512bh k = (__m512bh)_mm512_castps_si512(r[i]);
#pragma GCC unroll 8
        for (int g = 0; g < GH; ++g) {
          int32_t pair;
          std::memcpy(&pair, qh + g * D + 32 * b + 2 * i, 4);
          acc[g] = _mm512_dpbf16_ps(acc[g], k, (__m512bh)_mm512_set1_epi32(pair));
        }
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < GH; ++g) _mm512_storeu_ps(sc + g * kAttnChunk + j0, _mm512_mul_ps(acc[g], sv));
  }
}

// attn_scores_t for G = GH heads (head dim 64) where it was measured faster; else false. Its transposes
// (128 shuffles per 16 keys) cost less than the G heads' horizontal sums (45 each) from 3 heads on, but
// with the keys streaming from memory it only gains from 4 (Zen 4, 2026-12-05, 8 rows of 640 keys a call,
// 24-30 layers' pools in turn: 4 heads 6-10% faster, 5 heads 10%, 7 heads 15%, 8 heads 20%; 3 heads 15-25%
// slower, as were 6 and 7 heads of 128, by 4-7%, though all faster from cache). Only where vdpbf16ps is the
// CPU's own: the avx2 build (its products written on FMAs) ran 3-4% slower with it.
inline bool attn_scores_t_heads(int64_t G, const uint16_t* qh, const uint16_t* const* krows,
                                const uint16_t* const* vrows, int64_t count, float scale, float* sc) {
#ifdef __AVX512BF16__
  constexpr int NB = 2;
  switch (G) {
    case 4: attn_scores_t<4, NB>(qh, krows, vrows, count, scale, sc); return true;
    case 5: attn_scores_t<5, NB>(qh, krows, vrows, count, scale, sc); return true;
    case 6: attn_scores_t<6, NB>(qh, krows, vrows, count, scale, sc); return true;
    case 7: attn_scores_t<7, NB>(qh, krows, vrows, count, scale, sc); return true;
    case 8: attn_scores_t<8, NB>(qh, krows, vrows, count, scale, sc); return true;
    default: return false;
  }
#else
  return false;
#endif
}

// acc[g * D + d0 + i] = sum_j p[g * kAttnChunk + j] * v_j[d0 + i] for GH heads over NP pieces of 32 dims
// from d0 (the last one 16 wide where D ends there), the weights p in bf16 as torch's flash attention
// rounds them for its P @ V: two keys a vdpbf16ps, their values interleaved by one unpack per 32 dims, so
// half the multiply-adds of one key at a time in fp32, which took a third of the kernel's time at 7 heads a
// KV head (Zen 4, 2026-12-05: the kernel 5-9% faster for 8 rows of 40-640 keys, 2-3% at head dim 128).
// The unpacks leave each 128-bit lane's dims 0-3 in `lo` and 4-7 in `hi`, put back in order at the end.
template <int GH, int NP>
void attn_values(const uint16_t* p, const uint16_t* const* vrows, int64_t count, int64_t d0, int64_t D, float* acc) {
  const bool half_last = d0 + 32 * NP > D;
  const __mmask32 last_mask = half_last ? 0xffffu : 0xffffffffu;
  __m512 lo[GH][NP], hi[GH][NP];
#pragma GCC unroll 8
  for (int g = 0; g < GH; ++g)
#pragma GCC unroll 2
    for (int i = 0; i < NP; ++i) lo[g][i] = hi[g][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; j += 2) {  // an odd count's last pair: its own values twice, weight 0
    const uint16_t* va = vrows[j] + d0;
    const uint16_t* vb = (j + 1 < count ? vrows[j + 1] : vrows[j]) + d0;
    __m512i l[NP], h[NP];
#pragma GCC unroll 2
    for (int i = 0; i < NP; ++i) {
      const __mmask32 m = i == NP - 1 ? last_mask : 0xffffffffu;
      const __m512i a = _mm512_maskz_loadu_epi16(m, va + 32 * i), b = _mm512_maskz_loadu_epi16(m, vb + 32 * i);
      l[i] = _mm512_unpacklo_epi16(a, b);
      h[i] = _mm512_unpackhi_epi16(a, b);
    }
#pragma GCC unroll 8
    for (int g = 0; g < GH; ++g) {
      int32_t pair;  // p[j] in the low half, p[j + 1] in the high, as the unpacks pair the values
      std::memcpy(&pair, p + g * kAttnChunk + j, 4);
      const __m512bh w = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 2
      for (int i = 0; i < NP; ++i) {
        lo[g][i] = _mm512_dpbf16_ps(lo[g][i], (__m512bh)l[i], w);
        hi[g][i] = _mm512_dpbf16_ps(hi[g][i], (__m512bh)h[i], w);
      }
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GH; ++g)
#pragma GCC unroll 2
    for (int i = 0; i < NP; ++i) {  // lanes [lo0 lo1 hi0 hi1] -> [lo0 hi0 lo1 hi1]: dims 0-15, then 16-31
      float* out = acc + g * D + d0 + 32 * i;
      const __m512 first = _mm512_shuffle_f32x4(lo[g][i], hi[g][i], _MM_SHUFFLE(1, 0, 1, 0));
      _mm512_storeu_ps(out, _mm512_shuffle_f32x4(first, first, _MM_SHUFFLE(3, 1, 2, 0)));
      if (i == NP - 1 && half_last) continue;
      const __m512 second = _mm512_shuffle_f32x4(lo[g][i], hi[g][i], _MM_SHUFFLE(3, 2, 3, 2));
      _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(second, second, _MM_SHUFFLE(3, 1, 2, 0)));
    }
}

template <int NP>
void attn_values_heads(int64_t gh, const uint16_t* p, const uint16_t* const* vrows, int64_t count, int64_t d0,
                       int64_t D, float* acc) {
  switch (gh) {
    case 1: attn_values<1, NP>(p, vrows, count, d0, D, acc); break;
    case 2: attn_values<2, NP>(p, vrows, count, d0, D, acc); break;
    case 3: attn_values<3, NP>(p, vrows, count, d0, D, acc); break;
    case 4: attn_values<4, NP>(p, vrows, count, d0, D, acc); break;
    case 5: attn_values<5, NP>(p, vrows, count, d0, D, acc); break;
    case 6: attn_values<6, NP>(p, vrows, count, d0, D, acc); break;
    case 7: attn_values<7, NP>(p, vrows, count, d0, D, acc); break;
    default: attn_values<8, NP>(p, vrows, count, d0, D, acc); break;
  }
}

// One partial softmax: `count` keys (rows krows / vrows) against the G query heads at qh. Writes, per
// head g, the scores' max m[g], sum[g] = sum_j e^(s_j - m), and acc[g * D ..] = sum_j e^(s_j - m) v_j
// (the weights rounded to bf16 there, the sum of them unrounded, as torch's flash attention).
// sc: scratch of attn_scratch_floats(G) floats.
void attn_partial(const uint16_t* qh, int64_t G, int64_t D, const uint16_t* const* krows,
                  const uint16_t* const* vrows, int64_t count, float scale, float* sc, float* m, float* sum,
                  float* acc) {
  uint16_t* pb = reinterpret_cast<uint16_t*>(sc + G * kAttnChunk);  // the bf16 weights, G x kAttnChunk
  const bool transposed = D == 64 && attn_scores_t_heads(G, qh, krows, vrows, count, scale, sc);
  if (!transposed) switch (D / 16) {
    case 1: attn_scores<1>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 2: attn_scores<2>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 3: attn_scores<3>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 4: attn_scores<4>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 5: attn_scores<5>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 6: attn_scores<6>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 7: attn_scores<7>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 8: attn_scores<8>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 16: attn_scores<16>(qh, G, D, krows, vrows, count, scale, sc); break;
    default: attn_scores<0>(qh, G, D, krows, vrows, count, scale, sc); break;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = sc + g * kAttnChunk;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < count; j += 16) mx = _mm512_mask_max_ps(mx, tail_mask16(count - j), mx, _mm512_loadu_ps(s + j));
    const float mg = _mm512_reduce_max_ps(mx);
    const __m512 mv = _mm512_set1_ps(mg);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < count; j += 16) {  // keys past the end get weight 0 (an odd count's pair partner)
      const __m512 e = _mm512_maskz_mov_ps(tail_mask16(count - j), exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv)));
      store_bf16(pb + g * kAttnChunk + j, e);
      total = _mm512_add_ps(total, e);
    }
    m[g] = mg;
    sum[g] = _mm512_reduce_add_ps(total);
  }
  for (int64_t g0 = 0; g0 < G; g0 += kAttnHeads) {
    const int64_t gh = std::min<int64_t>(kAttnHeads, G - g0);
    const uint16_t* p = pb + g0 * kAttnChunk;
    float* a = acc + g0 * D;
    int64_t d0 = 0;
    if (gh <= 5)  // 4 accumulators per head still fit the registers: fewer passes over the values
      for (; d0 + 64 <= D; d0 += 64) attn_values_heads<2>(gh, p, vrows, count, d0, D, a);
    for (; d0 < D; d0 += 32) attn_values_heads<1>(gh, p, vrows, count, d0, D, a);
  }
}

// Combines one (row, KV head)'s partial softmaxes (each m[G], sum[G], acc[G * D], `stride` floats
// apart) in chunk order: rescaled to the common max, summed, divided; out: the G heads' bf16 rows.
void attn_combine(const float* part, int64_t chunks, int64_t stride, int64_t G, int64_t D, uint16_t* out) {
  float few[16];  // a context of up to 2048 keys: no allocation
  std::vector<float> many(chunks > 16 ? chunks : 0);
  float* coef = chunks > 16 ? many.data() : few;
  for (int64_t g = 0; g < G; ++g) {
    float mx = -INFINITY, total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, part[c * stride + g]);
    for (int64_t c = 0; c < chunks; ++c) {
      coef[c] = std::exp(part[c * stride + g] - mx);
      total += coef[c] * part[c * stride + G + g];
    }
    const __m512 inv = _mm512_set1_ps(1.f / total);
    for (int64_t d = 0; d < D; d += 16) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c)
        a = _mm512_fmadd_ps(_mm512_set1_ps(coef[c]), _mm512_loadu_ps(part + c * stride + 2 * G + g * D + d), a);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * D + d), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(a, inv)));
    }
  }
}

// One query per row over its keys in the paged KV pool, read in place: q (B, H, D), k/v pools
// (slots, Hkv, D), gather (B, S) slot of each key, positions (B,): row b sees keys 0..positions[b].
// Query head i reads KV head i / (H / Hkv) (grouped-query attention). fp32 softmax and sums, bf16 out.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& gather,
                            const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && kc.scalar_type() == at::kBFloat16 && vc.scalar_type() == at::kBFloat16,
              "qwenkit decode_attention: q and the pools must be bfloat16");
  TORCH_CHECK(q.dim() == 3 && kc.dim() == 3 && vc.sizes() == kc.sizes() && kc.is_contiguous() && vc.is_contiguous(),
              "qwenkit decode_attention: q (B, H, D), contiguous pools (slots, Hkv, D)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = kc.size(1), slots = kc.size(0);
  TORCH_CHECK(kc.size(2) == D && Hkv > 0 && H % Hkv == 0 && D % 16 == 0 && D > 0,
              "qwenkit decode_attention: head shapes do not match");
  TORCH_CHECK(gather.scalar_type() == at::kLong && gather.dim() == 2 && gather.size(0) == B &&
                  positions.scalar_type() == at::kLong && positions.numel() == B,
              "qwenkit decode_attention: gather (B, S) and positions (B,) must be int64");
  const int64_t S = gather.size(1), G = H / Hkv;
  // a row's heads must be contiguous; rows may be apart (decode_layer's q: a view into the q/k/v rows)
  const at::Tensor qc = q.stride(2) == 1 && q.stride(1) == D ? q : q.contiguous();
  const int64_t q_row = qc.stride(0);
  // Rows may share one gather row (stride 0: a prompt chunk's queries, each its own row, all over the
  // chunk's keys), read in place rather than copied n times.
  const at::Tensor gc = gather.stride(1) == 1 ? gather : gather.contiguous(), pc = positions.contiguous();
  const int64_t* gp = gc.data_ptr<int64_t>();
  const int64_t* pp = pc.data_ptr<int64_t>();
  const int64_t g_row = gc.stride(0);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < S, "qwenkit decode_attention: position ", pp[b], " outside the ", S, " gathered keys");
  for (int64_t b = 0; b < (g_row == 0 ? std::min<int64_t>(B, 1) : B); ++b)
    for (int64_t j = 0; j < S; ++j)
      TORCH_CHECK(gp[b * g_row + j] >= 0 && gp[b * g_row + j] < slots, "qwenkit decode_attention: slot ",
                  gp[b * g_row + j], " outside the pool");
  at::Tensor out = at::empty({B, H, D}, q.options());
  if (B == 0 || H == 0) return out;
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(kc.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(vc.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());

  // Tasks (row, chunk, KV head), row-major; first[b] = the index of row b's first task. A chunk's first
  // task fetches its keys' and values' whole pool rows (every KV head's, side by side in the pool) into
  // L2 for the chunk's other heads, which then need not wait on memory each for its own slice: 2-3%
  // of the bundled model's 16-row step on the Zen 4 (adjacent steps alternated).
  std::vector<int64_t> first(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) first[b + 1] = first[b] + Hkv * ((pp[b] + kAttnChunk) / kAttnChunk);
  const int64_t tasks = first[B], stride = G * (D + 2);  // per task: m[G], sum[G], acc[G * D]
  std::vector<float> partial(tasks * stride);
  std::vector<std::atomic<int32_t>> done(B * Hkv);  // chunks finished per (row, KV head), zeroed
  parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> sc;  // a thread's scratch, kept: it runs several chunks a call
    thread_local std::vector<const uint16_t*> krows, vrows;
    sc.resize(attn_scratch_floats(G));
    krows.resize(kAttnChunk);
    vrows.resize(kAttnChunk);
    int64_t b = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[b + 1]) ++b;
      const int64_t chunks = (first[b + 1] - first[b]) / Hkv, c = (t - first[b]) / Hkv, h = (t - first[b]) % Hkv,
                    j0 = c * kAttnChunk, count = std::min<int64_t>(kAttnChunk, pp[b] + 1 - j0);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t row = gp[b * g_row + j0 + j] * Hkv * D;
        if (h == 0 && Hkv > 1) {
          attn_prefetch_row<_MM_HINT_T1>(kp + row, 2 * Hkv * D);
          attn_prefetch_row<_MM_HINT_T1>(vp + row, 2 * Hkv * D);
        }
        krows[j] = kp + row + h * D;
        vrows[j] = vp + row + h * D;
      }
      float* part = partial.data() + t * stride;
      attn_partial(qp + b * q_row + h * G * D, G, D, krows.data(), vrows.data(), count, float(scale), sc.data(), part,
                   part + G, part + 2 * G);
      // Whichever thread finishes a (row, KV head)'s last chunk combines them (the same arithmetic
      // whoever does it); acq_rel makes the other chunks' partials visible to it.
      if (done[b * Hkv + h].fetch_add(1, std::memory_order_acq_rel) + 1 == chunks)
        attn_combine(partial.data() + (first[b] + h) * stride, chunks, Hkv * stride, G, D, op + (b * H + h * G) * D);
    }
  });
  return out;
}
