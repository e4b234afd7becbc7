// step_ops.h: the decode step's small per-layer ops: RMSNorm, SiLU x up, RoPE.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// Small per-layer ops of the decode step, where torch's own run as several kernels (one dispatch and
// one temporary each), which at batch 1 costs more than the arithmetic.

// y = weight * bf16(x * rsqrt(mean(x^2) + eps)), the norm in fp32: what qwenkit's RMSNorm computes for
// bf16 x and weight (F.rms_norm on x.float(), cast back, then the weight multiply), one pass per row.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "qwenkit rms_norm: x and weight must be bfloat16 CPU tensors");
  const int64_t K = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == K, "qwenkit rms_norm: weight must be (", K, ",)");
  at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t M = K == 0 ? 0 : xc.numel() / K;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  auto bf = [](uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; };
  // two passes of light arithmetic: on one thread up to 16 x 896 values (a second one cost more than it saved)
  parallel_for(0, M, row_grain(K, 16384), [&](int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const uint16_t* xr = xp + m * K;
    // the sum of squares in double: a bf16 square is exact there, and the mean does not depend on
    // the order of summation at these sizes
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 v = load_bf16_as_f32(xr + k);
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      s0 = _mm512_fmadd_pd(lo, lo, s0);
      s1 = _mm512_fmadd_pd(hi, hi, s1);
    }
    double ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    for (int64_t i = k; i < K; ++i) ss += double(bf(xr[i])) * double(bf(xr[i]));
    const float r = 1.f / std::sqrt(float(ss / double(K)) + float(eps));
    const __m512 rv = _mm512_set1_ps(r);
    for (k = 0; k + 16 <= K; k += 16)
      store_bf16(yp + m * K + k,
                 _mm512_mul_ps(load_bf16_as_f32(wp + k), round_bf16(_mm512_mul_ps(load_bf16_as_f32(xr + k), rv))));
    for (; k < K; ++k) yp[m * K + k] = f32_to_bf16(bf(wp[k]) * bf(f32_to_bf16(bf(xr[k]) * r)));
  }
  });
  return y;
}

// silu(gate) * up for x = [gate | up] (..., 2F) bf16 -> (..., F) bf16, each product rounded as torch's
// F.silu(gate) * up rounds it (silu to bf16, then the product to bf16).
at::Tensor silu_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "qwenkit silu_mul: x must be bfloat16 on the CPU");
  const int64_t F2 = x.size(-1);
  TORCH_CHECK(F2 % 2 == 0, "qwenkit silu_mul: the last dimension must be even, got ", F2);
  const int64_t F = F2 / 2;
  at::Tensor xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = F;
  at::Tensor y = at::empty(shape, x.options());
  const int64_t M = F == 0 ? 0 : xc.numel() / F2;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  auto bf = [](uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; };
  const __m512 one = _mm512_set1_ps(1.f);
  parallel_for(0, M, row_grain(F2), [&](int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const uint16_t* gate = xp + m * F2;
    const uint16_t* up = gate + F;
    int64_t f = 0;
    for (; f + 16 <= F; f += 16) {
      const __m512 g = load_bf16_as_f32(gate + f);
      const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      const __m512 p = _mm512_mul_ps(round_bf16(s), load_bf16_as_f32(up + f));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(yp + m * F + f), (__m256i)_mm512_cvtneps_pbh(p));
    }
    for (; f < F; ++f) {
      const float g = bf(gate[f]);
      const float s = bf(f32_to_bf16(g / (1.f + std::exp(-g))));
      yp[m * F + f] = f32_to_bf16(s * bf(up[f]));
    }
  }
  });
  return y;
}

// Rotate-half RoPE in place on x (B, T, heads, D) bf16 (any strides but a contiguous last dimension),
// the first `rot` features of every head; cos/sin (B, T, rot). In bf16 (cos/sin bf16) each product and
// the sum are rounded to bf16, as torch's x * cos + rotate_half(x) * sin; in fp32 (cos/sin float32) the
// products and sum stay float and only the result is rounded (Qwen v1's float32 rotation).
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 4 && x.stride(3) == 1,
              "qwenkit rope_: x must be a bfloat16 (B, T, heads, D) CPU tensor with a contiguous last dimension");
  const int64_t B = x.size(0), T = x.size(1), NH = x.size(2), D = x.size(3);
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T && cos.sizes() == sin.sizes() &&
                  cos.scalar_type() == sin.scalar_type() && cos.size(2) % 2 == 0 && cos.size(2) <= D,
              "qwenkit rope_: cos and sin must be (B, T, rot) with an even rot <= head dim");
  const bool f32 = cos.scalar_type() == at::kFloat;
  TORCH_CHECK(f32 || cos.scalar_type() == at::kBFloat16, "qwenkit rope_: cos/sin must be float32 or bfloat16");
  const int64_t rot = cos.size(2), half = rot / 2;
  at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  auto bf = [](uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; };
  auto r = [&](float v) { return bf(f32_to_bf16(v)); };
  uint16_t* xp = reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>());
  const float* cf = f32 ? cc.data_ptr<float>() : nullptr;
  const float* sf = f32 ? sc.data_ptr<float>() : nullptr;
  const uint16_t* cb = f32 ? nullptr : reinterpret_cast<const uint16_t*>(cc.data_ptr<at::BFloat16>());
  const uint16_t* sb = f32 ? nullptr : reinterpret_cast<const uint16_t*>(sc.data_ptr<at::BFloat16>());
  parallel_for(0, B * T, row_grain(NH * rot), [&](int64_t r0, int64_t r1) {
    std::vector<float> c(rot), sn(rot), h(rot);
    for (int64_t bt = r0; bt < r1; ++bt) {
      const int64_t b = bt / T, t = bt % T, o = bt * rot;
      for (int64_t i = 0; i < rot; ++i) {
        c[i] = f32 ? cf[o + i] : bf(cb[o + i]);
        sn[i] = f32 ? sf[o + i] : bf(sb[o + i]);
      }
      for (int64_t hd = 0; hd < NH; ++hd) {
        uint16_t* v = xp + b * x.stride(0) + t * x.stride(1) + hd * x.stride(2);
        if (!f32 && half % 16 == 0) {  // the same roundings, 16 features at a time
          for (int64_t j = 0; j < half; j += 16) {
            const __m512 a = load_bf16_as_f32(v + j), bb = load_bf16_as_f32(v + half + j);
            const __m512 c1 = _mm512_loadu_ps(c.data() + j), c2 = _mm512_loadu_ps(c.data() + half + j);
            const __m512 s1 = _mm512_loadu_ps(sn.data() + j), s2 = _mm512_loadu_ps(sn.data() + half + j);
            const __m512 y1 = round_bf16(_mm512_sub_ps(round_bf16(_mm512_mul_ps(a, c1)), round_bf16(_mm512_mul_ps(bb, s1))));
            const __m512 y2 = round_bf16(_mm512_add_ps(round_bf16(_mm512_mul_ps(bb, c2)), round_bf16(_mm512_mul_ps(a, s2))));
            store_bf16(v + j, y1);
            store_bf16(v + half + j, y2);
          }
          continue;
        }
        for (int64_t i = 0; i < rot; ++i) h[i] = bf(v[i]);
        for (int64_t i = 0; i < rot; ++i) {
          const float other = i < half ? -h[i + half] : h[i - half];  // rotate_half: (-x2, x1)
          const float y = f32 ? h[i] * c[i] + other * sn[i] : r(r(h[i] * c[i]) + r(other * sn[i]));
          v[i] = f32_to_bf16(y);
        }
      }
    }
  });
}
