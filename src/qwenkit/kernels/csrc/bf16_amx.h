// bf16_amx.h: bf16 x bf16 on AMX (Sapphire Rapids and later).
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

#ifdef __AVX512F__
// bf16 x bf16 on AMX (Sapphire Rapids and later), for every row count
//
// The bf16 tiles' layout (bf16_tiles.h) is AMX's B-tile layout already: for one tile of 16 outputs, 16
// consecutive input pairs are a contiguous 16 x 64-byte block (row p: the pair k, k+1 of each output). So
// AMX reads the packed weights as they are. TDPBF16PS does 16 x 16 x 32 products an instruction against
// vdpbf16ps's 16 x 2.
//
// One chain per output: its 32-input steps in order, one tdpbf16ps each. Four accumulator tiles hold two
// blocks of 16 rows x two tiles of 16 outputs, so a step loads 4 tiles for 4 products, and the A tiles
// are read from x in place (16 rows K * 2 bytes apart). Until 2026-12-04 AMX copied the vector tiles' two
// chains (even and odd input pairs) into two accumulator tiles, which took 6 loads for 4 products, twice
// the drains and a rearranged copy of x; at 512 rows of Qwen2.5-0.5B's products that was 1.3-3.3x slower
// (896 x 896: 0.50 -> 0.32 ms, oneDNN's F.linear 0.32). AMX's adder rounds its own way anyway
// (tdpbf16ps does not round as a chain of vdpbf16ps would), so in both forms about one output in 6,000
// differs from the vector tiles' by a last bit, and AMX is as often the correctly rounded product
// (test_amx.py). Hence every row of a layer takes the same path, whatever M: a request's results never
// depend on what shares its step. That costs nothing: with tiles of M rows when M < 16 and the weight
// stream prefetched ahead, one row streams the weights at 92-98% of the read bandwidth against the vector
// tiles' 83-85%, and 16 rows at 75-83% against 31-36% (Xeon, bench_cpu_kernels.py).
//
// Tiles: tmm0-3 accumulators (row block x output tile), tmm4-5 x, tmm6-7 weights; all up to 16 x 64 B.

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads cfg as the tile configuration. GCC's _tile_loadconfig tells the compiler it reads only 8 bytes of
// the struct, so with constant rows and widths it dropped their stores (prefill_attention's tiles then
// faulted on an all-zero configuration); this names the whole struct as the instruction's operand.
inline void load_tile_config(const TileConfig& cfg) { __asm__ volatile("ldtilecfg %0" ::"m"(cfg)); }

constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // <asm/prctl.h>, not in every libc

// AMX usable: the CPU has AMX-TILE and AMX-BF16 and Linux lets this process use tile data (asked once).
bool amx_supported() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return false;  // AMX-BF16, AMX-TILE
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

std::atomic<bool>& amx_wanted() {  // off until use_amx(true), which ops.py's loader calls unless QWENKIT_AMX=off
  static std::atomic<bool> on{false};
  return on;
}

inline bool amx_on() { return amx_wanted().load(std::memory_order_relaxed) && amx_supported(); }

// How far ahead of its tile loads a pass prefetches the weight stream: at one row, tileloadd alone left
// memory idle (10-14 GB/s against the vector tiles' 18, reads at 21); 8 KiB ahead beat 2 and 4 KiB.
constexpr int64_t kAmxPrefetchBytes = 8192;

// Rows of x as the A tiles read them: M when M < 16 (tiles of M rows), else M rounded up to 16.
inline int64_t amx_padded_rows(int64_t M) { return M < 16 ? M : (M + 15) / 16 * 16; }

// Where the A tiles of x (M, K) are: block i of r rows (r = min(M, 16)) and 32-input step s is r rows of
// 64 bytes, K * 2 bytes apart, read from x itself where the block is whole; the last block, if partial,
// from a copy padded with zero rows.
class XTiles {
 public:
  XTiles(const uint16_t* x, int64_t M, int64_t K) : x_(x), K_(K), whole_(M < 16 ? M : M / 16 * 16) {
    if (whole_ < M) {
      tail_.assign(16 * K, 0);
      std::memcpy(tail_.data(), x + whole_ * K, (M - whole_) * K * 2);
    }
  }
  const uint16_t* at(int64_t i, int64_t s) const {
    const int64_t m = i * 16;
    return (m < whole_ ? x_ + m * K_ : tail_.data() + (m - whole_) * K_) + 32 * s;
  }
  int64_t stride() const { return K_ * 2; }

 private:
  const uint16_t* x_;
  int64_t K_, whole_;
  std::vector<uint16_t> tail_;
};

// Rows of x a thread takes through its run of weight tiles at a time (tiles.h's panels; whole pairs of
// 16-row blocks): each weight tile then meets the panel's tiles of x in L2, not the whole of x in L3. 512
// rows of the 896 x 4864 product, 5.15 -> 3.64 ms (96-row panels; at width 896 up to 576 rows are one).
inline int64_t amx_panel_rows(int64_t K) { return panel_rows(2 * K, 32); }

// Tiles [t0, t1) against every row of x: pairs of weight tiles at a time (the last one alone if their
// number is odd), through x a panel of rows at a time, 32 rows at a time within it.
__attribute__((target("amx-tile,amx-bf16"))) void amx_bf16_tiles(const XTiles& xt, int64_t rows, int64_t kp,
                                                                  const uint16_t* w, int64_t t0, int64_t t1,
                                                                  const Output& out) {
  const int r = int(std::min<int64_t>(rows, 16));  // rows of the accumulator and x tiles
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = i < 6 ? r : 16;  // weight tiles: 16 pairs
  load_tile_config(cfg);
  const int64_t steps = kp / 32, tile_bytes = kp * kTile * 2;
  alignas(64) float c[16][16];
  const int64_t panel = amx_panel_rows(kp);
  for (int64_t p0 = 0; p0 < rows; p0 += panel) {
    const int64_t p1 = std::min(rows, p0 + panel);
    for (int64_t t = t0; t < t1; t += 2) {
      const bool pair = t + 1 < t1;
      const uint8_t* w0 = reinterpret_cast<const uint8_t*>(w) + t * tile_bytes;
      const uint8_t* w1 = w0 + tile_bytes;
      for (int64_t m0 = p0; m0 < p1; m0 += 32) {
        const bool two = m0 + 16 < p1;
        const int64_t i0 = m0 / 16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; ++s) {
          if (m0 == p0)  // the first pass over these tiles reads them from memory; later ones from cache
            for (int l = 0; l < 1024; l += 64) {
              _mm_prefetch(reinterpret_cast<const char*>(w0 + s * 1024 + kAmxPrefetchBytes + l), _MM_HINT_T0);
              if (pair)
                _mm_prefetch(reinterpret_cast<const char*>(w1 + s * 1024 + kAmxPrefetchBytes + l), _MM_HINT_T0);
            }
          _tile_loadd(6, w0 + s * 1024, 64);
          _tile_loadd(4, xt.at(i0, s), xt.stride());
          _tile_dpbf16ps(0, 4, 6);
          if (pair) {
            _tile_loadd(7, w1 + s * 1024, 64);
            _tile_dpbf16ps(1, 4, 7);
          }
          if (two) {
            _tile_loadd(5, xt.at(i0 + 1, s), xt.stride());
            _tile_dpbf16ps(2, 5, 6);
            if (pair) _tile_dpbf16ps(3, 5, 7);
          }
        }
        const auto drain = [&](int64_t m, int64_t n, int nrows) {  // c's rows to the outputs
          for (int j = 0; j < nrows; ++j) out.store(m + j, n, _mm512_load_ps(c[j]));
        };
        _tile_stored(0, c, 64);
        drain(m0, t * kTile, r);
        if (pair) {
          _tile_stored(1, c, 64);
          drain(m0, (t + 1) * kTile, r);
        }
        if (two) {
          _tile_stored(2, c, 64);
          drain(m0 + 16, t * kTile, 16);
          if (pair) {
            _tile_stored(3, c, 64);
            drain(m0 + 16, (t + 1) * kTile, 16);
          }
        }
      }
    }
  }
  _tile_release();
}

// linear_bf16 on AMX: pairs of tiles split across threads, every row of x against each pair in turn.
void linear_bf16_amx(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t tiles, const Output& out) {
  const int64_t kp = K, rows = amx_padded_rows(M), pairs = (tiles + 1) / 2;
  const XTiles xt(x, M, K);
  const int64_t pair_bytes = 2 * kp * kTile * 2;
  const int64_t chunk =
      rows > amx_panel_rows(kp) ? one_run_a_thread(pairs) : (64 * 1024 + pair_bytes - 1) / pair_bytes;
  parallel_for(
      0, pairs, 1,
      [&](int64_t p0, int64_t p1) { amx_bf16_tiles(xt, rows, kp, w, 2 * p0, std::min(tiles, 2 * p1), out); },
      chunk);
}
#endif

bool use_amx(bool on) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)  // the "avx512vnni" level stands for CPUs without AMX
  amx_wanted().store(on);
  return amx_on();
#else
  (void)on;
  return false;
#endif
}
