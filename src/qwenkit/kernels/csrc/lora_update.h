// lora_update.h: served LoRA adapters' updates, added to a projection's output in place.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// y (M, N) bf16 += bf16(BT_s^T (A_s x_m)) for every row m whose adapter slot s = slots[m] is not 0 (slot
// s's pair: a[s - 1] (R, K) and bt[s - 1] (R, N), B transposed with the scaling in it, fp32), x (M, K)
// bf16: served_adapters.LoRAProjection's update, in fp32, rounded to bf16, then added and rounded again
// as torch's y + update.to(bf16). Rows of slot 0 are left alone. One call a projection: in torch, a
// rank-16 update was five ops and a temporary each (~14 us at batch 1, as much as a small projection).
// Each row's sums run in a fixed order whatever the other rows are, so a row's result never depends on
// them.
void lora_add_(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, const at::Tensor& slots) {
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 &&
                  y.dim() == 2 && x.dim() == 2 && y.is_contiguous() && x.size(0) == y.size(0),
              "qwenkit lora_add_: y (rows, N) contiguous and x (rows, K) must be bfloat16 CPU tensors");
  const int64_t M = y.size(0), N = y.size(1), K = x.size(1);
  TORCH_CHECK(a.scalar_type() == at::kFloat && bt.scalar_type() == at::kFloat && a.dim() == 3 && bt.dim() == 3 &&
                  a.is_contiguous() && bt.is_contiguous() && a.size(2) == K && bt.size(2) == N &&
                  a.size(0) == bt.size(0) && a.size(1) == bt.size(1),
              "qwenkit lora_add_: a (adapters, R, ", K, ") and bt (adapters, R, ", N, ") must be contiguous float32");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == M,
              "qwenkit lora_add_: slots must hold one int64 adapter slot per row");
  const int64_t S = a.size(0), R = a.size(1);
  const at::Tensor xc = x.contiguous(), sc = slots.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(sp[m] >= 0 && sp[m] <= S, "qwenkit lora_add_: adapter slot ", sp[m], " outside 0..", S);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const float* ap = a.data_ptr<float>();
  const float* bp = bt.data_ptr<float>();
  parallel_for(0, M, row_grain(R * (K + N), 1 << 16), [&](int64_t m0, int64_t m1) {
    std::vector<float> t(R);
    for (int64_t m = m0; m < m1; ++m) {
      if (sp[m] == 0) continue;
      const float* as = ap + (sp[m] - 1) * R * K;
      const float* bs = bp + (sp[m] - 1) * R * N;
      const uint16_t* xr = xp + m * K;
      for (int64_t r = 0; r < R; ++r) {  // t = A x
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
          const __mmask16 mk = tail_mask16(K - k);
          acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, as + r * K + k), maskz_load_bf16_as_f32(mk, xr + k), acc);
        }
        t[r] = _mm512_reduce_add_ps(acc);
      }
      uint16_t* ym = yp + m * N;
      for (int64_t n = 0; n < N; n += 16) {  // y += bf16(B t)
        const __mmask16 mk = tail_mask16(N - n);
        __m512 u = _mm512_setzero_ps();
        for (int64_t r = 0; r < R; ++r) u = _mm512_fmadd_ps(_mm512_set1_ps(t[r]), _mm512_maskz_loadu_ps(mk, bs + r * N + n), u);
        const __m512 v = _mm512_add_ps(maskz_load_bf16_as_f32(mk, ym + n), round_bf16(u));
        _mm256_mask_storeu_epi16(ym + n, mk, (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  });
}
