// tiles.h: what every tile kernel shares: the tile size, the output writer, the parallel loop over tiles.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

constexpr int kTile = 16;   // output rows per tile (every packed layout)

// Bytes of one 16-row tile of K inputs at `bits` (6: Q6_K's layout, kQ6BlockBytes per 32 inputs).
inline int64_t int_tile_bytes(int64_t bits, int64_t K) {
  return bits == 6 ? K / 32 * kQ6BlockBytes : K * kTile * bits / 8;
}
constexpr int kMaxMT = 8;   // activation rows per pass over a tile

// The tile after tile t for a pass of `rows` rows to prefetch (prefetch_lines), or nullptr: only full
// passes are compute bound, and the last tile has no next.
inline const uint8_t* next_tile(const uint8_t* tile, int64_t tile_bytes, int64_t t, int64_t N, int64_t rows) {
  return rows >= kMaxMT && t + 1 < (N + kTile - 1) / kTile ? tile + tile_bytes : nullptr;
}

inline __m512i bcast_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Where the tile passes put their results: y (rows, N), bf16 or fp32, contiguous, with the bias (fp32)
// added before the rounding to y's dtype. Each pass stores its rows' 16 outputs straight from its
// registers, and the zero rows that pad a pass are dropped here (a separate pass over an fp32 buffer
// cost 1-4 us a call at 16 rows, most of it reading back what the other thread had written).
class Output {
 public:
  Output(at::Tensor& y, const c10::optional<at::Tensor>& bias)
      : bias_(bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor()),
        b_(bias_.defined() ? bias_.data_ptr<float>() : nullptr),
        bf16_(y.scalar_type() == at::kBFloat16),
        y_(y.data_ptr()),
        rows_(y.size(0)),
        N_(y.size(1)) {}

  // Outputs n0 .. n0 + 15 (those below N) of row m, if m is a real row.
  void store(int64_t m, int64_t n0, __m512 v) const {
    if (m >= rows_) return;
    const __mmask16 mk = tail_mask16(N_ - n0);
    if (b_ != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, b_ + n0));
    if (bf16_)
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y_) + m * N_ + n0, mk, (__m256i)_mm512_cvtneps_pbh(v));
    else
      _mm512_mask_storeu_ps(static_cast<float*>(y_) + m * N_ + n0, mk, v);
  }

 private:
  at::Tensor bias_;  // kept alive for b_
  const float* b_;
  bool bf16_;
  void* y_;
  int64_t rows_, N_;
};

void check_bias(const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == n,
              "qwenkit kernels: bias must be a CPU vector of ", n, " values, got shape ", bias->sizes());
}

// Rows padded to a whole number of passes (1, 2, 4, or multiples of 8), the padding all zeros.
inline int64_t padded_rows(int64_t m) { return m <= kMaxMT ? tile_rows(m) : (m + kMaxMT - 1) / kMaxMT * kMaxMT; }

// x past this many bytes is taken through the weight tiles a panel of rows at a time (half the L2 of the
// Xeons and EPYCs these kernels run on), so each tile meets the panel in L2 rather than all of x in L3.
constexpr int64_t kPanelBytes = 1 << 20;

// Rows of x, `row_bytes` each, in one panel: a multiple of `multiple`, at least one multiple.
inline int64_t panel_rows(int64_t row_bytes, int64_t multiple) {
  return std::max<int64_t>(multiple, kPanelBytes / std::max<int64_t>(1, row_bytes) / multiple * multiple);
}

// Tiles a chunk of a product whose x takes several panels: one run a thread, so each run streams the
// panels once (smaller chunks would each stream all of x again).
inline int64_t one_run_a_thread(int64_t tiles) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return (tiles + threads - 1) / threads;
}

// Runs body(tile index, m0, rows in this pass) over all tiles in parallel, each tile's passes together
// so a tile is read from memory once; chunks of at least 64 KB of weights (a claim is an atomic add,
// on a cache line the thread holds while it works through its own part). row_bytes: what x holds per row
// as the tiles read it; where x is over kPanelBytes each thread takes one run of tiles through it a panel
// of rows at a time (whole pairs of passes: the AVX2 tiles take two passes at once).
template <typename F>
void parallel_tiles(int64_t n, int64_t rows, int64_t tile_bytes, const F& body, int64_t row_bytes = 0) {
  const int64_t tiles = (n + kTile - 1) / kTile, bytes = std::max<int64_t>(1, tile_bytes);
  const int64_t grain = std::max<int64_t>(1, (128 * 1024) / bytes);
  const int64_t fit = panel_rows(row_bytes, 2 * kMaxMT);
  const bool panels = row_bytes > 0 && rows > fit;
  const int64_t panel = panels ? fit : rows;  // one panel: each tile's passes together, as ever
  parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t p0 = 0; p0 < rows; p0 += panel)
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t m0 = p0; m0 < std::min(rows, p0 + panel); m0 += kMaxMT)
          body(t, m0, std::min<int64_t>(kMaxMT, rows - m0));
  }, panels ? one_run_a_thread(tiles) : (64 * 1024 + bytes - 1) / bytes);
}
