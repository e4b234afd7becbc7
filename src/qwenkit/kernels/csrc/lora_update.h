// lora_update.h: served LoRA adapters' updates, added to a projection's output in place.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

constexpr int64_t kLoraRows = 8;

// t[i][16 v .. 16 v + 15] = (A x_i) for rank vector v of NR rows: for each k, x_i[k] times at's tile v row k,
// the even k and the odd k in two sums added at the end (2 NR independent sums; the counts fixed at
// compile time keep them in registers). The order is the same for every NR: a row's sums never depend
// on the rows beside it.
template <int NR>
void lora_rank_vector(const float* xf, const uint16_t* at, float* t, int64_t R, int64_t K, int64_t v) {
  __m512 acc[2 * NR];
  for (int i = 0; i < 2 * NR; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    const __m512 a0 = load_bf16_as_f32(at + (v * K + k) * 16), a1 = load_bf16_as_f32(at + (v * K + k + 1) * 16);
    for (int i = 0; i < NR; ++i) {
      acc[2 * i] = _mm512_fmadd_ps(_mm512_set1_ps(xf[i * K + k]), a0, acc[2 * i]);
      acc[2 * i + 1] = _mm512_fmadd_ps(_mm512_set1_ps(xf[i * K + k + 1]), a1, acc[2 * i + 1]);
    }
  }
  if (k < K) {
    const __m512 a0 = load_bf16_as_f32(at + (v * K + k) * 16);
    for (int i = 0; i < NR; ++i) acc[2 * i] = _mm512_fmadd_ps(_mm512_set1_ps(xf[i * K + k]), a0, acc[2 * i]);
  }
  for (int i = 0; i < NR; ++i) _mm512_storeu_ps(t + i * R + 16 * v, _mm512_add_ps(acc[2 * i], acc[2 * i + 1]));
}

// y_i[16 c .. 16 (c + NB) - 1] += bf16(B t_i) for NR rows and NB blocks of 16 outputs from block c: the
// rank's terms in order, NR * NB independent sums.
template <int NR, int NB>
void lora_output_blocks(const float* t, const uint16_t* bt, uint16_t* const* ys, int64_t R, int64_t N, int64_t c) {
  __m512 u[NR * NB];
  for (int j = 0; j < NR * NB; ++j) u[j] = _mm512_setzero_ps();
  for (int64_t r = 0; r < R; ++r) {
    __m512 bv[NB];
    for (int b = 0; b < NB; ++b) bv[b] = load_bf16_as_f32(bt + ((c + b) * R + r) * 16);
    for (int i = 0; i < NR; ++i) {
      const __m512 ti = _mm512_set1_ps(t[i * R + r]);
      for (int b = 0; b < NB; ++b) u[i * NB + b] = _mm512_fmadd_ps(ti, bv[b], u[i * NB + b]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int b = 0; b < NB; ++b) {
      const int64_t n = (c + b) * 16;
      const __mmask16 mk = tail_mask16(N - n);
      uint16_t* ym = ys[i] + n;
      const __m512 v = _mm512_add_ps(maskz_load_bf16_as_f32(mk, ym), round_bf16(u[i * NB + b]));
      _mm256_mask_storeu_epi16(ym, mk, (__m256i)_mm512_cvtneps_pbh(v));
    }
}

template <int NR>
void lora_rows_n(const int64_t* rows, const uint16_t* xp, uint16_t* yp, const uint16_t* at, const uint16_t* bt,
                 int64_t R, int64_t K, int64_t N) {
  constexpr int NB = NR == 1 ? 4 : NR == 2 ? 2 : 1;  // output blocks side by side where rows are few
  const int64_t RV = R / 16;  // 16-float vectors of a rank row
  std::vector<float> xf(NR * K), t(NR * R);
  uint16_t* ys[NR];
  for (int i = 0; i < NR; ++i) {  // the rows' activations as float32, once
    ys[i] = yp + rows[i] * N;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = tail_mask16(K - k);
      _mm512_mask_storeu_ps(&xf[i * K + k], mk, maskz_load_bf16_as_f32(mk, xp + rows[i] * K + k));
    }
  }
  parallel_for(0, RV, R * K * NR >= (1 << 17) ? 1 : RV, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) lora_rank_vector<NR>(xf.data(), at, t.data(), R, K, v);
  });
  const int64_t blocks = (N + 15) / 16, groups = (blocks + NB - 1) / NB;
  parallel_for(0, groups, row_grain(NR * R * 16 * NB, 1 << 16), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t c = g * NB;
      if (c + NB <= blocks) {
        lora_output_blocks<NR, NB>(t.data(), bt, ys, R, N, c);
      } else {
        for (int64_t b = c; b < blocks; ++b) lora_output_blocks<NR, 1>(t.data(), bt, ys, R, N, b);
      }
    }
  });
}

// Rows of one adapter, up to kLoraRows at a time: t = A x for each (rows x R), then y += bf16(B t).
// A and B are read once for all the rows, each in tiles whose every pass reads memory straight through:
// at (R/16, K, 16), A's rank vector v for every k; bt (N/16, R, 16), B's 16 outputs of block c for
// every rank, bf16 widened to float32 as it is read. At 8 rows of the bundled model a rank-16 adapter is
// 9.8 MB a step (19.5 MB while the tiles were float32): read once a row, or across rows of a plain (R, N)
// B (a stride of N values from one rank to the next), it cost more than the base model's 80 MB of 4-bit
// codes. Each row's sums run in the same order whatever rows
// share the block, so a row's result never depends on them.
void lora_rows(const int64_t* rows, int64_t nr, const uint16_t* xp, uint16_t* yp, const uint16_t* at,
               const uint16_t* bt, int64_t R, int64_t K, int64_t N) {
  switch (nr) {
    case 1: return lora_rows_n<1>(rows, xp, yp, at, bt, R, K, N);
    case 2: return lora_rows_n<2>(rows, xp, yp, at, bt, R, K, N);
    case 3: return lora_rows_n<3>(rows, xp, yp, at, bt, R, K, N);
    case 4: return lora_rows_n<4>(rows, xp, yp, at, bt, R, K, N);
    case 5: return lora_rows_n<5>(rows, xp, yp, at, bt, R, K, N);
    case 6: return lora_rows_n<6>(rows, xp, yp, at, bt, R, K, N);
    case 7: return lora_rows_n<7>(rows, xp, yp, at, bt, R, K, N);
    default: return lora_rows_n<8>(rows, xp, yp, at, bt, R, K, N);
  }
}

// y (M, N) bf16 += bf16(B_s A_s x_m) for every row m whose adapter slot s = slots[m] is not 0 (slot s's
// pair in the tiles of kernels.pack_lora: at[s - 1] (R/16, K, 16) and bt[s - 1] (ceil(N/16), R, 16),
// the scaling in B, bf16, zero-padded), x (M, K) bf16: served_adapters.LoRAProjection's update, in
// fp32 from the bf16 pairs, rounded to bf16, then added and rounded again as torch's
// y + update.to(bf16). Rows of slot 0
// are left alone. One call a projection: in torch, a rank-16 update was five ops and a temporary each
// (~14 us at batch 1, as much as a small projection).
void lora_add_(at::Tensor y, const at::Tensor& x, const at::Tensor& at, const at::Tensor& bt, const at::Tensor& slots) {
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 &&
                  y.dim() == 2 && x.dim() == 2 && y.is_contiguous() && x.size(0) == y.size(0),
              "qwenkit lora_add_: y (rows, N) contiguous and x (rows, K) must be bfloat16 CPU tensors");
  const int64_t M = y.size(0), N = y.size(1), K = x.size(1);
  TORCH_CHECK(at.scalar_type() == at::kBFloat16 && bt.scalar_type() == at::kBFloat16 && at.dim() == 4 &&
                  bt.dim() == 4 &&
                  at.is_contiguous() && bt.is_contiguous() && at.size(2) == K && at.size(3) == 16 &&
                  bt.size(1) == (N + 15) / 16 && bt.size(3) == 16 && at.size(0) == bt.size(0) &&
                  at.size(1) * 16 == bt.size(2),
              "qwenkit lora_add_: at (adapters, R/16, ", K, ", 16) and bt (adapters, ", (N + 15) / 16,
              ", R, 16) must be contiguous bfloat16 (kernels.pack_lora)");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == M,
              "qwenkit lora_add_: slots must hold one int64 adapter slot per row");
  const int64_t S = at.size(0), R = bt.size(2), NP = bt.size(1) * 16;
  const at::Tensor xc = x.contiguous(), sc = slots.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(sp[m] >= 0 && sp[m] <= S, "qwenkit lora_add_: adapter slot ", sp[m], " outside 0..", S);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const uint16_t* atp = reinterpret_cast<const uint16_t*>(at.data_ptr<at::BFloat16>());
  const uint16_t* btp = reinterpret_cast<const uint16_t*>(bt.data_ptr<at::BFloat16>());
  std::vector<int64_t> rows;
  for (int64_t s = 1; s <= S; ++s) {  // the rows of each adapter, in blocks
    rows.clear();
    for (int64_t m = 0; m < M; ++m)
      if (sp[m] == s) rows.push_back(m);
    for (size_t i = 0; i < rows.size(); i += kLoraRows)
      lora_rows(rows.data() + i, std::min<int64_t>(kLoraRows, rows.size() - i), xp, yp, atp + (s - 1) * K * R,
                btp + (s - 1) * R * NP, R, K, N);
  }
}
