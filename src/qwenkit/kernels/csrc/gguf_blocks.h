// gguf_blocks.h: GGUF blocks to integer codes, scales and shifts.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// GGUF blocks -> integer codes, with one scale and shift per 32 weights (checkpoint/gguf_quant.py's
// table, whose numpy decoders are the reference: the same values bit for bit). Q8_0 (ggml type 8), Q4_0 (2),
// Q4_1 (3), Q5_0 (6), Q5_1 (7) and IQ4_NL (20) hold one group a block; Q4_K (12), Q5_K (13) and IQ4_XS (23)
// eight sub-blocks of 32, whose scales (d * sc; IQ4_XS: d * (ls - 32)) and shifts -(dmin * m) are rounded to
// float16 values (kept in fp32 where fp16 has no normal value for them). The IQ4 types' 4-bit indices pick
// int8 values from a fixed table; their codes are those values + 128, Q8_0's zero point.
inline float gguf_f16(const uint8_t* p) { return float(c10::Half(uint16_t(p[0] | (p[1] << 8)), c10::Half::from_bits())); }

inline float as_f16_value(float x) {
  const float r = float(c10::Half(x));
  const bool normal = std::isfinite(r) && (std::fabs(x) >= kF16Tiny || x == 0.f);
  return normal ? r : x;
}

constexpr int64_t gguf_block_size(int64_t qtype) { return qtype == 12 || qtype == 13 || qtype == 23 ? 256 : 32; }
constexpr int64_t gguf_block_bytes(int64_t qtype) {
  return qtype == 8 ? 34 : qtype == 2 ? 18 : qtype == 3 ? 20 : qtype == 6 ? 22 : qtype == 7 ? 24 : qtype == 12 ? 144
       : qtype == 13 ? 176 : qtype == 20 ? 18 : qtype == 23 ? 136 : 0;
}

// One block of type Q: codes (32 or 256), scale and shift (1 or 8).
template <int Q>
inline void gguf_decode_block(const uint8_t* __restrict b, uint8_t* __restrict codes, float* __restrict scale,
                              float* __restrict shift) {
  if constexpr (Q == 8) {  // Q8_0: d, int8 q
    const float d = gguf_f16(b);
    for (int i = 0; i < 32; ++i) codes[i] = b[2 + i] ^ 0x80;
    scale[0] = d, shift[0] = -128.f * d;
  } else if constexpr (Q == 2 || Q == 3) {  // Q4_0: d, nibbles; Q4_1: d, m, nibbles
    const uint8_t* qs = b + (Q == 2 ? 2 : 4);
    for (int i = 0; i < 16; ++i) codes[i] = qs[i] & 0x0F, codes[16 + i] = qs[i] >> 4;
    scale[0] = gguf_f16(b), shift[0] = Q == 2 ? -8.f * scale[0] : gguf_f16(b + 2);
  } else if constexpr (Q == 6 || Q == 7) {  // Q5_0: d, high bits, nibbles (+112); Q5_1: d, m, high bits, nibbles
    const uint8_t* qh = b + (Q == 6 ? 2 : 4);
    const uint32_t high = uint32_t(qh[0]) | uint32_t(qh[1]) << 8 | uint32_t(qh[2]) << 16 | uint32_t(qh[3]) << 24;
    const uint8_t* qs = qh + 4;
    for (int i = 0; i < 32; ++i) {
      const int nib = i < 16 ? qs[i] & 0x0F : qs[i - 16] >> 4;
      codes[i] = uint8_t((nib | ((high >> i) & 1) << 4) + (Q == 6 ? 112 : 0));
    }
    scale[0] = gguf_f16(b);
    shift[0] = Q == 6 ? -128.f * scale[0] : gguf_f16(b + 2);
  } else if constexpr (Q == 20) {  // IQ4_NL: d, nibbles (low: elements 0..15, high: 16..31) indexing the table
    const uint8_t* qs = b + 2;
    for (int i = 0; i < 16; ++i)
      codes[i] = uint8_t(kIq4Values[qs[i] & 0x0F] + kIq4ZeroPoint),
      codes[16 + i] = uint8_t(kIq4Values[qs[i] >> 4] + kIq4ZeroPoint);
    scale[0] = gguf_f16(b), shift[0] = -128.f * scale[0];
  } else if constexpr (Q == 23) {  // IQ4_XS: d, 2 bytes of scale high bits, 4 of low nibbles, 8 runs of IQ4_NL's nibbles
    const float d = gguf_f16(b);
    const uint32_t high = uint32_t(b[2]) | uint32_t(b[3]) << 8;
    const uint8_t* low = b + 4;
    const uint8_t* qs = b + 8;
    for (int j = 0; j < 8; ++j) {
      const int ls = ((low[j / 2] >> (4 * (j % 2))) & 0x0F) | (((high >> (2 * j)) & 0x03) << 4);
      scale[j] = as_f16_value(d * float(ls - 32));
      shift[j] = -128.f * scale[j];
      for (int i = 0; i < 16; ++i) {
        codes[32 * j + i] = uint8_t(kIq4Values[qs[16 * j + i] & 0x0F] + kIq4ZeroPoint);
        codes[32 * j + 16 + i] = uint8_t(kIq4Values[qs[16 * j + i] >> 4] + kIq4ZeroPoint);
      }
    }
  } else {  // Q4_K, Q5_K: d, dmin, 12 bytes of 6-bit scales and minimums, (Q5_K: 32 bytes of high bits,) nibbles
    static_assert(Q == 12 || Q == 13, "unknown GGUF block type");
    const float d = gguf_f16(b), dmin = gguf_f16(b + 2);
    const uint8_t* s = b + 4;
    for (int j = 0; j < 8; ++j) {
      const int sc = j < 4 ? s[j] & 0x3F : (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
      const int m = j < 4 ? s[j + 4] & 0x3F : (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
      scale[j] = as_f16_value(d * float(sc));
      shift[j] = as_f16_value(-(dmin * float(m)));
    }
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + (Q == 12 ? 16 : 48);
    for (int c = 0; c < 4; ++c)
      for (int i = 0; i < 32; ++i) {
        codes[64 * c + i] = qs[32 * c + i] & 0x0F;
        codes[64 * c + 32 + i] = qs[32 * c + i] >> 4;
        if constexpr (Q == 13) {
          codes[64 * c + i] |= ((qh[i] >> (2 * c)) & 1) << 4;
          codes[64 * c + 32 + i] |= ((qh[i] >> (2 * c + 1)) & 1) << 4;
        }
      }
  }
}

template <int Q>
void gguf_decode_rows(const uint8_t* src, int64_t N, int64_t K, uint8_t* codes, float* scale, float* shift) {
  constexpr int64_t block = gguf_block_size(Q), bytes = gguf_block_bytes(Q);
  const int64_t per_row = K / block, groups = K / 32;
  parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> row_scale(groups), row_shift(groups);  // a row's groups, then written down column n
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < per_row; ++b)
        gguf_decode_block<Q>(src + (n * per_row + b) * bytes, codes + n * K + b * block,
                             row_scale.data() + b * (block / 32), row_shift.data() + b * (block / 32));
      for (int64_t g = 0; g < groups; ++g) {
        scale[g * N + n] = row_scale[g];
        shift[g * N + n] = row_shift[g];
      }
    }
  });
}

// (N rows of K weights in GGUF blocks of ggml type `qtype`) -> codes (N, K) uint8, scale and shift
// (K / 32, N) fp32 (AffineWeight's layout: no transposed copies after). One pass, no temporaries: numpy's
// decoders took 3.3-4.8 s of a 1.5B model's load.
std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_gguf_blocks(const at::Tensor& blocks, int64_t qtype, int64_t N,
                                                                  int64_t K) {
  const int64_t block = gguf_block_size(qtype), bytes = gguf_block_bytes(qtype);
  TORCH_CHECK(bytes > 0, "qwenkit decode_gguf_blocks: ggml type ", qtype, " is not decoded to codes");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && N >= 0 && K % block == 0 &&
                  blocks.numel() == N * (K / block) * bytes,
              "qwenkit decode_gguf_blocks: blocks must be N * K / ", block, " contiguous blocks of ", bytes, " bytes");
  at::Tensor codes = at::empty({N, K}, blocks.options());
  at::Tensor scale = at::empty({K / 32, N}, blocks.options().dtype(at::kFloat)), shift = at::empty_like(scale);
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* c = codes.data_ptr<uint8_t>();
  float *sp = scale.data_ptr<float>(), *hp = shift.data_ptr<float>();
  switch (qtype) {
    case 8: gguf_decode_rows<8>(src, N, K, c, sp, hp); break;
    case 2: gguf_decode_rows<2>(src, N, K, c, sp, hp); break;
    case 3: gguf_decode_rows<3>(src, N, K, c, sp, hp); break;
    case 6: gguf_decode_rows<6>(src, N, K, c, sp, hp); break;
    case 7: gguf_decode_rows<7>(src, N, K, c, sp, hp); break;
    case 12: gguf_decode_rows<12>(src, N, K, c, sp, hp); break;
    case 13: gguf_decode_rows<13>(src, N, K, c, sp, hp); break;
    case 20: gguf_decode_rows<20>(src, N, K, c, sp, hp); break;
    default: gguf_decode_rows<23>(src, N, K, c, sp, hp); break;
  }
  return {codes, scale, shift};
}

// A GGUF Q6_K weight (N rows of K / 256 blocks of 210 bytes: 128 of low nibbles, 64 of high bit pairs,
// 16 int8 sub-block scales, the fp16 block scale) -> int8 codes per group of 32 inputs, with exactly the
// values of gguf-py's dequantizer followed by qwenkit's requantize_int8 (checkpoint/gguf_quant.py):
// w = (d * scale) * (q - 32) in fp32, per group s = round_scale(max |w| / 127) (rounded up to an fp16
// value), code = round-half-even(w / s) clamped to +-127, + 128. One pass a row, no float copy of the
// weight (gguf-py's decode and torch's rounding took 14 s and a 0.9 GB float copy for a 1.5B model's
// Q6_K tensors). Returns codes (N, K) uint8 and the scales (K / 32, N) fp32.
std::tuple<at::Tensor, at::Tensor> requantize_q6_k(const at::Tensor& blocks, int64_t N, int64_t K) {
  constexpr int64_t kBlock = 256, kBlockBytes = 210, kGroup = 32;
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && N >= 0 && K % kBlock == 0 &&
                  blocks.numel() == N * (K / kBlock) * kBlockBytes,
              "qwenkit requantize_q6_k: blocks must be N * K / 256 Q6_K blocks of 210 contiguous bytes");
  at::Tensor codes = at::empty({N, K}, blocks.options());
  at::Tensor scales = at::empty({K / kGroup, N}, blocks.options().dtype(at::kFloat));
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    float w[kBlock];
    const int64_t per_row = K / kBlock, groups = K / kGroup;
    std::vector<float> steps(groups);  // a row's scales, then written down column n
    for (int64_t n = n0; n < n1; ++n) {
      uint8_t* __restrict row_codes = cp + n * K;  // locals: the byte stores may not alias them (else no SIMD)
      float* __restrict row_scales = steps.data();
      for (int64_t b = 0; b < per_row; ++b) {
        const uint8_t* __restrict blk = src + (n * per_row + b) * kBlockBytes;
        const uint8_t *ql = blk, *qh = blk + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
        const float d = float(c10::Half(uint16_t(blk[208] | (blk[209] << 8)), c10::Half::from_bits()));
        for (int j = 0; j < 8; ++j) {  // 8 runs of 32 values, in gguf-py's order; a run's shifts are fixed
          const int h = j / 4, jj = j % 4, low_shift = 4 * (jj / 2), high_shift = 2 * jj;
          const uint8_t* __restrict lq = ql + h * 64 + (jj % 2) * 32;
          const uint8_t* __restrict hq = qh + h * 32;
          for (int half = 0; half < 2; ++half) {  // 16 values a sub-block scale
            const float ds = d * float(sc[2 * j + half]);
            for (int i = 16 * half; i < 16 * half + 16; ++i) {
              const int q = ((lq[i] >> low_shift) & 0x0F) | (((hq[i] >> high_shift) & 0x03) << 4);
              w[j * 32 + i] = ds * float(q - 32);
            }
          }
        }
        for (int g = 0; g < kBlock / kGroup; ++g) {
          const float* x = w + g * kGroup;
          float amax = 0.f;
          for (int i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(x[i]));
          const float step = round_scale_up_f16(amax / 127.f);
          uint8_t* __restrict out = row_codes + b * kBlock + g * kGroup;
          for (int i = 0; i < kGroup; ++i)
            out[i] = uint8_t(int32_t(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] / step))) + 128.f));
          row_scales[b * (kBlock / kGroup) + g] = step;
        }
      }
      for (int64_t g = 0; g < groups; ++g) sp[g * N + n] = row_scales[g];
    }
  });
  return {codes, scales};
}
