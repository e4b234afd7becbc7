// quantize_rtn.h: --quantize's round-to-nearest quantization.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

constexpr float kF16Tiny = 6.103515625e-05f;  // float16's smallest normal value

// quant/quantizer.py's round_scale: a scale rounded *up* to a float16 value (at least kF16Tiny), so the
// group's whole range stays on the grid with the stored scale.
inline float round_scale_up_f16(float scale) {
  c10::Half s16(std::max(scale, kF16Tiny));
  if (float(s16) < scale) s16 = c10::Half(uint16_t(s16.x + 1), c10::Half::from_bits());
  return float(s16);
}

// Round-to-nearest quantization of an (N, K) bf16, fp16 or fp32 weight in groups of `group` inputs (the last
// one shorter when `group` does not divide K), exactly as quant/rtn.py's quantize_weight_rtn computes it
// in torch: per group the range [min(w, 0), max(w, 0)] (symmetric: +-max |w|; an all-zero group [-1, 1]),
// scale = range / (2^bits - 1) in fp32, zero = 2^(bits-1) (symmetric) or round-half-even(-min / scale)
// from that scale, then the scale rounded up to an fp16 value, code = clamp(round(w / scale) + zero, 0,
// 2^bits - 1). Returns codes (N, K) uint8, scales (G, N) fp32, zeros (G, N) int16. One pass a row: torch's
// dozen full passes took 8.5 s of a 0.5B model's `--quantize int4` load.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rtn(const at::Tensor& weight, int64_t bits, int64_t group,
                                                            bool sym) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(weight.dim() == 2 && (dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat),
              "qwenkit quantize_rtn: weight must be (N, K) bfloat16, float16 or float32");
  TORCH_CHECK((bits == 4 || bits == 8) && group > 0, "qwenkit quantize_rtn: bits 4 or 8, a positive group");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), G = (K + group - 1) / group;
  const float maxq = float((1 << bits) - 1);
  at::Tensor codes = at::empty({N, K}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({G, N}, w.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({G, N}, w.options().dtype(at::kShort));
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  int16_t* zp = zeros.data_ptr<int16_t>();
  const void* src = w.data_ptr();
  parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> buffer(K);
    float* __restrict row = buffer.data();  // locals: byte stores below may not alias them (else no SIMD)
    for (int64_t n = n0; n < n1; ++n) {
      if (dtype == at::kBFloat16) {
        const uint16_t* __restrict r = static_cast<const uint16_t*>(src) + n * K;
        for (int64_t k = 0; k < K; ++k) row[k] = c10::detail::f32_from_bits(r[k]);
      } else if (dtype == at::kHalf) {
        const at::Half* __restrict r = static_cast<const at::Half*>(src) + n * K;
        for (int64_t k = 0; k < K; ++k) row[k] = float(r[k]);
      } else {
        std::memcpy(row, static_cast<const float*>(src) + n * K, K * 4);
      }
      uint8_t* __restrict out = cp + n * K;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * group, k1 = std::min(K, k0 + group);
        // the group's min and max in 16 independent lanes (one chain each: vectorized, no latency chain)
        float lo16[16], hi16[16], lo = row[k0], hi = row[k0];
        for (int j = 0; j < 16; ++j) lo16[j] = hi16[j] = row[k0];
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16)
          for (int j = 0; j < 16; ++j) lo16[j] = std::min(lo16[j], row[k + j]), hi16[j] = std::max(hi16[j], row[k + j]);
        for (int j = 0; j < 16; ++j) lo = std::min(lo, lo16[j]), hi = std::max(hi, hi16[j]);
        for (; k < k1; ++k) lo = std::min(lo, row[k]), hi = std::max(hi, row[k]);
        float xmin = std::min(lo, 0.f), xmax = std::max(hi, 0.f);
        if (sym) {
          xmax = std::max(std::fabs(xmin), xmax);
          if (xmin < 0) xmin = -xmax;
        }
        if (xmin == 0 && xmax == 0) xmin = -1.f, xmax = 1.f;
        const float scale = (xmax - xmin) / maxq;
        const float zero = sym ? float(1 << (bits - 1)) : std::nearbyint(-xmin / scale);
        const float step = round_scale_up_f16(scale), top = maxq;
        for (int64_t i = k0; i < k1; ++i)
          out[i] = uint8_t(int32_t(std::min(top, std::max(0.f, std::nearbyint(row[i] / step) + zero))));
        sp[g * N + n] = step;
        zp[g * N + n] = int16_t(zero);
      }
    }
  });
  return {codes, scales, zeros};
}
