// bf16_amx.h: bf16 x bf16 on AMX (Sapphire Rapids and later).
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

#ifdef __AVX512F__
// bf16 x bf16 on AMX (Sapphire Rapids and later), for every row count
//
// The bf16 tiles' layout (bf16_tiles.h) is AMX's B-tile layout already: for one tile of 16 outputs, 16
// consecutive input pairs are a 16 x 64-byte block (row p: the pair k, k+1 of each output). So AMX reads the
// packed weights as they are. TDPBF16PS does 16 x 16 x 32 products an instruction against vdpbf16ps's 16 x 2.
//
// The chains are bf16_tile's: its two per output (a0 takes the even pair-steps, a1 the odd ones, summed
// at the end) become two accumulator tiles, one fed the even input pairs and one the odd. The B tiles
// take every other 64-byte row (stride 128); the A tiles read x rearranged once per call so that each
// 32-pair block holds its 16 even pairs, then its 16 odd ones. Still AMX's adder rounds its own way
// (tdpbf16ps does not round as a chain of vdpbf16ps would), so a row's result on AMX is not always the
// vector tiles' one. Hence every row of a layer takes the same path, whatever M: a request's results
// never depend on what shares its step. That costs nothing: with tiles of M rows when M < 16 and the
// weight stream prefetched ahead, one row streams the weights at 92-98% of the read bandwidth against
// the vector tiles' 83-85%, and 16 rows at 75-83% against 31-36% (Xeon, bench_cpu_kernels.py).
//
// Tiles: tmm0-3 accumulators (even/odd x two 16-row blocks), tmm4-5 x, tmm6-7 weights; all 16 x 64 B.

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

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

// x (M, K) -> its A tiles, each r x 64 bytes contiguous (r = min(rows, 16), rows from amx_padded_rows,
// padding rows zero): for block i of r rows and 32-pair step b, the tile of its 16 even pairs at
// amx_a_tile(i, b, 0), the tile of its 16 odd pairs right after. A tile load then reads one contiguous
// kilobyte instead of 16 rows a whole row of x apart; made in parallel, two vpermt2d a 32-pair step, where
// a scalar copy on one thread did it before. 512 rows of Qwen2.5-0.5B's products on the Xeon
// (bench_cpu_kernels.py): 896 x 896 0.79 -> 0.51 ms, 4864 x 896 3.34 -> 2.22 ms.
inline int64_t amx_a_tile(int64_t i, int64_t b, int parity, int64_t blocks, int r) {
  return ((i * blocks + b) * 2 + parity) * r * 16;  // in uint32 (pairs)
}

// Rows of x a thread takes through its run of weight tiles at a time (tiles.h's panels; whole pairs of
// 16-row blocks): each weight tile then meets the panel's tiles of x in L2, not the whole of x in L3. 512
// rows of the 896 x 4864 product, 5.15 -> 3.64 ms (96-row panels; at width 896 up to 576 rows are one).
inline int64_t amx_panel_rows(int64_t K) { return panel_rows(2 * K, 32); }

std::vector<uint32_t> amx_rows(const uint16_t* x, int64_t M, int64_t K, int64_t rows) {
  const int r = int(std::min<int64_t>(rows, 16));
  const int64_t blocks = K / 64;
  std::vector<uint32_t> out(rows * (K / 2));
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  parallel_for(0, rows, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t i = m / r, j = m % r;
      for (int64_t b = 0; b < blocks; ++b) {
        __m512i lo = _mm512_setzero_si512(), hi = lo;
        if (m < M) {
          lo = _mm512_loadu_si512(x + m * K + 64 * b);
          hi = _mm512_loadu_si512(x + m * K + 64 * b + 32);
        }
        uint32_t* row = out.data() + j * 16;
        _mm512_storeu_si512(row + amx_a_tile(i, b, 0, blocks, r), _mm512_permutex2var_epi32(lo, even, hi));
        _mm512_storeu_si512(row + amx_a_tile(i, b, 1, blocks, r), _mm512_permutex2var_epi32(lo, odd, hi));
      }
    }
  });
  return out;
}

__attribute__((target("amx-tile,amx-bf16"))) void amx_bf16_tiles(const uint32_t* xr, int64_t rows, int64_t kp,
                                                                  const uint16_t* w, int64_t t0, int64_t t1,
                                                                  const Output& out) {
  const int r = int(std::min<int64_t>(rows, 16));  // rows of the accumulator and x tiles
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = i < 6 ? r : 16;  // weight tiles: 16 pairs
  _tile_loadconfig(&cfg);
  const int64_t blocks = kp / 64;  // 32-pair steps
  alignas(64) float c[4][16][16];
  const int64_t panel = amx_panel_rows(kp);
  for (int64_t p0 = 0; p0 < rows; p0 += panel) {
    const int64_t p1 = std::min(rows, p0 + panel);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = reinterpret_cast<const uint8_t*>(w + t * kp * kTile);
      for (int64_t m0 = p0; m0 < p1; m0 += 32) {
        const bool two = m0 + 16 < p1;
        const int64_t i0 = m0 / 16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t b = 0; b < blocks; ++b) {
          const uint8_t* wb = tile + b * 2048;  // 32 pairs x 64 bytes
          if (m0 == p0)  // the first pass over this tile reads it from memory; later ones from cache
            for (int l = 0; l < 2048; l += 64)
              _mm_prefetch(reinterpret_cast<const char*>(wb + kAmxPrefetchBytes + l), _MM_HINT_T0);
          _tile_loadd(6, wb, 128);       // the even pairs
          _tile_loadd(7, wb + 64, 128);  // the odd pairs
          _tile_loadd(4, xr + amx_a_tile(i0, b, 0, blocks, r), 64);
          _tile_loadd(5, xr + amx_a_tile(i0, b, 1, blocks, r), 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 5, 7);
          if (two) {
            _tile_loadd(4, xr + amx_a_tile(i0 + 1, b, 0, blocks, r), 64);
            _tile_loadd(5, xr + amx_a_tile(i0 + 1, b, 1, blocks, r), 64);
            _tile_dpbf16ps(2, 4, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        for (int m = 0; m < r; ++m)
          out.store(m0 + m, t * kTile, _mm512_add_ps(_mm512_load_ps(c[0][m]), _mm512_load_ps(c[1][m])));
        if (two) {
          _tile_stored(2, c[2], 64);
          _tile_stored(3, c[3], 64);
          for (int m = 0; m < 16; ++m)
            out.store(m0 + 16 + m, t * kTile, _mm512_add_ps(_mm512_load_ps(c[2][m]), _mm512_load_ps(c[3][m])));
        }
      }
    }
  }
  _tile_release();
}

// linear_bf16 on AMX: tiles split across threads, every row of x against each tile in turn.
void linear_bf16_amx(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t tiles, const Output& out) {
  const int64_t kp = K, rows = amx_padded_rows(M);
  const std::vector<uint32_t> xr = amx_rows(x, M, K, rows);
  const int64_t tile_bytes = kp * kTile * 2;
  const int64_t chunk =
      rows > amx_panel_rows(kp) ? one_run_a_thread(tiles) : (64 * 1024 + tile_bytes - 1) / tile_bytes;
  parallel_for(
      0, tiles, 1, [&](int64_t t0, int64_t t1) { amx_bf16_tiles(xr.data(), rows, kp, w, t0, t1, out); }, chunk);
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
