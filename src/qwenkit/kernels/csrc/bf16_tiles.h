// bf16_tiles.h: bf16 x bf16 -> fp32 on the vector units, linear_bf16 and its packing.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// bf16 x bf16 -> fp32 accumulate
//
// Weights in tiles of 16 rows, "N-major" like the integer ones: each 64-byte vector holds inputs k, k+1
// of the 16 rows, so one dot product instruction advances 16 rows against a broadcast pair of x.

template <int MT>
void bf16_tile(const uint16_t* x, int64_t kp, const uint16_t* tile, const Output& out, int64_t m0, int64_t n0,
               const uint8_t* next) {
  __m512 a0[MT], a1[MT];  // two chains per row to hide the dot product's latency
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
  const int64_t pairs = kp / 2;
  int64_t j = 0;
  for (; j + 2 <= pairs; j += 2) {
    const uint16_t* wp = tile + j * 32;
    prefetch(wp);
    if (next != nullptr) prefetch_lines<128>(next + j * 64);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + 32);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)bcast_pair(x + m * kp + 2 * j), w0);
      a1[m] = _mm512_dpbf16_ps(a1[m], (__m512bh)bcast_pair(x + m * kp + 2 * j + 2), w1);
    }
  }
  if (j < pairs) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(tile + j * 32);
    for (int m = 0; m < MT; ++m) a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)bcast_pair(x + m * kp + 2 * j), w0);
  }
  for (int m = 0; m < MT; ++m) out.store(m0 + m, n0, _mm512_add_ps(a0[m], a1[m]));
}

#ifndef __AVX512F__
// AVX2, passes of 3 rows against both halves of a tile, in bf16_tile's
// arithmetic bit for bit (chain 0 takes the even pairs and chain 1 the odd ones, each pair's odd input
// before its even one, the chains added at the end), with x widened to fp32 once per call. Each widened
// weight vector serves 3 rows and each broadcast both halves: 12 sums and 4 working values fill AVX2's
// 16 registers. Given the same intrinsics GCC needed a 17th and spilled a sum every step, and the loop
// then ran at the store-to-load latency: 33 GMAC/s a core against 45 for this asm on Zen 3 (the
// emulated bf16_tile<8> also 33).
#define QK_BF16_PAIR(off, xo, a0, a1, a2, a3, a4, a5)                                           \
  "vpand " #off "(%[w]), %%ymm15, %%ymm12\n\tvpand " #off "+32(%[w]), %%ymm15, %%ymm13\n\t"      \
  "vbroadcastss " #xo "+4(%[x]), %%ymm14\n\t"                                                  \
  "vfmadd231ps %%ymm12, %%ymm14, %[" #a0 "]\n\tvfmadd231ps %%ymm13, %%ymm14, %[" #a1 "]\n\t"    \
  "vbroadcastss " #xo "+4(%[x],%[st]), %%ymm14\n\t"                                            \
  "vfmadd231ps %%ymm12, %%ymm14, %[" #a2 "]\n\tvfmadd231ps %%ymm13, %%ymm14, %[" #a3 "]\n\t"    \
  "vbroadcastss " #xo "+4(%[x],%[st],2), %%ymm14\n\t"                                          \
  "vfmadd231ps %%ymm12, %%ymm14, %[" #a4 "]\n\tvfmadd231ps %%ymm13, %%ymm14, %[" #a5 "]\n\t"    \
  "vmovdqu " #off "(%[w]), %%ymm12\n\tvmovdqu " #off "+32(%[w]), %%ymm13\n\t"                    \
  "vpslld $16, %%ymm12, %%ymm12\n\tvpslld $16, %%ymm13, %%ymm13\n\t"                            \
  "vbroadcastss " #xo "(%[x]), %%ymm14\n\t"                                                    \
  "vfmadd231ps %%ymm12, %%ymm14, %[" #a0 "]\n\tvfmadd231ps %%ymm13, %%ymm14, %[" #a1 "]\n\t"    \
  "vbroadcastss " #xo "(%[x],%[st]), %%ymm14\n\t"                                              \
  "vfmadd231ps %%ymm12, %%ymm14, %[" #a2 "]\n\tvfmadd231ps %%ymm13, %%ymm14, %[" #a3 "]\n\t"    \
  "vbroadcastss " #xo "(%[x],%[st],2), %%ymm14\n\t"                                            \
  "vfmadd231ps %%ymm12, %%ymm14, %[" #a4 "]\n\tvfmadd231ps %%ymm13, %%ymm14, %[" #a5 "]\n\t"
// Rows m0..m0+2 of xf (rows of kp floats) against one tile, stored through out.
void bf16_tile3(const float* xf, int64_t kp, const uint16_t* tile, const Output& out, int64_t m0, int64_t n0) {
  __m256 a[2][6];  // [chain][row * 2 + half]
  for (int c = 0; c < 2; ++c)
    for (int i = 0; i < 6; ++i) a[c][i] = _mm256_setzero_ps();
  const int64_t pairs = kp / 2;
  const float* x = xf + m0 * kp;
  const uint16_t* w = tile;
  if (pairs >= 2)
    asm("vpcmpeqd %%ymm15, %%ymm15, %%ymm15\n\tvpslld $16, %%ymm15, %%ymm15\n\t"  // 0xffff0000: odd inputs
        "1:\n\t" QK_BF16_PAIR(0, 0, a0, a1, a2, a3, a4, a5) QK_BF16_PAIR(64, 8, b0, b1, b2, b3, b4, b5)
        "add $128, %[w]\n\tadd $16, %[x]\n\tcmp %[w], %[end]\n\tjne 1b\n\t"
        : [a0] "+x"(a[0][0]), [a1] "+x"(a[0][1]), [a2] "+x"(a[0][2]), [a3] "+x"(a[0][3]), [a4] "+x"(a[0][4]),
          [a5] "+x"(a[0][5]), [b0] "+x"(a[1][0]), [b1] "+x"(a[1][1]), [b2] "+x"(a[1][2]), [b3] "+x"(a[1][3]),
          [b4] "+x"(a[1][4]), [b5] "+x"(a[1][5]), [w] "+r"(w), [x] "+r"(x)
        : [end] "r"(tile + pairs / 2 * 64), [st] "r"(kp * 4)
        : "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
  if (pairs % 2 == 1) {  // the last pair, into chain 0
    const __m256i high = _mm256_set1_epi32(int(0xffff0000u));
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w) + 1);
    const __m256 odd[2] = {_mm256_castsi256_ps(_mm256_and_si256(w0, high)),
                           _mm256_castsi256_ps(_mm256_and_si256(w1, high))};
    const __m256 even[2] = {_mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)),
                            _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16))};
    for (int m = 0; m < 3; ++m)
      for (int h = 0; h < 2; ++h) {
        a[0][2 * m + h] = _mm256_fmadd_ps(odd[h], _mm256_broadcast_ss(x + m * kp + 1), a[0][2 * m + h]);
        a[0][2 * m + h] = _mm256_fmadd_ps(even[h], _mm256_broadcast_ss(x + m * kp), a[0][2 * m + h]);
      }
  }
  for (int m = 0; m < 3; ++m)
    out.store(m0 + m, n0,
              __m512{_mm256_add_ps(a[0][2 * m], a[1][2 * m]), _mm256_add_ps(a[0][2 * m + 1], a[1][2 * m + 1])});
}
#undef QK_BF16_PAIR

// linear_bf16 on AVX2 for 3 or more rows: bf16_tile3 over 3 rows at a time and bf16_tile for the 1-2
// left (the same sums), each tile's passes together so a tile is read from memory once.
void linear_bf16_rows3(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t tiles,
                       const Output& out) {
  const int64_t kp = (K + 1) / 2 * 2, full = M / 3 * 3;
  std::vector<float> xf(full * kp, 0.f);  // x widened (exactly) once, not in every tile; K padded with 0
  for (int64_t m = 0; m < full; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const uint32_t bits = static_cast<uint32_t>(x[m * K + k]) << 16;
      std::memcpy(&xf[m * kp + k], &bits, 4);
    }
  std::vector<uint16_t> rest(2 * kp, 0);  // the rows left, as bf16_tile reads them
  for (int64_t m = full; m < M; ++m) std::memcpy(rest.data() + (m - full) * kp, x + m * K, K * 2);
  const int64_t tile_bytes = kp * kTile * 2, grain = std::max<int64_t>(1, (128 * 1024) / tile_bytes);
  parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* tile = w + t * kp * kTile;
      for (int64_t m0 = 0; m0 < full; m0 += 3) bf16_tile3(xf.data(), kp, tile, out, m0, t * kTile);
      if (M - full == 2) bf16_tile<2>(rest.data(), kp, tile, out, full, t * kTile, nullptr);
      if (M - full == 1) bf16_tile<1>(rest.data(), kp, tile, out, full, t * kTile, nullptr);
    }
  }, (64 * 1024 + tile_bytes - 1) / tile_bytes);
}
#endif

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "qwenkit linear_bf16: tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "qwenkit linear_bf16: x and w must be bfloat16, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2, "qwenkit linear_bf16: x must be (M, K), got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), kp = (K + 1) / 2 * 2, tiles = (N + kTile - 1) / kTile;
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(0) == tiles && w.size(1) == kp * kTile,
              "qwenkit linear_bf16: w must be contiguous (", tiles, ", ", kp * kTile, ") from prepare_bf16 for N=", N,
              " and K=", K, ", got ", w.sizes());
  check_bias(bias, N);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const Output out(y, bias);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
#ifdef __AVX512F__
  if (K % 64 == 0 && amx_on()) {  // ops.py's AMX_K_MULTIPLE mirrors this
    linear_bf16_amx(xp, M, K, wp, tiles, out);
    return y;
  }
#else
  // At 4 and 8 rows bf16_tile's own pass is full (no padding rows) and as fast as bf16_tile3's 3 + 1 or
  // 3 + 3 + 2 (2 threads, Zen 3).
  if (M >= 3 && M != 4 && M != 8) {
    linear_bf16_rows3(xp, M, K, wp, tiles, out);
    return y;
  }
#endif
  const int64_t rows = padded_rows(M);
  std::vector<uint16_t> xs(rows * kp, 0);  // rows and K padded with zeros
  for (int64_t m = 0; m < M; ++m) std::memcpy(xs.data() + m * kp, xp + m * K, K * 2);
  parallel_tiles(N, rows, kp * kTile * 2, [&](int64_t t, int64_t m0, int64_t mt) {
    const uint16_t* tile = wp + t * kp * kTile;
    const uint16_t* xm = xs.data() + m0 * kp;
    const uint8_t* next = next_tile(reinterpret_cast<const uint8_t*>(tile), kp * kTile * 2, t, N, rows);
    switch (mt) {
      case 1: bf16_tile<1>(xm, kp, tile, out, m0, t * kTile, next); break;
      case 2: bf16_tile<2>(xm, kp, tile, out, m0, t * kTile, next); break;
      case 4: bf16_tile<4>(xm, kp, tile, out, m0, t * kTile, next); break;
      default: bf16_tile<8>(xm, kp, tile, out, m0, t * kTile, next); break;
    }
  }, kp * 2);
  return y;
}

// (N, K) bf16 -> linear_bf16's tiles: (ceil(N/16), Kp * 16) with Kp = K rounded up to even, each 4 bytes
// inputs 2q, 2q+1 of one of the tile's 16 rows; zero rows pad N, a zero column an odd K. One pass: torch's
// strided copy into that layout took 3 s of every start of a bf16 Qwen2.5-0.5B checkpoint (2026-12-02).
at::Tensor pack_bf16_tiles(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(),
              "qwenkit pack_bf16_tiles: w must be a contiguous (N, K) bfloat16 tensor");
  const int64_t N = w.size(0), K = w.size(1), tiles = (N + kTile - 1) / kTile, pairs = (K + 1) / 2;
  const int64_t tile_values = pairs * 2 * kTile;
  at::Tensor out = at::empty({tiles, tile_values}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint16_t* __restrict o = dst + t * tile_values;
      if ((t + 1) * kTile > N) std::memset(o, 0, tile_values * sizeof(uint16_t));
      for (int64_t r = 0; r < kTile && t * kTile + r < N; ++r) {
        const uint16_t* __restrict in = src + (t * kTile + r) * K;
        for (int64_t q = 0; q < K / 2; ++q) std::memcpy(o + (q * kTile + r) * 2, in + 2 * q, 4);
        if (K % 2) {
          o[((pairs - 1) * kTile + r) * 2] = in[K - 1];
          o[((pairs - 1) * kTile + r) * 2 + 1] = 0;
        }
      }
    }
  });
  return out;
}
