// int_activations.h: integer weights x int8 activations: the activations' quantization.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// int8 / int4 weights x int8 activations (VNNI u8 x s8 -> s32)
//
// Weights are stored in tiles of 16 output rows, "N-major": one 64-byte vector holds 4 consecutive
// inputs of each of the 16 rows (int8), or 8 of them as nibbles (int4). A dot product instruction then
// advances 16 rows at once against 4 broadcast activation bytes, the int32 sums of a block of 32 inputs
// need no horizontal reduction, and each tile is one sequential stream through memory.

// Activations quantized per row in blocks of 32, laid out for the tile passes: rows go in passes of
// `pass` rows (1, 2, 4 or 8), and within a pass every value is interleaved across its rows (the 4 int8
// codes of inputs 4j..4j+3 of each row side by side, then the next 4 inputs), so one pointer and
// constant offsets reach all of a pass's broadcasts.
struct QuantizedRows {
  int64_t rows = 0, pass = 0, K = 0, groups = 0;
  std::vector<int32_t> q;       // (rows / pass, K / 4, pass): 4 int8 codes each
  std::vector<float> scale;     // (rows / pass, K / 32, pass)
  std::vector<int32_t> start;   // (rows / pass, K / 32, pass): -zero_point * sum(q of the block), the dot's start
  std::vector<float> gsum;      // (rows / pass, groups, pass): sum of the dequantized x over each weight group
  std::vector<int32_t> half;    // (rows / pass, K / 32, pass): -zero_point * sum(q) of each block's first 16
  // Index of row m's entry i of a per-row table with `per_row` entries per row.
  int64_t at(int64_t m, int64_t i, int64_t per_row) const { return ((m / pass) * per_row + i) * pass + m % pass; }
};

// What x holds per row as the integer tiles read it: its codes, block scales, starts and halves, group sums.
inline int64_t int_row_bytes(const QuantizedRows& qr) { return qr.K + qr.K / 32 * 16 + qr.groups * 4; }

// Rows per task of the small row-wise ops: `values` a task (a few thousand), so a 16-row step of a wide
// layer splits across the threads while a small one stays on the calling thread (a fork costs about a us).
inline int64_t row_grain(int64_t per_row, int64_t values = 8192) {
  return std::max<int64_t>(1, values / std::max<int64_t>(1, per_row));
}

// The calling thread's buffers, kept between calls: a decode step quantizes four inputs per layer.
QuantizedRows& thread_rows() {
  thread_local QuantizedRows qr;
  return qr;
}

// Lane r of the result = the largest of a[r]'s 8 lanes (max8_ps) or their sum (sum8_epi32): a transpose
// tree as attn_sum16's (pairs, then 64-bit pairs, then 128-bit halves), 21 instructions for 8 reductions
// instead of 8 dependent chains of 6 that each end in a scalar.
inline __m256 max8_ps(const __m256 (&a)[8]) {
  __m256 t[4], u[2];
  for (int i = 0; i < 4; ++i)
    t[i] = _mm256_max_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i) {
    const __m256d x = _mm256_castps_pd(t[2 * i]), y = _mm256_castps_pd(t[2 * i + 1]);
    u[i] = _mm256_max_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return _mm256_max_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

inline __m256i sum8_epi32(const __m256i (&a)[8]) {
  __m256i t[4], u[2];
  for (int i = 0; i < 4; ++i)
    t[i] = _mm256_add_epi32(_mm256_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    u[i] = _mm256_add_epi32(_mm256_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm256_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(u[0], u[1], 0x20), _mm256_permute2x128_si256(u[0], u[1], 0x31));
}

// 8 x 8 int32 transposed in place: a[r] lane j -> a[j] lane r.
inline void transpose8_epi32(__m256i (&a)[8]) {
  __m256i t[8], u[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(a[2 * i], a[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(a[2 * i], a[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    a[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
    a[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
  }
}

// Block b (32 inputs) of a whole pass of 8 rows, rows[r] (nullptr: a padding row, all zeros), rounded
// with the arithmetic of quantize_rows' one-row loop, but 8 rows at a time: the 8 maxima and code sums
// reduced together, the codes transposed into the pass's interleaved order and stored whole. q: the
// pass's block (8 x 8 int32 entries), scale/start: its 8 entries, gsum: the 8 entries of its group.
template <typename T>
inline void quantize_block8(const T* const (&rows)[8], int64_t b, int64_t zero_point, int32_t* q, float* scale,
                            int32_t* start, float* gsum, int32_t* half) {
  __m512 v0[8], v1[8];
  __m256 mx[8];
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) {
    if (rows[r] == nullptr) {
      v0[r] = v1[r] = _mm512_setzero_ps();
    } else if constexpr (std::is_same_v<T, float>) {
      v0[r] = _mm512_loadu_ps(rows[r] + b * 32);
      v1[r] = _mm512_loadu_ps(rows[r] + b * 32 + 16);
    } else {
      v0[r] = load_bf16_as_f32(reinterpret_cast<const uint16_t*>(rows[r]) + b * 32);
      v1[r] = load_bf16_as_f32(reinterpret_cast<const uint16_t*>(rows[r]) + b * 32 + 16);
    }
    const __m512 m = _mm512_max_ps(_mm512_abs_ps(v0[r]), _mm512_abs_ps(v1[r]));
    mx[r] = _mm256_max_ps(_mm512_castps512_ps256(m), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(m), 1)));
  }
  const __m256 amax = max8_ps(mx);
  const __m256 d = _mm256_div_ps(amax, _mm256_set1_ps(127.f));
  const __m256 inv = _mm256_blendv_ps(_mm256_setzero_ps(), _mm256_div_ps(_mm256_set1_ps(127.f), amax),
                                      _mm256_cmp_ps(amax, _mm256_setzero_ps(), _CMP_GT_OQ));
  alignas(32) float id[8];
  _mm256_store_ps(id, inv);
  __m256i codes[8], sums[8], firsts[8];
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) {
    const __m512 iv = _mm512_set1_ps(id[r]);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0[r], iv));  // round to nearest even
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1[r], iv));
    codes[r] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtsepi32_epi8(q0)), _mm512_cvtsepi32_epi8(q1), 1);
    const __m512i qs = _mm512_add_epi32(q0, q1);
    sums[r] = _mm256_add_epi32(_mm512_castsi512_si256(qs), _mm512_extracti64x4_epi64(qs, 1));
    if (half != nullptr) firsts[r] = _mm256_add_epi32(_mm512_castsi512_si256(q0), _mm512_extracti64x4_epi64(q0, 1));
  }
  if (half != nullptr)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(half),
                        _mm256_mullo_epi32(_mm256_set1_epi32(-static_cast<int32_t>(zero_point)), sum8_epi32(firsts)));
  transpose8_epi32(codes);  // codes[j]: the 4 codes of inputs 4j..4j+3 of each row
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j * 8), codes[j]);
  const __m256i qsum = sum8_epi32(sums);
  _mm256_storeu_ps(scale, d);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(start),
                      _mm256_mullo_epi32(_mm256_set1_epi32(-static_cast<int32_t>(zero_point)), qsum));
  _mm256_storeu_ps(gsum, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(qsum), _mm256_loadu_ps(gsum)));
}

// halves: also each block's sum over its first 16 inputs (qr.half), for weights with sub-blocks of 16.
template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t padded_rows, int64_t K, int64_t group_size,
                   int64_t zero_point, QuantizedRows& qr, bool halves = false) {
  const int64_t blocks = K / 32;
  qr.rows = padded_rows;
  qr.pass = std::min<int64_t>(padded_rows, kMaxMT);
  qr.K = K;
  qr.groups = K / group_size;
  const int64_t P = qr.pass, blocks_per_group = group_size / 32;
  auto fit = [](auto& v, int64_t n) { if (static_cast<int64_t>(v.size()) < n) v.resize(n); };
  fit(qr.q, padded_rows * K / 4);
  fit(qr.scale, padded_rows * blocks);
  fit(qr.start, padded_rows * blocks);
  fit(qr.gsum, padded_rows * qr.groups);
  if (halves) fit(qr.half, padded_rows * blocks);
  std::fill(qr.gsum.begin(), qr.gsum.begin() + padded_rows * qr.groups, 0.f);
  // The padding rows are zeros: written here for passes of 1-4 rows; quantize_block8 writes a pass of 8's.
  for (int64_t m = P == 8 ? padded_rows : rows; m < padded_rows; ++m) {
    for (int64_t j = 0; j < K / 4; ++j) qr.q[qr.at(m, j, K / 4)] = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      qr.scale[qr.at(m, b, blocks)] = 0.f, qr.start[qr.at(m, b, blocks)] = 0;
      if (halves) qr.half[qr.at(m, b, blocks)] = 0;
    }
  }
  // Tasks are (pass, run of whole weight groups): a pass's rows are interleaved 4 bytes apart, so
  // threads splitting one pass's rows wrote into the same cache lines (at 8 rows, a K=4608 input took
  // 48 us instead of 13). A few thousand values a task; one row of a small layer stays on this thread.
  const int64_t passes = (rows + P - 1) / P;
  const int64_t groups_per_task = std::max<int64_t>(1, 8192 / (P * group_size));
  const int64_t runs = (qr.groups + groups_per_task - 1) / groups_per_task;
  parallel_for(0, passes * runs, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) int8_t codes[32];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pass = t / runs, g0 = (t % runs) * groups_per_task;
      const int64_t g1 = std::min(qr.groups, g0 + groups_per_task);
      if (P == 8) {  // a whole pass at once (quantize_block8); its padding rows read as zeros
        const T* rowp[8];
        for (int64_t r = 0; r < 8; ++r) rowp[r] = pass * 8 + r < rows ? x + (pass * 8 + r) * K : nullptr;
        for (int64_t g = g0; g < g1; ++g)
          for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b)
            quantize_block8(rowp, b, zero_point, qr.q.data() + (pass * (K / 4) + b * 8) * 8,
                            qr.scale.data() + (pass * blocks + b) * 8, qr.start.data() + (pass * blocks + b) * 8,
                            qr.gsum.data() + (pass * qr.groups + g) * 8,
                            halves ? qr.half.data() + (pass * blocks + b) * 8 : nullptr);
        continue;
      }
      for (int64_t m = pass * P; m < std::min(rows, pass * P + P); ++m) {
        int32_t* qm = qr.q.data() + qr.at(m, 0, K / 4);  // row m's entry j is at [j * P]
        float* sm = qr.scale.data() + qr.at(m, 0, blocks);
        int32_t* startm = qr.start.data() + qr.at(m, 0, blocks);
        float* gm = qr.gsum.data() + qr.at(m, 0, qr.groups);
        for (int64_t g = g0; g < g1; ++g) {
          for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
            const T* p = x + m * K + b * 32;
            __m512 v0, v1;
            if constexpr (std::is_same_v<T, float>) {
              v0 = _mm512_loadu_ps(p);
              v1 = _mm512_loadu_ps(p + 16);
            } else {
              v0 = load_bf16_as_f32(reinterpret_cast<const uint16_t*>(p));
              v1 = load_bf16_as_f32(reinterpret_cast<const uint16_t*>(p) + 16);
            }
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float d = amax / 127.f;
            const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));  // round to nearest even
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
            _mm_store_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtsepi32_epi8(q0));
            _mm_store_si128(reinterpret_cast<__m128i*>(codes + 16), _mm512_cvtsepi32_epi8(q1));
            for (int64_t j = 0; j < 8; ++j) std::memcpy(qm + (b * 8 + j) * P, codes + 4 * j, 4);
            const int32_t qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            sm[b * P] = d;
            startm[b * P] = -static_cast<int32_t>(zero_point) * qsum;  // (c - z).q = c.q - z * sum(q)
            if (halves) qr.half[qr.at(m, b, blocks)] = -static_cast<int32_t>(zero_point) * _mm512_reduce_add_epi32(q0);
            gm[g * P] = std::fma(d, static_cast<float>(qsum), gm[g * P]);  // as quantize_block8's FMA
          }
        }
      }
    }
  });
}

template <typename S>
inline __m512 load16_f32(const S* p);
template <>
inline __m512 load16_f32<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16_f32<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// acc += w (u8) . the 4 int8 codes at p broadcast to every lane (s8), the broadcast folded into the
// instruction (compilers emit a separate broadcast for the intrinsics' set1).
inline __m512i dpbusd_bcast(__m512i acc, __m512i w, const int32_t* p) {
#ifdef __AVX512F__
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*p));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(*p));
#endif
}
