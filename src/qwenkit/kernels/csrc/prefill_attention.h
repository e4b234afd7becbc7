// prefill_attention.h: a prompt chunk's causal attention on AMX, keys read from the paged pool.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// Flash attention for the n queries of a prompt chunk (positions start .. start + n - 1) over the keys
// 0 .. start + n - 1, wherever the block table put them in the pool. torch's CPU flash attention ran
// these at about 0.34 T multiply-adds a second on the Xeon (11 ms a layer for the 8th 512-token chunk of
// a 4k prompt, 55% of the chunk), after the engine had gathered the keys into a copy and built an
// additive mask that the kernel adds score by score.
//
// Here each KV head's keys and values are first laid out once per call as AMX B tiles (K transposed
// by 32-dim steps, V in key pairs), then each (KV head, block of 16 queries) is one task, taking every
// block of 128 keys through the G query heads that share it: scores by tdpbf16ps (16 queries x 16 keys
// x 32 dims an instruction), an online softmax over them in fp32 in powers of 2 (exp2_bf16: the
// probabilities are rounded to bf16 anyway), and the running output kept in fp32 and accumulated on AMX
// too. Blocks past a query block's last position are never computed; the diagonal block is masked lane
// by lane. A query's arithmetic depends only on its position and its keys, never on how the prompt was
// cut into chunks or what else the step holds (key blocks start at position 0): tested bit for bit.
// On the Xeon (2 cores), 512 queries of Qwen2.5-0.5B's heads after 3,584 cached keys: 6.35 ms against
// 11.42 ms for the engine's gather + SDPA; at head dim 128 1.2-1.6x (bench_prefill_attention.py,
// 2026-12-04). What bounds it there, and what did not help, is in docs/cpu-speed.md.

#if defined(__AVX512F__) && defined(__AVX512BF16__)  // the levels without AMX: torch's SDPA does it
constexpr int64_t kPrefillKeys = 128;  // keys per softmax step (8 score tiles of 16)

// K of one KV head as B tiles for Q . K^T: per 16 keys and 32-dim step, a 16 x 64-byte tile whose row p
// holds dims (2p, 2p + 1) of each of the 16 keys. V as B tiles for P . V: per 32 keys and 16 dims, row t
// holds keys (2t, 2t + 1) of each of the 16 dims. Keys past S are zero (their scores are masked, and a
// zero value keeps 0 * garbage out of the sums).
struct PrefillKV {
  int64_t D;
  std::vector<uint32_t> k, v;
  const uint32_t* k_tile(int64_t key16, int64_t step) const { return k.data() + (key16 * (D / 32) + step) * 256; }
  const uint32_t* v_tile(int64_t key32, int64_t dims16) const { return v.data() + (key32 * (D / 16) + dims16) * 256; }
  // The tiles of the kPrefillKeys keys from k0 into L2, while the block before them is worked on: tile
  // loads that missed L2 held up their products (the 7B shape's keys and values are 2 MB a KV head at
  // 4k keys; 24.5 -> 23.1 ms for 512 queries after 3,584 keys, bench_prefill_attention.py).
  void prefetch(int64_t k0) const {
    const char* kb = reinterpret_cast<const char*>(k_tile(k0 / 16, 0));
    const char* vb = reinterpret_cast<const char*>(v_tile(k0 / 32, 0));
    for (int64_t o = 0; o < kPrefillKeys * D * 2; o += 64) {
      _mm_prefetch(kb + o, _MM_HINT_T1);
      _mm_prefetch(vb + o, _MM_HINT_T1);
    }
  }
};

PrefillKV prefill_kv(const uint16_t* kp, const uint16_t* vp, const int64_t* slots, int64_t S, int64_t Hkv,
                     int64_t D, int64_t hk) {
  PrefillKV t;
  t.D = D;
  const int64_t keys = (S + kPrefillKeys - 1) / kPrefillKeys * kPrefillKeys;  // whole key blocks
  t.k.assign(keys * D / 2, 0);
  t.v.assign(keys * D / 2, 0);
  parallel_for(0, keys / 32, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t j = 32 * b; j < std::min(S, 32 * b + 32); ++j) {  // K: a key's D / 2 pairs down a column
        const uint32_t* row = reinterpret_cast<const uint32_t*>(kp + (slots[j] * Hkv + hk) * D);
        for (int64_t p = 0; p < D / 2; ++p) t.k[((j / 16) * (D / 32) + p / 16) * 256 + (p % 16) * 16 + j % 16] = row[p];
      }
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t2 = 0; t2 < 16; ++t2) {  // V: keys 2 t2, 2 t2 + 1 of block b side by side per dim
        const int64_t j = 32 * b + 2 * t2;
        if (j >= S) break;
        const uint16_t* r0 = vp + (slots[j] * Hkv + hk) * D;
        const uint16_t* r1 = j + 1 < S ? vp + (slots[j + 1] * Hkv + hk) * D : nullptr;
        for (int64_t e = 0; e < D / 16; ++e) {
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 16 * e)));
          const __m512i hi = r1 != nullptr
                                 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + 16 * e)))
                                 : _mm512_setzero_si512();
          _mm512_storeu_si512(t.v.data() + (b * (D / 16) + e) * 256 + t2 * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      }
  });
  return t;
}

// Every tile 16 rows x 64 bytes (on), or the tile state given back (off).
__attribute__((target("amx-tile"))) void prefill_tiles(bool on) {
  if (!on) return _tile_release();
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  load_tile_config(cfg);
}

// 2^x for 16 floats x <= 0, to about 4e-5 relative (Taylor to degree 4 on [-1/2, 1/2]): the
// probabilities are rounded to bf16 (2^-9) for P . V, so exp512's 1 ulp bought nothing and cost half the
// kernel's time. -inf gives NaN; callers zero masked lanes after.
inline __m512 exp2_bf16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(9.6181291e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// One query head's 16 queries through one block of keys: scores on AMX, the online softmax, o += P . V.
// qb: the queries, 16 rows of D; m, l: each row's running maximum (in powers of 2) and sum; o (16, D).
struct PrefillHead {
  uint16_t* qb;
  float *o, *m, *l;
};

__attribute__((target("amx-tile,amx-bf16"))) void prefill_step(const PrefillHead& hd, const PrefillKV& kv,
                                                                int64_t k0, int64_t first_pos, int64_t rows,
                                                                __m512 sv, float* sc, uint16_t* pb) {
  const int64_t D = kv.D;
  for (int64_t c = 0; c < kPrefillKeys / 16; c += 2) {  // scores, 32 keys at a time
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t s = 0; s < D / 32; ++s) {
      _tile_loadd(4, hd.qb + 32 * s, 2 * D);
      _tile_loadd(2, kv.k_tile(k0 / 16 + c, s), 64);
      _tile_loadd(3, kv.k_tile(k0 / 16 + c + 1, s), 64);
      _tile_dpbf16ps(0, 4, 2);
      _tile_dpbf16ps(1, 4, 3);
    }
    _tile_stored(0, sc + 16 * c, 4 * kPrefillKeys);
    _tile_stored(1, sc + 16 * (c + 1), 4 * kPrefillKeys);
  }
  // The online softmax, in powers of 2 (sv = scale * log2 e), 16 rows at a time: each row's maximum
  // (the 16 reduced together by lanes16), then its probabilities and their sum. Keys after a row's
  // position are masked where the block reaches past it.
  const auto row_mask = [&](int r, int c) -> __mmask16 {
    const int64_t seen = first_pos + std::min<int64_t>(r, rows - 1) - (k0 + 16 * c) + 1;  // padding rows: the last's
    return seen >= 16 ? __mmask16(0xffff) : seen <= 0 ? __mmask16(0) : __mmask16((1u << seen) - 1);
  };
  const bool diagonal = k0 + kPrefillKeys - 1 > first_pos;  // some row's keys end in this block
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 part[16];
  for (int r = 0; r < 16; ++r) {
    __m512 mx = ninf;
    for (int c = 0; c < kPrefillKeys / 16; ++c) {
      const __m512 x = _mm512_load_ps(sc + r * kPrefillKeys + 16 * c);
      mx = diagonal ? _mm512_mask_max_ps(mx, row_mask(r, c), mx, x) : _mm512_max_ps(mx, x);
    }
    part[r] = mx;
  }
  const __m512 m_old = _mm512_loadu_ps(hd.m);
  const __m512 m_new = _mm512_max_ps(m_old, _mm512_mul_ps(lanes16(part, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); }), sv));
  const __m512 alpha = exp2_bf16(_mm512_sub_ps(m_old, m_new));  // exactly 1 where the maximum held
  _mm512_storeu_ps(hd.m, m_new);
  alignas(64) float alpha_row[16], m_row[16];
  _mm512_store_ps(alpha_row, alpha);
  _mm512_store_ps(m_row, m_new);
  for (int r = 0; r < 16; ++r) {
    const __m512 mv = _mm512_set1_ps(m_row[r]);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < kPrefillKeys / 16; c += 2) {
      __m512 p0 = exp2_bf16(_mm512_fmsub_ps(_mm512_load_ps(sc + r * kPrefillKeys + 16 * c), sv, mv));
      __m512 p1 = exp2_bf16(_mm512_fmsub_ps(_mm512_load_ps(sc + r * kPrefillKeys + 16 * c + 16), sv, mv));
      if (diagonal) p0 = _mm512_maskz_mov_ps(row_mask(r, c), p0), p1 = _mm512_maskz_mov_ps(row_mask(r, c + 1), p1);
      sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
      _mm512_storeu_si512(pb + r * kPrefillKeys + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
    part[r] = sum;
  }
  const __m512 l_old = _mm512_loadu_ps(hd.l);
  _mm512_storeu_ps(hd.l, _mm512_fmadd_ps(l_old, alpha, lanes16(part, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); })));
  for (int r = 0; r < 16; ++r)  // the running output follows each row's new maximum
    if (alpha_row[r] != 1.f)
      for (int64_t d = 0; d < D; d += 16)
        _mm512_storeu_ps(hd.o + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(hd.o + r * D + d), _mm512_set1_ps(alpha_row[r])));
  // o += P . V: up to 64 dims at a time in tmm0-3 (free again), each P tile loaded once for them. A tile
  // load of what the vector stores just wrote waits for them; loading each P tile once per 16 dims took a
  // fifth of the kernel's time.
  for (int64_t e0 = 0; e0 < D / 16; e0 += 4) {
    const int64_t ne = std::min<int64_t>(4, D / 16 - e0);
    _tile_loadd(0, hd.o + 16 * e0, 4 * D);
    if (ne > 1) _tile_loadd(1, hd.o + 16 * (e0 + 1), 4 * D);
    if (ne > 2) _tile_loadd(2, hd.o + 16 * (e0 + 2), 4 * D);
    if (ne > 3) _tile_loadd(3, hd.o + 16 * (e0 + 3), 4 * D);
    for (int64_t c = 0; c < kPrefillKeys / 32; ++c) {
      _tile_loadd(5, pb + 32 * c, 2 * kPrefillKeys);
      _tile_loadd(6, kv.v_tile(k0 / 32 + c, e0), 64);
      _tile_dpbf16ps(0, 5, 6);
      if (ne > 1) {
        _tile_loadd(7, kv.v_tile(k0 / 32 + c, e0 + 1), 64);
        _tile_dpbf16ps(1, 5, 7);
      }
      if (ne > 2) {
        _tile_loadd(6, kv.v_tile(k0 / 32 + c, e0 + 2), 64);
        _tile_dpbf16ps(2, 5, 6);
      }
      if (ne > 3) {
        _tile_loadd(7, kv.v_tile(k0 / 32 + c, e0 + 3), 64);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, hd.o + 16 * e0, 4 * D);
    if (ne > 1) _tile_stored(1, hd.o + 16 * (e0 + 1), 4 * D);
    if (ne > 2) _tile_stored(2, hd.o + 16 * (e0 + 2), 4 * D);
    if (ne > 3) _tile_stored(3, hd.o + 16 * (e0 + 3), 4 * D);
  }
}

// One task: the G query heads h0 .. h0 + G - 1 that share kv, queries i0 .. i0 + rows - 1 (rows <= 16),
// into out (n, H, D). Each block of keys is taken through all G heads while it is in L1: one head at a
// time streamed each KV head's keys and values from L3 once per head and ran at the speed of that.
void prefill_block(const uint16_t* q, int64_t q_row, int64_t h0, int64_t G, int64_t i0, int64_t rows, int64_t start,
                   const PrefillKV& kv, float scale, uint16_t* out, int64_t H) {
  const int64_t D = kv.D;
  thread_local std::vector<uint16_t> qbuf;
  thread_local std::vector<float> obuf, ml;
  qbuf.assign(G * 16 * D, 0);
  obuf.assign(G * 16 * D, 0.f);
  ml.resize(G * 32);
  std::vector<PrefillHead> heads(G);
  for (int64_t g = 0; g < G; ++g) {
    heads[g] = {qbuf.data() + g * 16 * D, obuf.data() + g * 16 * D, ml.data() + g * 32, ml.data() + g * 32 + 16};
    for (int r = 0; r < 16; ++r) heads[g].m[r] = -1e30f, heads[g].l[r] = 0.f;  // finite: exp2 of m - m' is 0, not NaN
    for (int64_t r = 0; r < rows; ++r) std::memcpy(heads[g].qb + r * D, q + (i0 + r) * q_row + (h0 + g) * D, 2 * D);
  }
  alignas(64) float sc[16 * kPrefillKeys];     // scores of one key block
  alignas(64) uint16_t pb[16 * kPrefillKeys];  // their probabilities in bf16: the P tiles
  const __m512 sv = _mm512_set1_ps(scale * 1.44269504088896341f);  // scores in powers of 2
  const int64_t first_pos = start + i0, last = first_pos + rows - 1;  // the last query sees keys 0 .. last
  for (int64_t k0 = 0; k0 <= last; k0 += kPrefillKeys) {
    if (k0 + kPrefillKeys <= last) kv.prefetch(k0 + kPrefillKeys);
    for (int64_t g = 0; g < G; ++g) prefill_step(heads[g], kv, k0, first_pos, rows, sv, sc, pb);
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 inv = _mm512_set1_ps(1.f / heads[g].l[r]);
      uint16_t* y = out + ((i0 + r) * H + h0 + g) * D;
      for (int64_t d = 0; d < D; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + d),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(heads[g].o + r * D + d), inv)));
    }
}
#endif

// Whether prefill_attention can run here: AMX in use and a head dim it takes.
bool prefill_attention_runs(int64_t D) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return amx_on() && D % 32 == 0 && D <= 256;
#else
  (void)D;
  return false;
#endif
}

// q (n, H, D): the chunk's queries (heads D apart, rows q.stride(0) apart); pools (slots, Hkv, D); slots
// (S,) where key position j is, S = start + n. Returns (n, H, D) bf16.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& slots,
                             int64_t start, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && kc.scalar_type() == at::kBFloat16 && vc.scalar_type() == at::kBFloat16,
              "qwenkit prefill_attention: q and the pools must be bfloat16");
  TORCH_CHECK(q.dim() == 3 && kc.dim() == 3 && vc.sizes() == kc.sizes() && kc.is_contiguous() && vc.is_contiguous(),
              "qwenkit prefill_attention: q (n, H, D), contiguous pools (slots, Hkv, D)");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), Hkv = kc.size(1), pool = kc.size(0);
  TORCH_CHECK(kc.size(2) == D && Hkv > 0 && H % Hkv == 0, "qwenkit prefill_attention: head shapes do not match");
  TORCH_CHECK(prefill_attention_runs(D), "qwenkit prefill_attention: needs AMX in use and a head dim that is a multiple "
              "of 32 up to 256, got ", D);
  TORCH_CHECK(scale > 0, "qwenkit prefill_attention: the scale must be positive, got ", scale);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && start >= 0 && slots.size(0) == start + n,
              "qwenkit prefill_attention: slots must be int64 (start + n,)");
  const at::Tensor sl = slots.contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t S = start + n;
  for (int64_t j = 0; j < S; ++j)
    TORCH_CHECK(sp[j] >= 0 && sp[j] < pool, "qwenkit prefill_attention: slot ", sp[j], " outside the pool");
  const at::Tensor qc = q.stride(2) == 1 && q.stride(1) == D ? q : q.contiguous();
  at::Tensor out = at::empty({n, H, D}, q.options());
  if (n == 0 || H == 0) return out;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(kc.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(vc.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  std::vector<PrefillKV> kv;
  for (int64_t hk = 0; hk < Hkv; ++hk) kv.push_back(prefill_kv(kp, vp, sp, S, Hkv, D, hk));
  const int64_t blocks = (n + 15) / 16, G = H / Hkv, q_row = qc.stride(0);
  // Tasks (KV head, block of 16 queries), longest first (the last blocks see the most keys), so the
  // threads end together.
  parallel_for(0, Hkv * blocks, 1, [&](int64_t t0, int64_t t1) {
    prefill_tiles(true);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = blocks - 1 - t / Hkv, hk = t % Hkv, i0 = 16 * b;
      prefill_block(qp, q_row, hk * G, G, i0, std::min<int64_t>(16, n - i0), start, kv[hk], float(scale), op, H);
    }
    prefill_tiles(false);
  });
#else
  (void)qc;
#endif
  return out;
}
