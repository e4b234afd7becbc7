// logit_rows.h: the sampler's passes over rows of logits.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// Rows of logits as the sampler's passes read them: float32, or the model's own bf16 output, widened
// exactly as it is read (a 16-row step of a 49k vocabulary no longer writes a 3 MB float32 copy first).
inline __m512 maskz_load_row16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 maskz_load_row16(__mmask16 m, const uint16_t* p) { return maskz_load_bf16_as_f32(m, p); }
inline __m512 load_row16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_row16(const uint16_t* p) { return load_bf16_as_f32(p); }
inline float row_value(const float* p, int64_t i) { return p[i]; }
inline float row_value(const uint16_t* p, int64_t i) {
  const uint32_t u = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// the float32 bits of 16 values (0 past the mask)
inline __m512i maskz_load_row_bits(__mmask16 m, const float* p) { return _mm512_maskz_loadu_epi32(m, p); }
inline __m512i maskz_load_row_bits(__mmask16 m, const uint16_t* p) {
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16);
}

// A (M, V) float32 or bf16 CPU tensor of logits, contiguous; f(pointer to its first row) for its type.
template <typename F>
auto with_logit_rows(const at::Tensor& x, const char* name, const F& f) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.dim() == 2,
              "qwenkit ", name, ": x must be a float32 or bfloat16 (M, V) CPU tensor, got ", x.scalar_type(), " ",
              x.sizes());
  const at::Tensor xc = x.contiguous();
  if (xc.scalar_type() == at::kFloat) return f(xc, xc.data_ptr<float>());
  return f(xc, reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()));
}

// argmax over the last dimension of float32 or bf16 logits (M, V), as torch.argmax: the first index of the
// largest value, or of the first NaN. torch's runs one row at a time, scalar: 1 ms for a step's 16 rows
// of a 152k vocabulary, more than a layer. Rows are cut into chunks, each reduced in 16 lanes (a lane
// keeps its first maximum), the chunks combined in order.
constexpr int64_t kArgmaxChunk = 16384;

struct ArgmaxPart {
  float value;
  int64_t index;
  bool nan;
};

template <typename T>
ArgmaxPart argmax_chunk(const T* x, int64_t begin, int64_t end) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  __m512i best_at = _mm512_set1_epi32(0);
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  bool nan = false;
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {  // offsets from begin fit in 32 bits (a chunk)
    const __m512 v = load_row16(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
    const __mmask16 up = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, up, v);
    best_at = _mm512_mask_mov_epi32(best_at, up, at);
    at = _mm512_add_epi32(at, step);
  }
  alignas(64) float values[16];
  alignas(64) int32_t where[16];
  _mm512_store_ps(values, best);
  _mm512_store_si512(where, best_at);
  ArgmaxPart part{-INFINITY, begin, false};  // every value -inf: the first index
  for (int l = 0; l < 16; ++l) {  // a lane holds its first maximum; ties go to the lowest index
    const int64_t index = begin + where[l];
    if (values[l] > part.value || (values[l] == part.value && values[l] != -INFINITY && index < part.index))
      part = {values[l], index, false};
  }
  for (; i < end; ++i) {
    const float v = row_value(x, i);
    if (v != v)
      nan = true;
    else if (v > part.value)
      part = {v, i, false};
  }
  if (nan)
    for (int64_t j = begin; j < end; ++j)
      if (row_value(x, j) != row_value(x, j)) return {row_value(x, j), j, true};
  return part;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() != 2 || x.size(1) > 0, "qwenkit argmax_rows: rows must not be empty");
  return with_logit_rows(x, "argmax_rows", [&](const at::Tensor& xc, const auto* p) {
    const int64_t M = xc.size(0), V = xc.size(1), chunks = (V + kArgmaxChunk - 1) / kArgmaxChunk;
    std::vector<ArgmaxPart> parts(M * chunks);
    parallel_for(0, M * chunks, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t m = i / chunks, c = i % chunks;
        parts[i] = argmax_chunk(p + m * V, c * kArgmaxChunk, std::min(V, (c + 1) * kArgmaxChunk));
      }
    });
    at::Tensor out = at::empty({M}, xc.options().dtype(at::kLong));
    int64_t* o = out.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) {
      ArgmaxPart best = parts[m * chunks];
      for (int64_t c = 1; c < chunks && !best.nan; ++c) {
        const ArgmaxPart& part = parts[m * chunks + c];
        if (part.nan || part.value > best.value) best = part;
      }
      o[m] = best.index;
    }
    return out;
  });
}

// bf16 logits (M, V) widened to float32 (exactly, as .float()), and whether each float32 row is all
// finite: the engine's two passes over a step's logits, on these threads. torch's own ran on OpenMP,
// whose worker, spinning after each such region, took a core from the kernels' workers for milliseconds.
at::Tensor widen_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2,
              "qwenkit widen_rows: x must be a bfloat16 (M, V) CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t n = xc.numel();
  parallel_for(0, (n + 4095) / 4096, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0 * 4096; i < std::min(n, b1 * 4096); i += 16) {
      const __mmask16 m = tail_mask16(n - i);
      _mm512_mask_storeu_ps(yp + i, m, maskz_load_bf16_as_f32(m, xp + i));
    }
  });
  return y;
}

at::Tensor finite_rows(const at::Tensor& x) {
  return with_logit_rows(x, "finite_rows", [&](const at::Tensor& xc, const auto* p) {
    const int64_t M = xc.size(0), V = xc.size(1);
    at::Tensor out = at::empty({M}, xc.options().dtype(at::kBool));
    bool* o = out.data_ptr<bool>();
    const __m512i exponent = _mm512_set1_epi32(0x7f800000);
    parallel_for(0, M, row_grain(V, 65536), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        __mmask16 bad = 0;  // any lane whose exponent is all ones: inf or NaN
        for (int64_t j = 0; j < V; j += 16) {
          const __m512i v = maskz_load_row_bits(tail_mask16(V - j), p + m * V + j);
          bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(v, exponent), exponent);
        }
        o[m] = bad == 0;
      }
    });
    return out;
  });
}

// The sampler's passes over whole rows of float32 logits (M, V), one row per task: torch's topk took
// 0.5 ms for a 16-row step of a 49k vocabulary (1.6 ms at 152k) and its logsumexp 2.5 ms (9.4 ms).

// The k largest of each row, sorted descending, ties to the lower index; values may be -inf, not NaN
// (the sampler's logits are checked finite first).
// One vector pass per row against a running threshold (the k-th best so far): after the first few
// thousand values almost none pass, so a row costs about what its argmax does.
std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& x, int64_t k) {
  return with_logit_rows(x, "topk_rows", [&](const at::Tensor& xc, const auto* xp) {
  const int64_t M = xc.size(0), V = xc.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "qwenkit topk_rows: k must lie in 1..", V, ", got ", k);
  at::Tensor values = at::empty({M, k}, xc.options().dtype(at::kFloat)),
             ids = at::empty({M, k}, xc.options().dtype(at::kLong));
  float* vp = values.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  using Entry = std::pair<float, int64_t>;
  const auto better = [](const Entry& a, const Entry& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  const int64_t cap = std::max<int64_t>(4 * k, 256);  // candidates held before the k best are picked again
  parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<Entry> kept;
    kept.reserve(cap + 16);
    alignas(64) float pv[16];
    for (int64_t m = m0; m < m1; ++m) {
      const auto* r = xp + m * V;
      kept.clear();
      for (int64_t i = 0; i < k; ++i) {
        TORCH_CHECK(row_value(r, i) == row_value(r, i), "qwenkit topk_rows: row ", m, " holds NaN");
        kept.emplace_back(row_value(r, i), i);
      }
      // Keep the k best of what is held (nth_element); the threshold is the worst of them: a later
      // value enters only if strictly greater, as an equal one has the higher index and loses the tie.
      const auto trim = [&]() {
        std::nth_element(kept.begin(), kept.begin() + (k - 1), kept.end(), better);
        kept.resize(k);
        return kept[k - 1].first;
      };
      float threshold = trim();
      int64_t i = k;
      for (; i + 16 <= V; i += 16) {
        const __m512 v = load_row16(r + i);
        __mmask16 up = _mm512_cmp_ps_mask(v, _mm512_set1_ps(threshold), _CMP_GT_OQ);
        if (!up) continue;
        _mm512_store_ps(pv, v);
        for (; up; up &= up - 1) {
          const int l = __builtin_ctz(up);
          kept.emplace_back(pv[l], i + l);
        }
        if (static_cast<int64_t>(kept.size()) >= cap) threshold = trim();
      }
      for (; i < V; ++i)
        if (row_value(r, i) > threshold) kept.emplace_back(row_value(r, i), i);
      std::sort(kept.begin(), kept.end(), better);
      for (int64_t j = 0; j < k; ++j) {
        vp[m * k + j] = kept[j].first;
        ip[m * k + j] = kept[j].second;
      }
    }
  });
  return std::make_tuple(values, ids);
  });
}

// The largest of a row's V floats (-inf for a row of -inf).
template <typename T>
inline float row_max(const T* r, int64_t V) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 t = tail_mask16(V - i);
    mx = _mm512_mask_max_ps(mx, t, mx, maskz_load_row16(t, r + i));
  }
  return _mm512_reduce_max_ps(mx);
}

// log(sum_i e^(scales[m] * x_i)) of each row m (scales > 0: 1 / each row's temperature), in float32: the
// max first, then the sum of e^(scale * (x_i - max)) in 16 lanes. -inf values add nothing; a row of -inf
// gives -inf. Values may be -inf, not NaN.
at::Tensor logsumexp_rows(const at::Tensor& x, at::ArrayRef<double> scales) {
  return with_logit_rows(x, "logsumexp_rows", [&](const at::Tensor& xc, const auto* xp) {
  const int64_t M = xc.size(0), V = xc.size(1);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == M, "qwenkit logsumexp_rows: one scale per row: ", M, " rows, ",
              scales.size(), " scales");
  for (double sc : scales) TORCH_CHECK(sc > 0, "qwenkit logsumexp_rows: scales must be positive, got ", sc);
  at::Tensor out = at::empty({M}, xc.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const auto* r = xp + m * V;
      const float top = row_max(r, V);
      if (top == -INFINITY) {
        op[m] = top;
        continue;
      }
      const float s = static_cast<float>(scales[m]);
      const __m512 sv = _mm512_set1_ps(s), tv = _mm512_set1_ps(top);
      __m512 total = _mm512_setzero_ps();
      for (int64_t i = 0; i < V; i += 16) {
        const __mmask16 t = tail_mask16(V - i);
        const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(maskz_load_row16(t, r + i), tv), sv));
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(t, e));
      }
      op[m] = s * top + std::log(_mm512_reduce_add_ps(total));
    }
  });
  return out;
  });
}


// A categorical draw per row from softmax(scales[m] * x) by its cumulative sum, without writing the
// probabilities: e_i = e^(scale * (x_i - max)), tokens with e_i < min_ps[m] (min-p: below min_p times
// the most likely) count as 0, and the draw is the first index whose running sum of e exceeds
// us[m] * sum(e), us in [0, 1). Three passes over the row (max, sum, search; the search stops at the
// draw), where torch's divide, softmax, cumsum and searchsorted wrote a (rows, V) tensor each: 12 ms for
// 16 rows of a 152k vocabulary, this about 1 ms. x may hold -inf, not NaN.
at::Tensor sample_cdf_rows(const at::Tensor& x, at::ArrayRef<double> scales, at::ArrayRef<double> min_ps,
                           at::ArrayRef<double> us) {
  TORCH_CHECK(x.dim() != 2 || x.size(1) > 0, "qwenkit sample_cdf_rows: rows must not be empty");
  return with_logit_rows(x, "sample_cdf_rows", [&](const at::Tensor& xc, const auto* xp) {
  const int64_t M = xc.size(0), V = xc.size(1);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == M && static_cast<int64_t>(min_ps.size()) == M &&
                  static_cast<int64_t>(us.size()) == M,
              "qwenkit sample_cdf_rows: one scale, min_p and uniform per row: ", M, " rows");
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(scales[m] > 0 && min_ps[m] >= 0 && min_ps[m] <= 1 && us[m] >= 0 && us[m] < 1,
                "qwenkit sample_cdf_rows: row ", m, " needs scale > 0, min_p in [0, 1] and u in [0, 1)");
  at::Tensor out = at::empty({M}, xc.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const auto* r = xp + m * V;
      const float top = row_max(r, V);
      const __m512 sv = _mm512_set1_ps(static_cast<float>(scales[m])), tv = _mm512_set1_ps(top),
                   floor = _mm512_set1_ps(static_cast<float>(min_ps[m]));
      // e of 16 values from i, 0 past the end, below the min-p floor, or where x is -inf
      const auto e16 = [&](int64_t i) {
        const __mmask16 t = tail_mask16(V - i);
        const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(maskz_load_row16(t, r + i), tv), sv));
        return _mm512_maskz_mov_ps(t & _mm512_cmp_ps_mask(e, floor, _CMP_GE_OQ), e);
      };
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < V; i += 16) sum = _mm512_add_ps(sum, e16(i));
      const float target = static_cast<float>(us[m]) * _mm512_reduce_add_ps(sum);
      int64_t pick = -1, last = 0;
      float running = 0.f;
      alignas(64) float e[16];
      for (int64_t i = 0; i < V && pick < 0; i += 16) {
        _mm512_store_ps(e, e16(i));
        for (int l = 0; l < 16 && i + l < V; ++l) {
          if (e[l] == 0.f) continue;
          last = i + l;
          running += e[l];
          if (running > target) {
            pick = last;
            break;
          }
        }
      }
      op[m] = pick >= 0 ? pick : last;  // rounding left the target past the sum: the last possible token
    }
  });
  return out;
  });
}


// splitmix64's mix of key + id * golden as an Exp(1) value -log(u), u in (0, 1): the same noise, bit for
// bit in its uniform, as the sampler's ``_keyed_exp``.
inline double keyed_exp(int64_t key, int64_t id) {
  uint64_t z = static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(key);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return -std::log((static_cast<double>(z >> 11) + 0.5) * 0x1.0p-53);
}

// A top-p draw per row without sorting the row: e_i = e^(scale * (x_i - max)), Z = sum e. Token j is in
// the nucleus when the mass of the tokens better than it (larger e, or equal e and a lower index) is
// below top_p * Z; of those, tokens with e < min_p are dropped; the draw is the race argmax e_j / E_j
// with E_j = keyed_exp(key, j). The nucleus boundary comes from a histogram of e by its float bits (16
// buckets an octave), only the boundary bucket's tokens sorted. Tokens with e below (1 - top_p) * Z / V
// cannot be in any nucleus (all such tokens together hold less than 1 - top_p of the mass) and are
// skipped by a vector compare. x may hold -inf, not NaN.
at::Tensor sample_top_p_rows(const at::Tensor& x, at::ArrayRef<double> scales, at::ArrayRef<double> top_ps,
                             at::ArrayRef<double> min_ps, at::IntArrayRef keys) {
  TORCH_CHECK(x.dim() != 2 || x.size(1) > 0, "qwenkit sample_top_p_rows: rows must not be empty");
  return with_logit_rows(x, "sample_top_p_rows", [&](const at::Tensor& xc, const auto* xp) {
  const int64_t M = xc.size(0), V = xc.size(1);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == M && static_cast<int64_t>(top_ps.size()) == M &&
                  static_cast<int64_t>(min_ps.size()) == M && static_cast<int64_t>(keys.size()) == M,
              "qwenkit sample_top_p_rows: one scale, top_p, min_p and key per row: ", M, " rows");
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(scales[m] > 0 && top_ps[m] > 0 && top_ps[m] <= 1 && min_ps[m] >= 0 && min_ps[m] <= 1,
                "qwenkit sample_top_p_rows: row ", m, " needs scale > 0, top_p in (0, 1] and min_p in [0, 1]");
  at::Tensor out = at::empty({M}, xc.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  constexpr int kBuckets = 1024;
  const auto bucket_of = [](float e) {  // e in (0, 1]: 0 for e = 1, larger as e shrinks
    uint32_t u;
    std::memcpy(&u, &e, 4);
    return static_cast<int>(std::min<uint32_t>(kBuckets - 1, (0x3F800000u - u) >> 19));
  };
  parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> mass(kBuckets);
    std::vector<std::pair<float, int64_t>> edge;
    alignas(64) float e16[16];
    for (int64_t m = m0; m < m1; ++m) {
      const auto* r = xp + m * V;
      const float top = row_max(r, V);
      const __m512 sv = _mm512_set1_ps(static_cast<float>(scales[m])), tv = _mm512_set1_ps(top);
      const auto exps = [&](int64_t i) {  // e of 16 values from i, 0 past the end or where x is -inf
        const __mmask16 t = tail_mask16(V - i);
        return _mm512_maskz_mov_ps(t, exp512(_mm512_mul_ps(_mm512_sub_ps(maskz_load_row16(t, r + i), tv), sv)));
      };
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < V; i += 16) sum = _mm512_add_ps(sum, exps(i));
      const float Z = _mm512_reduce_add_ps(sum), p = static_cast<float>(top_ps[m]) * Z;
      const __m512 skip = _mm512_set1_ps((1.f - static_cast<float>(top_ps[m])) * Z / static_cast<float>(V));
      // mass per bucket of the tokens that may be in the nucleus
      std::fill(mass.begin(), mass.end(), 0.f);
      // calls f(e, j) for every token j that may be in the nucleus (e >= skip and e > 0), in order
      const auto each_candidate = [&](const auto& f) {
        for (int64_t i = 0; i < V; i += 16) {
          const __m512 e = exps(i);
          __mmask16 in = _mm512_cmp_ps_mask(e, skip, _CMP_GE_OQ) & _mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_GT_OQ);
          if (!in) continue;
          _mm512_store_ps(e16, e);
          for (; in; in &= in - 1) {
            const int l = __builtin_ctz(in);
            f(e16[l], i + l);
          }
        }
      };
      each_candidate([&](float e, int64_t) { mass[bucket_of(e)] += e; });
      int boundary = 0;
      float before = 0.f;  // mass of the buckets better than the boundary bucket
      while (boundary < kBuckets - 1 && before + mass[boundary] < p) before += mass[boundary++];
      // the boundary bucket's tokens, best first (ties to the lower index), kept while the mass before
      // each is below p: the last kept one is the cut
      edge.clear();
      each_candidate([&](float e, int64_t j) {
        if (bucket_of(e) == boundary) edge.emplace_back(e, j);
      });
      std::sort(edge.begin(), edge.end(), [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
      std::pair<float, int64_t> cut{INFINITY, -1};  // tokens of the boundary bucket at or better than cut
      float running = before;
      for (const auto& t : edge) {
        if (running >= p) break;
        cut = t;
        running += t.first;
      }
      const float floor = static_cast<float>(min_ps[m]);
      double best = -1.0;
      int64_t pick = -1;
      each_candidate([&](float v, int64_t j) {
        const int b = bucket_of(v);
        const bool member = b < boundary || (b == boundary && (v > cut.first || (v == cut.first && j <= cut.second)));
        if (!member || v < floor) return;
        const double ratio = v / keyed_exp(keys[m], j);
        if (ratio > best) best = ratio, pick = j;
      });
      op[m] = pick >= 0 ? pick : 0;
    }
  });
  return out;
  });
}
