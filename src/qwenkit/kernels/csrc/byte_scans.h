// byte_scans.h: one pass over a buffer's bytes: the bandwidth probe and the cache checksum.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// Reads every byte of t once (xor of its 64-byte lines): the memory-bandwidth probe of the benchmark.
int64_t stream_read(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "qwenkit stream_read: t must be a contiguous CPU tensor");
  const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
  const int64_t lines = t.nbytes() / 64;
  std::atomic<int64_t> folded{0};
  parallel_for(0, lines, 4096, [&](int64_t l0, int64_t l1) {
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    int64_t l = l0;
    for (; l + 2 <= l1; l += 2) {
      a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + l * 64));
      a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + l * 64 + 64));
    }
    if (l < l1) a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + l * 64));
    folded.fetch_xor(_mm512_reduce_or_epi64(_mm512_xor_si512(a0, a1)), std::memory_order_relaxed);
  });
  return folded.load();
}

// prepared_cache.checksum's function of a storage's bytes, in one pass on every thread: the sum (mod 2^64)
// of its little-endian 64-bit words plus its trailing bytes (fewer than 8), and the XOR of the words, as
// int64 bit patterns. numpy's two reductions took 0.3 s of a 1.5B model's 0.54 s start from the cache.
std::tuple<int64_t, int64_t> checksum_words(const at::Tensor& bytes) {
  TORCH_CHECK(bytes.device().is_cpu() && bytes.scalar_type() == at::kByte && bytes.is_contiguous(),
              "qwenkit checksum_words: bytes must be a contiguous CPU uint8 tensor");
  const uint8_t* p = bytes.data_ptr<uint8_t>();
  const int64_t n = bytes.numel(), words = n / 8;
  std::atomic<uint64_t> sum{0}, folded{0};
  parallel_for(0, words, 1 << 16, [&](int64_t w0, int64_t w1) {
    uint64_t s = 0, x = 0;
    for (int64_t i = w0; i < w1; ++i) {
      uint64_t v;
      std::memcpy(&v, p + 8 * i, 8);
      s += v;
      x ^= v;
    }
    sum.fetch_add(s, std::memory_order_relaxed);
    folded.fetch_xor(x, std::memory_order_relaxed);
  });
  uint64_t s = sum.load();
  for (int64_t i = words * 8; i < n; ++i) s += p[i];
  return {int64_t(s), int64_t(folded.load())};
}
