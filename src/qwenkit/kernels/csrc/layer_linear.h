// layer_linear.h: one linear layer as the decode-step ops read it from their argument lists, and run.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// One linear layer, read from decode_layer's argument lists.
struct LayerLinear {
  int64_t bits = 16;  // 16: bf16 tiles (linear_bf16); 8 / 5 / 4: integer codes (linear_int8/5/4); 6: Q6_K
  at::Tensor w, scale, shift, bias;  // shift, bias: undefined when absent
  int64_t group_size = 0, N = 0, zero_point = 0;
  bool bias_after_rounding = false;  // QuantizedLinear adds its bias to the rounded bf16 output
};

inline c10::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// y += r for a bf16 (rows, N) y, contiguous, and r bf16 of y's shape or one (N) row added to every row
// (the residual x + layer(x); Qwen2's q/k/v bias on an integer product): each sum rounded to bf16 as
// torch's bf16 add does, in place; one loop here instead of a torch call with its dispatch and the
// tensor it allocates (~10 us a layer as at::add, a fiftieth of a 0.5B int4 batch-1 step).
void add_bf16_(at::Tensor& y, const at::Tensor& r) {
  const int64_t N = y.dim() == 2 ? y.size(1) : -1;
  const bool row = r.dim() == 1 && r.size(0) == N;
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 && r.scalar_type() == at::kBFloat16 && y.dim() == 2 &&
                  y.is_contiguous() && (row || y.sizes() == r.sizes()),
              "qwenkit decode_layer: add of a bfloat16 ", r.sizes(), " to a bfloat16 ", y.sizes());
  const at::Tensor rc = r.contiguous();
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const uint16_t* rp = reinterpret_cast<const uint16_t*>(rc.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < y.size(0); ++m) {
    uint16_t* ym = yp + m * N;
    const uint16_t* rm = rp + (row ? 0 : m * N);
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 mk = tail_mask16(N - n);
      const __m512 v = _mm512_add_ps(maskz_load_bf16_as_f32(mk, ym + n), maskz_load_bf16_as_f32(mk, rm + n));
      _mm256_mask_storeu_epi16(ym + n, mk, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

at::Tensor run_linear(const LayerLinear& l, const at::Tensor& x) {
  const c10::optional<at::Tensor> in_kernel = l.bias_after_rounding ? c10::nullopt : present(l.bias);
  at::Tensor y;
  if (l.bits == 16)
    y = linear_bf16(x, l.w, in_kernel, l.N);
  else if (l.bits == 8)
    y = linear_int<8>(x, l.w, l.scale, present(l.shift), in_kernel, l.group_size, l.N, l.zero_point);
  else if (l.bits == 6)
    y = linear_int<6>(x, l.w, l.scale, present(l.shift), in_kernel, l.group_size, l.N, l.zero_point);
  else if (l.bits == 5)
    y = linear_int<5>(x, l.w, l.scale, present(l.shift), in_kernel, l.group_size, l.N, l.zero_point);
  else
    y = linear_int<4>(x, l.w, l.scale, present(l.shift), in_kernel, l.group_size, l.N, l.zero_point);
  if (l.bias_after_rounding && l.bias.defined()) add_bf16_(y, l.bias);  // QuantizedLinear's y + bias
  return y;
}

// The linear whose weight (or codes), scale, shift and bias are tensors[first..first + 3] (an empty tensor
// where absent) and whose bits, group size, outputs, zero point and bias mode are c[0..4].
LayerLinear read_linear(at::TensorList tensors, int64_t first, const int64_t* c) {
  const auto t = [&](int k) { const at::Tensor& v = tensors[first + k]; return v.numel() ? v : at::Tensor(); };
  LayerLinear l;
  l.w = tensors[first];
  l.scale = t(1);
  l.shift = t(2);
  l.bias = t(3);
  l.bits = c[0];
  l.group_size = c[1];
  l.N = c[2];
  l.zero_point = c[3];
  l.bias_after_rounding = c[4] == 2;
  return l;
}
