// qwenkit CPU kernels: matrix-vector products for batch-1..16 decode on AVX-512 (BF16 + VNNI) CPUs.
//
// Decode reads every weight once per token, so these kernels are written around one rule: each weight
// byte is loaded once per call, for all M activation rows, and the arithmetic on it is cheap enough to
// keep up with memory. Threads split the output features N (at::parallel_for, torch's thread count).
//
//   linear_bf16(x bf16 (M,K), w bf16 (N,K), bias?)                -> (M,N) bf16   (_mm512_dpbf16_ps)
//   linear_int8(x (M,K), codes u8 (N,Kp), scale, shift?, bias?, group_size, K)     (_mm512_dpbusd_epi32)
//   linear_int4(x (M,K), codes u8 (N,Kp/2), scale, shift?, bias?, group_size, K)
//   stream_read(t) -> int64: xor of every 64-byte line (a memory-bandwidth probe for the benchmark)
//
// Integer weights are w[n,k] = (code[n,k] - zero_point) * scale + shift per group of `group_size` inputs
// (zero_point one integer for the whole matrix: 8 for Q4_0 and symmetric int4, 128 for Q8_0). The
// activations are quantized per row in blocks of 32 to int8 (scale = max|x| / 127), as llama.cpp does
// for its q8 dot products; the shift term uses the sums of those same quantized blocks, so the result is
// exactly dot(w, x_hat) in float and the rounding error of x never gets multiplied by the code offset.
// Packed layouts (made by qwenkit/kernels/ops.py):
//   Kp = K rounded up to 64; codes padded with zero.
//   int4: per chunk of 64 inputs, 32 bytes; byte j holds code[j] (low nibble) and code[j + 32] (high).
//   scale: (N, S) fp32 or fp16. group_size % 64 == 0: S = K / group_size (one per group); otherwise
//          S = Kp / 32 (the group's scale repeated for each block of 32, so a chunk never straddles).
//   shift: (N, K / group_size), same dtype as scale, or absent (symmetric codes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------------
// helpers

inline __m512 load_bf16_as_f32(const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

inline __m512 maskz_load_bf16_as_f32(__mmask16 m, const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename S>
inline float scalar_of(const S* p);
template <>
inline float scalar_of<float>(const float* p) { return *p; }
template <>
inline float scalar_of<at::Half>(const at::Half* p) { return static_cast<float>(*p); }

// Up to 16 scale/shift values as fp32 lanes (zero past `count`).
template <typename S>
inline __m512 maskz_load_f32(__mmask16 m, const S* p);
template <>
inline __m512 maskz_load_f32<float>(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
template <>
inline __m512 maskz_load_f32<at::Half>(__mmask16 m, const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p)));
}

inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

// Rows of x are processed in tiles of a power of two (padding with zero rows), so only five tile
// sizes are compiled per kernel; the padding costs arithmetic, never memory traffic.
inline int64_t tile_rows(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16; }

// Weight rows processed together: more rows per tile when there are few activation rows, so the
// register tile (MT x RT accumulators) stays within the 32 vector registers.
template <int MT>
constexpr int rows_per_tile() { return MT <= 2 ? 4 : MT <= 4 ? 4 : MT <= 8 ? 2 : 1; }

// Split N into row tiles across torch's threads; each task gets at least ~128 KB of weights so small
// matrices do not pay the thread start-up for nothing.
template <typename F>
void parallel_rows(int64_t n, int rt, int64_t row_bytes, const F& body) {
  const int64_t tiles = (n + rt - 1) / rt;
  const int64_t grain = std::max<int64_t>(1, (128 * 1024) / std::max<int64_t>(1, rt * row_bytes));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) body(t * rt);
  });
}

// ---------------------------------------------------------------------------------------------------
// bf16 x bf16 -> fp32 accumulate

template <int MT, int RT>
void bf16_tile(const uint16_t* x, int64_t K, const uint16_t* w, int64_t N, int64_t n0, float* out /* MT x N */) {
  const uint16_t* wr[RT];
  for (int r = 0; r < RT; ++r) wr[r] = w + std::min<int64_t>(n0 + r, N - 1) * K;  // past-the-end rows repeat the last
  __m512 acc[MT][RT];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[RT];
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(wr[r] + k);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  if (k < K) {
    const __mmask32 mk = (__mmask32)((1ull << (K - k)) - 1ull);
    __m512bh wv[RT];
    for (int r = 0; r < RT; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mk, wr[r] + k);
    for (int m = 0; m < MT; ++m) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mk, x + m * K + k);
      for (int r = 0; r < RT; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r)
      if (n0 + r < N) out[m * N + n0 + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int MT>
void bf16_run(const uint16_t* x, int64_t K, const uint16_t* w, int64_t N, float* out) {
  constexpr int RT = rows_per_tile<MT>();
  parallel_rows(N, RT, K * 2, [&](int64_t n0) { bf16_tile<MT, RT>(x, K, w, N, n0, out); });
}

void check_bias(const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == n,
              "qwenkit kernels: bias must be a CPU vector of ", n, " values, got shape ", bias->sizes());
}

// out (Mp, N) fp32 -> y (M, N) in y's dtype, adding the bias.
void finish(const std::vector<float>& acc, int64_t M, int64_t N, const c10::optional<at::Tensor>& bias,
            at::Tensor& y) {
  std::vector<float> b;
  if (bias.has_value()) {
    at::Tensor bf = bias->to(at::kFloat).contiguous();
    b.assign(bf.data_ptr<float>(), bf.data_ptr<float>() + N);
  }
  const bool to_bf16 = y.scalar_type() == at::kBFloat16;
  for (int64_t m = 0; m < M; ++m) {
    const float* a = acc.data() + m * N;
    if (to_bf16) {
      uint16_t* o = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) + m * N;
      for (int64_t n = 0; n < N; ++n) o[n] = f32_to_bf16(a[n] + (b.empty() ? 0.f : b[n]));
    } else {
      float* o = y.data_ptr<float>() + m * N;
      for (int64_t n = 0; n < N; ++n) o[n] = a[n] + (b.empty() ? 0.f : b[n]);
    }
  }
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "qwenkit linear_bf16: tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "qwenkit linear_bf16: x and w must be bfloat16, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "qwenkit linear_bf16: x must be (M, K) and w (N, K), got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "qwenkit linear_bf16: x has ", x.size(1), " inputs but w has ", w.size(1));
  TORCH_CHECK(w.is_contiguous(), "qwenkit linear_bf16: w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_bias(bias, N);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor xc = x.contiguous();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  std::vector<float> acc(M * N);
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int64_t mr = std::min<int64_t>(16, M - m0), mt = tile_rows(mr);
    std::vector<uint16_t> xs(mt * K, 0);  // padded tile of rows
    std::memcpy(xs.data(), reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()) + m0 * K, mr * K * 2);
    std::vector<float> out(mt * N);
    switch (mt) {
      case 1: bf16_run<1>(xs.data(), K, wp, N, out.data()); break;
      case 2: bf16_run<2>(xs.data(), K, wp, N, out.data()); break;
      case 4: bf16_run<4>(xs.data(), K, wp, N, out.data()); break;
      case 8: bf16_run<8>(xs.data(), K, wp, N, out.data()); break;
      default: bf16_run<16>(xs.data(), K, wp, N, out.data()); break;
    }
    std::memcpy(acc.data() + m0 * N, out.data(), mr * N * sizeof(float));
  }
  finish(acc, M, N, bias, y);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// int8 / int4 weights x int8 activations (VNNI u8 x s8 -> s32)

// Activations quantized per row in blocks of 32.
struct QuantizedRows {
  int64_t mt, kp, groups;
  std::vector<int8_t> q;      // (mt, kp)
  std::vector<float> sx;      // (mt, kp / 64, 16): each 64-chunk's two block scales, 8 lanes each
  std::vector<float> gsum;    // (mt, groups): sum of the dequantized x over each weight group
  std::vector<int32_t> zq;    // (mt, kp / 4): -zero_point * (sum of each 4 consecutive q), the dot's start
};

template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t K, int64_t group_size, int64_t zero_point,
                   QuantizedRows& qr) {
  const int64_t kp = qr.kp;
  qr.q.assign(qr.mt * kp, 0);
  qr.sx.assign(qr.mt * (kp / 64) * 16, 0.f);
  qr.gsum.assign(qr.mt * qr.groups, 0.f);
  qr.zq.assign(qr.mt * kp / 4, 0);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < K / 32; ++b) {
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
      int8_t* dst = qr.q.data() + m * kp + b * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q1));
      const int32_t qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      float* s = qr.sx.data() + (m * (kp / 64) + b / 2) * 16 + (b % 2) * 8;
      for (int i = 0; i < 8; ++i) s[i] = d;
      qr.gsum[m * qr.groups + (b * 32) / group_size] += d * static_cast<float>(qsum);
    }
    if (zero_point != 0) {  // (code - z) . q = code . q - z * sum(q), folded into the dot's start value
      const __m512i ones = _mm512_set1_epi8(1), z = _mm512_set1_epi32(-static_cast<int32_t>(zero_point));
      for (int64_t c = 0; c < kp / 64; ++c) {
        const __m512i q = _mm512_loadu_si512(qr.q.data() + m * kp + c * 64);
        const __m512i sum4 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, q);
        _mm512_storeu_si512(qr.zq.data() + m * (kp / 4) + c * 16, _mm512_mullo_epi32(sum4, z));
      }
    }
  }
}

// One 64-input chunk of RT weight rows as 64 unsigned codes each.
template <int BITS>
inline __m512i load_codes(const uint8_t* row, int64_t c) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(row + c * 64);
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 32));
    const __m256i lo_mask = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(v, lo_mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo_mask);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
}

template <int BITS, typename S, bool GROUP64, int MT, int RT>
void int_tile(const QuantizedRows& qr, const uint8_t* codes, const S* scale, const S* shift, int64_t N,
              int64_t group_size, int64_t n0, float* out) {
  const int64_t kp = qr.kp, chunks = kp / 64, groups = qr.groups;
  const int64_t row_bytes = BITS == 8 ? kp : kp / 2;
  const int64_t scales_per_row = GROUP64 ? groups : kp / 32;
  int64_t rows[RT];
  for (int r = 0; r < RT; ++r) rows[r] = std::min<int64_t>(n0 + r, N - 1);
  __m512 acc[MT][RT];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t chunks_per_group = GROUP64 ? group_size / 64 : 1;
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i wv[RT];
    __m512 sv[RT];
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      wv[r] = load_codes<BITS>(codes + rows[r] * row_bytes, c);
      const S* s = scale + rows[r] * scales_per_row;
      if constexpr (GROUP64) {
        sv[r] = _mm512_set1_ps(scalar_of<S>(s + c / chunks_per_group));
      } else {
        sv[r] = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(scalar_of<S>(s + 2 * c)),
                                     _mm512_set1_ps(scalar_of<S>(s + 2 * c + 1)));
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_loadu_si512(qr.q.data() + m * kp + c * 64);
      const __m512 xs = _mm512_loadu_ps(qr.sx.data() + (m * chunks + c) * 16);
      const __m512i start = _mm512_loadu_si512(qr.zq.data() + (m * chunks + c) * 16);
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(start, wv[r], xv);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(xs, sv[r]), acc[m][r]);
      }
    }
  }
  if (shift != nullptr) {  // + sum_g shift[n, g] * sum(x_hat over group g)
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 mk = tail_mask16(groups - g);
      for (int r = 0; r < RT; ++r) {
        const __m512 sh = maskz_load_f32<S>(mk, shift + rows[r] * groups + g);
        for (int m = 0; m < MT; ++m)
          acc[m][r] = _mm512_fmadd_ps(sh, _mm512_maskz_loadu_ps(mk, qr.gsum.data() + m * groups + g), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r)
      if (n0 + r < N) out[m * N + n0 + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int BITS, typename S, bool GROUP64, int MT>
void int_run(const QuantizedRows& qr, const uint8_t* codes, const S* scale, const S* shift, int64_t N,
             int64_t group_size, float* out) {
  constexpr int RT = rows_per_tile<MT>();
  const int64_t row_bytes = BITS == 8 ? qr.kp : qr.kp / 2;
  parallel_rows(N, RT, row_bytes, [&](int64_t n0) {
    int_tile<BITS, S, GROUP64, MT, RT>(qr, codes, scale, shift, N, group_size, n0, out);
  });
}

template <int BITS, typename S, bool GROUP64>
void int_dispatch(const QuantizedRows& qr, const uint8_t* codes, const S* scale, const S* shift, int64_t N,
                  int64_t group_size, float* out) {
  switch (qr.mt) {
    case 1: int_run<BITS, S, GROUP64, 1>(qr, codes, scale, shift, N, group_size, out); break;
    case 2: int_run<BITS, S, GROUP64, 2>(qr, codes, scale, shift, N, group_size, out); break;
    case 4: int_run<BITS, S, GROUP64, 4>(qr, codes, scale, shift, N, group_size, out); break;
    case 8: int_run<BITS, S, GROUP64, 8>(qr, codes, scale, shift, N, group_size, out); break;
    default: int_run<BITS, S, GROUP64, 16>(qr, codes, scale, shift, N, group_size, out); break;
  }
}

template <int BITS>
at::Tensor linear_int(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                      const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& bias,
                      int64_t group_size, int64_t K, int64_t zero_point) {
  const char* name = BITS == 8 ? "qwenkit linear_int8" : "qwenkit linear_int4";
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu() && scale.device().is_cpu(), name,
              ": tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, name, ": x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, name,
              ": x must be bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0, name,
              ": group_size must be a multiple of 32 that divides K=", K, ", got ", group_size);
  const int64_t kp = (K + 63) / 64 * 64, groups = K / group_size;
  const bool group64 = group_size % 64 == 0;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous() &&
                  codes.size(1) == (BITS == 8 ? kp : kp / 2),
              name, ": codes must be contiguous uint8 (N, ", (BITS == 8 ? kp : kp / 2), ") from prepare_int",
              BITS, ", got ", codes.scalar_type(), " ", codes.sizes());
  const int64_t N = codes.size(0);
  const int64_t scales_per_row = group64 ? groups : kp / 32;
  TORCH_CHECK((scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf) && scale.is_contiguous() &&
                  scale.dim() == 2 && scale.size(0) == N && scale.size(1) == scales_per_row,
              name, ": scale must be contiguous float32/float16 (", N, ", ", scales_per_row, "), got ",
              scale.scalar_type(), " ", scale.sizes());
  if (shift.has_value())
    TORCH_CHECK(shift->scalar_type() == scale.scalar_type() && shift->is_contiguous() && shift->dim() == 2 &&
                    shift->size(0) == N && shift->size(1) == groups,
                name, ": shift must be contiguous ", scale.scalar_type(), " (", N, ", ", groups, "), got ",
                shift->scalar_type(), " ", shift->sizes());
  TORCH_CHECK(zero_point >= 0 && zero_point < (1 << BITS), name, ": zero_point must lie in 0..", (1 << BITS) - 1,
              ", got ", zero_point);
  check_bias(bias, N);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor xc = x.contiguous();
  std::vector<float> acc(M * N);
  QuantizedRows qr;
  qr.kp = kp;
  qr.groups = groups;
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int64_t mr = std::min<int64_t>(16, M - m0);
    qr.mt = tile_rows(mr);
    if (xc.scalar_type() == at::kFloat)
      quantize_rows(xc.data_ptr<float>() + m0 * K, mr, K, group_size, zero_point, qr);
    else
      quantize_rows(xc.data_ptr<at::BFloat16>() + m0 * K, mr, K, group_size, zero_point, qr);
    std::vector<float> out(qr.mt * N);
    if (scale.scalar_type() == at::kFloat) {
      const float* sp = scale.data_ptr<float>();
      const float* hp = shift.has_value() ? shift->data_ptr<float>() : nullptr;
      if (group64) int_dispatch<BITS, float, true>(qr, cp, sp, hp, N, group_size, out.data());
      else int_dispatch<BITS, float, false>(qr, cp, sp, hp, N, group_size, out.data());
    } else {
      const at::Half* sp = scale.data_ptr<at::Half>();
      const at::Half* hp = shift.has_value() ? shift->data_ptr<at::Half>() : nullptr;
      if (group64) int_dispatch<BITS, at::Half, true>(qr, cp, sp, hp, N, group_size, out.data());
      else int_dispatch<BITS, at::Half, false>(qr, cp, sp, hp, N, group_size, out.data());
    }
    std::memcpy(acc.data() + m0 * N, out.data(), mr * N * sizeof(float));
  }
  finish(acc, M, N, bias, y);
  return y;
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& bias,
                       int64_t group_size, int64_t K, int64_t zero_point) {
  return linear_int<8>(x, codes, scale, shift, bias, group_size, K, zero_point);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& bias,
                       int64_t group_size, int64_t K, int64_t zero_point) {
  return linear_int<4>(x, codes, scale, shift, bias, group_size, K, zero_point);
}

// Reads every byte of t once (xor of its 64-byte lines): the memory-bandwidth probe of the benchmark.
int64_t stream_read(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "qwenkit stream_read: t must be a contiguous CPU tensor");
  const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
  const int64_t lines = t.nbytes() / 64;
  std::vector<int64_t> partial(at::get_num_threads() + 1, 0);
  at::parallel_for(0, lines, 4096, [&](int64_t l0, int64_t l1) {
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    int64_t l = l0;
    for (; l + 2 <= l1; l += 2) {
      a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + l * 64));
      a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + l * 64 + 64));
    }
    if (l < l1) a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + l * 64));
    partial[at::get_thread_num()] ^= _mm512_reduce_or_epi64(_mm512_xor_si512(a0, a1));
  });
  int64_t r = 0;
  for (int64_t v : partial) r ^= v;
  return r;
}

}  // namespace

TORCH_LIBRARY(qwenkit, m) {
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def(
      "linear_int8(Tensor x, Tensor codes, Tensor scale, Tensor? shift, Tensor? bias, int group_size, int K, int zero_point) "
      "-> Tensor");
  m.def(
      "linear_int4(Tensor x, Tensor codes, Tensor scale, Tensor? shift, Tensor? bias, int group_size, int K, int zero_point) "
      "-> Tensor");
  m.def("stream_read(Tensor t) -> int");
}

TORCH_LIBRARY_IMPL(qwenkit, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("stream_read", &stream_read);
}
