// int_amx.h: the integer products of many rows (prompts) on AMX-INT8, the vector tiles' results bit for bit.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// Why the results are the vector tiles' exactly: a block's sum of code x activation products is an
// integer either way. The vector tiles start it from -zero_point x sum(q) and add u8 codes times s8
// activations (vpdpbusd); here AMX adds (code - zero_point) times the same activations (tdpbssd), or the
// u8 codes themselves where the zero point is 0 (tdpbsud): the same int32. Everything after it (the block's
// activation scale, the group's weight scale and shift, the bias) is int_tile's float arithmetic in
// int_tile's order. So which path a layer's rows take is a matter of speed alone, and a request's results
// never depend on how many rows share its step.
//
// Layout: AMX's B tile is the packed weights' own layout (per 4 inputs, 64 bytes: 4 codes of each of 16
// outputs), so a block of 32 inputs is one B tile of 8 rows: int8 codes read in place (zero point 0) or
// made signed (128), int4/int5/IQ4 codes unpacked, once per tile and panel of rows, into a thread's
// scratch. The A tiles are x's int8 codes, 16 rows x 32 bytes, each contiguous (512 bytes, 8 whole cache
// lines), copied out of quantize_rows' passes once. A block's 16 x 16 int32 sums are stored to L1 and put
// into the float sums as int_tile's, four blocks behind the tile work (four sum tiles in turn), so AMX
// computes while the vector units scale what it stored before.

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// Rows from which an integer product of BITS-bit codes takes AMX; below, the vector tiles (the same
// results either way). Measured on the Xeon, AMX against the vector tiles, Qwen2.5-0.5B's and
// Qwen3-30B-A3B's expert shapes: int4 0.79-1.07x at 16-24 rows, 0.94-1.16x at 32, 1.00-1.12x at 48;
// Q8_0's int8 0.74-0.94x at 16-24, 0.84-1.00x at 32, 0.91-1.05x at 48, 0.99-1.06x at 64.
constexpr int64_t amx_int_min_rows(int bits) { return bits == 8 ? 64 : 48; }

// AMX-INT8 usable: AMX in use (use_amx, amx_supported) and the CPU has AMX-INT8.
bool amx_int8_on() {
  static const bool int8 = [] {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 25) & 1);
  }();
  return int8 && amx_on();
}

// Whether linear_int<BITS> over M rows with this zero point runs on AMX: every code minus the zero point
// must be an int8 (int4/int5 codes and IQ4's table values always are; int8 codes with zero point 128), or
// the zero point 0 (u8 codes as they are). Q6_K keeps its own tiles.
template <int BITS>
bool amx_int_runs(int64_t zero_point, int64_t M) {
  if (BITS == 6 || M < amx_int_min_rows(BITS) || !amx_int8_on()) return false;
  return BITS != 8 || zero_point == 0 || zero_point == 128;
}

// Rows of x quantize_rows should write for AMX: whole blocks of 16 (the padding rows all zeros).
inline int64_t amx_padded_int_rows(int64_t M) { return (M + 15) / 16 * 16; }

// x's int8 codes as the A tiles read them, from quantize_rows' passes of 8 (an 8 x 8 transpose of 4-byte
// groups per block): block b of rows 16i..16i+15 at (i * K / 32 + b) * 512, row r of it 32 bytes at 32 r.
// Read row by row (K bytes apart), a tile's 16 rows took 16 half-used lines from L2 and at 512 rows were
// the bound. The passes past `rows` real rows are zeros.
void codes_by_block(const QuantizedRows& qr, int64_t rows, std::vector<int8_t>& out) {
  const int64_t K = qr.K, blocks = K / 32, passes = qr.rows / 8, filled = (rows + 7) / 8;
  if (static_cast<int64_t>(out.size()) < qr.rows * K) out.resize(qr.rows * K);
  const auto at = [&](int64_t p, int64_t b) { return out.data() + ((p / 2) * blocks + b) * 512 + (p % 2) * 256; };
  for (int64_t p = filled; p < passes; ++p)
    for (int64_t b = 0; b < blocks; ++b) std::memset(at(p, b), 0, 256);
  parallel_for(0, filled * blocks, row_grain(64, 4096), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / blocks, b = t % blocks;
      const int32_t* src = qr.q.data() + (p * (K / 4) + b * 8) * 8;  // [group j][row r]
      __m256i a[8];
      for (int j = 0; j < 8; ++j) a[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 8 * j));
      transpose8_epi32(a);  // a[r]: row r's 32 codes of the block
      for (int r = 0; r < 8; ++r) _mm256_storeu_si256(reinterpret_cast<__m256i*>(at(p, b) + 32 * r), a[r]);
    }
  });
}

// Tile `tile`'s codes as B tiles, 512 bytes a block: code - zero_point as int8 (IQ4: the table's values).
template <int BITS, bool TABLE>
void signed_codes(const uint8_t* tile, int64_t K, int64_t zero_point, int8_t* out) {
  constexpr int64_t kBlockBytes = 64 * BITS;
  const int64_t blocks = K / 32;
  if constexpr (BITS == 8) {  // zero point 128: flip the top bit
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    for (int64_t i = 0; i < blocks * 8; ++i)
      _mm512_storeu_si512(out + 64 * i, _mm512_xor_si512(_mm512_loadu_si512(tile + 64 * i), flip));
    return;
  }
  const __m512i nibble = _mm512_set1_epi8(0x0f), fifth = _mm512_set1_epi8(0x10);
  const __m512i zp = _mm512_set1_epi8(char(zero_point));
  const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values)));
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = tile + b * kBlockBytes;
    int8_t* ob = out + b * 512;
    const auto quads = [&](auto o_) {  // step o: quad 2o in the low nibbles, 2o + 1 in the high (int_tile's)
      constexpr int o = decltype(o_)::value;
      const __m512i v = _mm512_loadu_si512(wb + o * 64);
      __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      if constexpr (BITS == 5) {
        const __m512i h = _mm512_loadu_si512(wb + 256);
        lo = _mm512_ternarylogic_epi32(high_bit_at_4<2 * o>(h), fifth, lo, 0xEA);
        hi = _mm512_ternarylogic_epi32(high_bit_at_4<2 * o + 1>(h), fifth, hi, 0xEA);
      }
      if constexpr (TABLE) {
        lo = _mm512_shuffle_epi8(table, lo), hi = _mm512_shuffle_epi8(table, hi);
      } else {
        lo = _mm512_sub_epi8(lo, zp), hi = _mm512_sub_epi8(hi, zp);
      }
      _mm512_storeu_si512(ob + (2 * o) * 64, lo);
      _mm512_storeu_si512(ob + (2 * o + 1) * 64, hi);
    };
    quads(std::integral_constant<int, 0>{});
    quads(std::integral_constant<int, 1>{});
    quads(std::integral_constant<int, 2>{});
    quads(std::integral_constant<int, 3>{});
  }
}

// Block b of 16 rows on tiles P (sums, 0-3), 4 + P % 2 (x), 6 + P % 2 (codes), its 16 x 16 int32 sums stored
// to c. Four sum tiles in turn: a tile's next zeroing waits for its store, which waits for its product.
template <int P, bool SIGNED>
__attribute__((target("amx-tile,amx-int8"), always_inline)) inline void amx_int_block(const int8_t* xa,
                                                                                     const int8_t* bw, int64_t b,
                                                                                     int32_t (*c)[16]) {
  // the intrinsics take their tile numbers as literals (they are spelled into the instruction)
#define QK_AMX_INT_BLOCK(S, X, W)                                            \
  _tile_zero(S);                                                              \
  _tile_loadd(X, xa + 512 * b, 32);                                           \
  _tile_loadd(W, bw + 512 * b, 64);                                           \
  if constexpr (SIGNED) _tile_dpbssd(S, X, W); else _tile_dpbsud(S, X, W); \
  _tile_stored(S, c, 64);
  if constexpr (P == 0) {
    QK_AMX_INT_BLOCK(0, 4, 6)
  } else if constexpr (P == 1) {
    QK_AMX_INT_BLOCK(1, 5, 7)
  } else if constexpr (P == 2) {
    QK_AMX_INT_BLOCK(2, 4, 6)
  } else {
    QK_AMX_INT_BLOCK(3, 5, 7)
  }
#undef QK_AMX_INT_BLOCK
}

// Blocks whose sums AMX has stored before the vector units read them: a load right behind a tile store
// waits for the store to reach L1 (37% of the samples sat on the first load after each one, perf), so the
// float arithmetic of block b runs after the tile work of block b + kAmxLag.
constexpr int kAmxLag = 4, kAmxRing = 8;

// 16 rows of x (from m0, two passes of 8) against one tile of 16 outputs whose B tiles are at bw: the block
// sums on AMX, the float arithmetic of int_tile in its order, the rows stored to out. ONE: a group per
// block (GGUF's 32), whose float sums then stay in registers.
template <bool SIGNED, bool ONE, typename S>
__attribute__((target("amx-tile,amx-int8"))) void amx_int_rows16(const QuantizedRows& qr, const int8_t* xrows,
                                                                 const int8_t* bw, const S* ts, const S* th,
                                                                 int64_t group_size, int64_t m0, const Output& out,
                                                                 int64_t n0) {
  const int64_t K = qr.K, blocks = K / 32, groups = qr.groups, blocks_per_group = group_size / 32;
  const float* const xs[2] = {qr.scale.data() + (m0 / 8) * blocks * 8, qr.scale.data() + (m0 / 8 + 1) * blocks * 8};
  const float* const xg[2] = {qr.gsum.data() + (m0 / 8) * groups * 8, qr.gsum.data() + (m0 / 8 + 1) * groups * 8};
  const int8_t* xa = xrows + m0 * K;  // rows m0.. by block (codes_by_block)
  alignas(64) int32_t c[kAmxRing][16][16];
  alignas(64) float fsum[16][16];
  float(*f)[16] = fsum;
  asm("" : "+r"(f));  // ONE aside, the float sums stay in L1 (with the group sums in registers too, both spilled)
  for (int m = 0; m < 16; ++m) _mm512_store_ps(f[m], _mm512_setzero_ps());
  __m512 acc[16];  // ONE: the float sums; else the group's
#pragma GCC unroll 16
  for (int m = 0; m < 16; ++m) acc[m] = _mm512_setzero_ps();
  const auto xm = [&](const float* const (&v)[2], int64_t i, int m) { return _mm512_set1_ps(v[m / 8][i * 8 + m % 8]); };
  int64_t g = 0, j = 0;  // the group of the block the float arithmetic is at, and its place in it (no divisions)
  for (int64_t b = 0; b < blocks + kAmxLag; ++b) {
    if (b < blocks) {
      switch (b % 4) {
        case 0: amx_int_block<0, SIGNED>(xa, bw, b, c[b % kAmxRing]); break;
        case 1: amx_int_block<1, SIGNED>(xa, bw, b, c[b % kAmxRing]); break;
        case 2: amx_int_block<2, SIGNED>(xa, bw, b, c[b % kAmxRing]); break;
        default: amx_int_block<3, SIGNED>(xa, bw, b, c[b % kAmxRing]); break;
      }
    }
    const int64_t e = b - kAmxLag;  // the block whose float arithmetic runs now
    if (e < 0) continue;
    const int32_t(*ce)[16] = c[e % kAmxRing];
    if constexpr (ONE) {  // int_tile's with a group per block: gacc = 0 + sums x scale, f += gacc x sv
      if (th != nullptr) {
        const __m512 sh = load16_f32<S>(th + e * kTile);
#pragma GCC unroll 16
        for (int m = 0; m < 16; ++m) acc[m] = _mm512_fmadd_ps(sh, xm(xg, e, m), acc[m]);
      }
      const __m512 sv = load16_f32<S>(ts + e * kTile);
#pragma GCC unroll 16
      for (int m = 0; m < 16; ++m) {
        const __m512 gsum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(ce[m])), xm(xs, e, m), _mm512_setzero_ps());
        acc[m] = _mm512_fmadd_ps(gsum, sv, acc[m]);
      }
      continue;
    }
    if (j == 0) {
      if (th != nullptr) {
        const __m512 sh = load16_f32<S>(th + g * kTile);
        for (int m = 0; m < 16; ++m) _mm512_store_ps(f[m], _mm512_fmadd_ps(sh, xm(xg, g, m), _mm512_load_ps(f[m])));
      }
#pragma GCC unroll 16
      for (int m = 0; m < 16; ++m) acc[m] = _mm512_setzero_ps();
    }
#pragma GCC unroll 16
    for (int m = 0; m < 16; ++m)
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(ce[m])), xm(xs, e, m), acc[m]);
    if (++j == blocks_per_group) {
      const __m512 sv = load16_f32<S>(ts + g * kTile);
#pragma GCC unroll 16
      for (int m = 0; m < 16; ++m) _mm512_store_ps(f[m], _mm512_fmadd_ps(acc[m], sv, _mm512_load_ps(f[m])));
      j = 0, ++g;
    }
  }
  for (int m = 0; m < 16; ++m) out.store(m0 + m, n0, ONE ? acc[m] : _mm512_load_ps(f[m]));
}

// Tiles [t0, t1) against every row of x, a panel of rows at a time; each tile's codes made B tiles once a
// panel. The tile configuration is this thread's: loaded here, released at the end.
template <int BITS, typename S, bool TABLE>
__attribute__((target("amx-tile,amx-int8"))) void amx_int_tiles(const QuantizedRows& qr, const int8_t* xrows,
                                                                 const uint8_t* codes, const S* scale,
                                                                 const S* shift, int64_t group_size,
                                                                 int64_t zero_point, const Output& out,
                                                                 int64_t t0, int64_t t1, int64_t panel) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = i < 6 ? 16 : 8;               // sums and x: 16 rows; codes: a block's 8 groups of 4 inputs
    cfg.colsb[i] = i == 4 || i == 5 ? 32 : 64;  // x: a block's 32 codes a row
  }
  load_tile_config(cfg);
  const int64_t K = qr.K, groups = qr.groups, tile_bytes = int_tile_bytes(BITS, K);
  const bool unsigned_codes = BITS == 8 && zero_point == 0;  // int8 codes in place (tdpbsud); else made B tiles
  thread_local std::vector<int8_t> scratch;
  if (static_cast<int64_t>(scratch.size()) < K * kTile) scratch.resize(K * kTile);
  for (int64_t p0 = 0; p0 < qr.rows; p0 += panel) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile = codes + t * tile_bytes;
      const S* ts = scale + t * groups * kTile;
      const S* th = shift == nullptr ? nullptr : shift + t * groups * kTile;
      const int8_t* bw = reinterpret_cast<const int8_t*>(tile);
      if (!unsigned_codes) {
        signed_codes<BITS, TABLE>(tile, K, zero_point, scratch.data());
        bw = scratch.data();
      }
      for (int64_t m0 = p0; m0 < std::min(qr.rows, p0 + panel); m0 += 16) {
        const auto rows16 = [&](auto is_signed, auto one) {
          amx_int_rows16<decltype(is_signed)::value, decltype(one)::value, S>(qr, xrows, bw, ts, th, group_size, m0,
                                                                               out, t * kTile);
        };
        if (unsigned_codes)
          group_size == 32 ? rows16(std::false_type{}, std::true_type{}) : rows16(std::false_type{}, std::false_type{});
        else
          group_size == 32 ? rows16(std::true_type{}, std::true_type{}) : rows16(std::true_type{}, std::false_type{});
      }
    }
  }
  _tile_release();
}

// int_run on AMX, for rows quantized by quantize_rows to amx_padded_int_rows(M) rows.
template <int BITS, typename S, bool TABLE = false>
void int_run_amx(const QuantizedRows& qr, int64_t M, const uint8_t* codes, const S* scale, const S* shift, int64_t N,
                 int64_t group_size, int64_t zero_point, const Output& out) {
  thread_local std::vector<int8_t> xrows;
  codes_by_block(qr, M, xrows);
  const int64_t tiles = (N + kTile - 1) / kTile, tile_bytes = int_tile_bytes(BITS, qr.K);
  // AMX reads a row's codes and block scales, about 1.1 K bytes of int_row_bytes' 1.5 K, so panels of
  // twice the vector tiles' rows (~1.5 MB of what it reads) still fit the L2 beside a tile's B tiles,
  // which are then made half as often: 512 rows of the 1,536 x 8,960 product 3-10% faster.
  const int64_t panel = 2 * panel_rows(int_row_bytes(qr), 16);
  const int64_t chunk = qr.rows > panel ? one_run_a_thread(tiles) : (64 * 1024 + tile_bytes - 1) / tile_bytes;
  const int8_t* xp = xrows.data();
  parallel_for(
      0, tiles, 1,
      [&](int64_t t0, int64_t t1) {
        amx_int_tiles<BITS, S, TABLE>(qr, xp, codes, scale, shift, group_size, zero_point, out, t0, t1, panel);
      },
      chunk);
}

// The row count from which integer products of `bits`-bit codes run on AMX, 0 where they never do
// (ops.int_amx_rows).
int64_t int_amx_rows(int64_t bits) { return amx_int8_on() && bits != 6 ? amx_int_min_rows(int(bits)) : 0; }
#else
template <int BITS>
bool amx_int_runs(int64_t, int64_t) {
  return false;
}
inline int64_t amx_padded_int_rows(int64_t M) { return M; }
int64_t int_amx_rows(int64_t) { return 0; }
#endif
