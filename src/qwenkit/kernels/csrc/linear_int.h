// linear_int.h: linear_int8/int5/int4/q6_k: the integer tiles run over a layer.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// The zero point quantize_rows folds into the activation blocks' starts: the AVX2 int8 tile multiplies
// code - 128, so there the starts carry the other 128 (c - z).q = (c - 128).q + (128 - z) sum(q). The
// AVX-512 and AVX-VNNI tiles multiply the u8 codes themselves.
inline int64_t int8_zero_point(int bits, int64_t zero_point) {
#if defined(__AVX512F__) || defined(QK_AVXVNNI)
  return zero_point;
#else
  return bits == 8 || iq4_table(bits, zero_point) ? zero_point - 128 : zero_point;  // IQ4: int8 codes too
#endif
}

#define QK_TABLE_ARG , TABLE
// Whether passes of 1-4 rows (decode) prefetch the next tile as full passes do. On the Intel Xeon
// (2026-12-04, both ways in alternating processes) it took batch-1 decode of Qwen2.5-0.5B int4 from 72-74
// to 88-91 tok/s, 1.5B int4 23.0-23.3 -> 27.0-27.4, 1.5B int8 16.6 -> 18.2, the bundled Q4_1 model
// 264-272 -> 282-289, a Qwen3-30B-A3B layer's experts 1.04-1.09 -> 0.91-0.95 ms. On a Zen 2 EPYC (AVX2,
// 2026-12-04, benchmarks/bench_decode_prefetch.py, both ways alternating in one process, 7 rounds) the
// bundled model 98.5 -> 109.9 tok/s, Qwen2.5-0.5B int4 37.0 -> 41.2, int8 23.9 -> 28.0, 1.5B int4
// 14.7 -> 17.1, int8 8.8 -> 11.1 (int8 with both halves of a tile in one pass, int_tile). On the Zen 4
// a prefetch 1 KB ahead of each stream had made int8/int4 8-11% slower (docs/cpu-speed.md), so other
// AMD CPUs (Zen 1, 3, 4) leave decode's streams to the hardware prefetchers until measured there.
// decode_prefetch turns it on or off (tests, and A/Bs in one process on a CPU not yet measured).
std::atomic<bool>& decode_prefetch_wanted() {
  static std::atomic<bool> on{__builtin_cpu_is("intel") || __builtin_cpu_is("znver2")};
  return on;
}
inline bool prefetch_decode_tiles() { return decode_prefetch_wanted().load(std::memory_order_relaxed); }

// The op: mode 1 on, 0 off, anything else leaves it; returns whether it is now on.
bool decode_prefetch(int64_t mode) {
  if (mode == 0 || mode == 1) decode_prefetch_wanted().store(mode == 1);
  return prefetch_decode_tiles();
}

// Tile t of a product against rows m0 .. m0 + mt - 1 (one pass; the AVX2 builds take two passes of 8 at
// once, from the pass before): the tile kernel for the codes' width and the pass's rows.
template <int BITS, typename S, bool TABLE = false>
void int_tile_task(const QuantizedRows& qr, const uint8_t* codes, const S* scale, const S* shift, int64_t N,
                   int64_t group_size, const Output& out, int64_t t, int64_t m0, int64_t mt) {
  const int64_t groups = qr.groups, tile_bytes = int_tile_bytes(BITS, qr.K);
  const uint8_t* tile = codes + t * tile_bytes;
  const S* ts = scale + t * groups * kTile;
  const S* th = shift == nullptr ? nullptr : shift + t * groups * kTile;
  const int64_t p = m0 / qr.pass;
  const bool more = t + 1 < (N + kTile - 1) / kTile;
  const uint8_t* next =
      more && prefetch_decode_tiles() ? tile + tile_bytes : next_tile(tile, tile_bytes, t, N, qr.rows);
  if constexpr (BITS == 6) {
    switch (mt) {
      case 1: q6k_tile<S, 1>(qr, p, tile, ts, out, m0, t * kTile, next); break;
      case 2: q6k_tile<S, 2>(qr, p, tile, ts, out, m0, t * kTile, next); break;
      case 4: q6k_tile<S, 4>(qr, p, tile, ts, out, m0, t * kTile, next); break;
      default: q6k_tile<S, 8>(qr, p, tile, ts, out, m0, t * kTile, next); break;
    }
    return;
  }
  switch (mt) {
    case 1: int_tile<BITS, S, 1 QK_TABLE_ARG>(qr, p, tile, ts, th, group_size, out, m0, t * kTile, next); break;
    case 2: int_tile<BITS, S, 2 QK_TABLE_ARG>(qr, p, tile, ts, th, group_size, out, m0, t * kTile, next); break;
    case 4: int_tile<BITS, S, 4 QK_TABLE_ARG>(qr, p, tile, ts, th, group_size, out, m0, t * kTile, next); break;
    default:
#ifndef __AVX512F__
      if (p % 2 == 1) break;  // with the pass before it (int_tile_pair)
      if (m0 + 16 <= qr.rows) {
        int_tile_pair<BITS, S, TABLE>(qr, p, tile, ts, th, group_size, out, m0, t * kTile, next);
        break;
      }
#endif
      int_tile<BITS, S, 8 QK_TABLE_ARG>(qr, p, tile, ts, th, group_size, out, m0, t * kTile, next);
      break;
  }
}

template <int BITS, typename S, bool TABLE = false>
void int_run(const QuantizedRows& qr, const uint8_t* codes, const S* scale, const S* shift, int64_t N,
             int64_t group_size, const Output& out) {
  parallel_tiles(N, qr.rows, int_tile_bytes(BITS, qr.K), [&](int64_t t, int64_t m0, int64_t mt) {
    int_tile_task<BITS, S, TABLE>(qr, codes, scale, shift, N, group_size, out, t, m0, mt);
  }, int_row_bytes(qr));
}
#undef QK_TABLE_ARG

// The checks every integer-weight linear makes of its arguments (weights from prepare_int8/int4).
// The checks of packed integer weights (from prepare_int8/int4) for K inputs and N outputs.
void check_packed(const char* name, int bits, int64_t K, const at::Tensor& codes, const at::Tensor& scale,
                  const c10::optional<at::Tensor>& shift, int64_t group_size, int64_t N, int64_t zero_point) {
  TORCH_CHECK(codes.device().is_cpu() && scale.device().is_cpu(), name, ": tensors must be on the CPU");
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0, name,
              ": group_size must be a multiple of 32 that divides K=", K, ", got ", group_size);
  const int64_t tiles = (N + kTile - 1) / kTile, groups = K / group_size;
  TORCH_CHECK(bits != 6 || (group_size == kQ6Group && zero_point == kQ6ZeroPoint && !shift.has_value()), name,
              ": Q6_K weights have groups of ", kQ6Group, ", zero point ", kQ6ZeroPoint, " and no shift");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2 &&
                  codes.size(0) == tiles && codes.size(1) == int_tile_bytes(bits, K),
              name, ": codes must be contiguous uint8 (", tiles, ", ", int_tile_bytes(bits, K),
              ") from prepare_int", bits, " or prepare_q6_k for N=", N, " and K=", K, ", got ", codes.scalar_type(), " ",
              codes.sizes());
  TORCH_CHECK((scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf) && scale.is_contiguous() &&
                  scale.dim() == 3 && scale.size(0) == tiles && scale.size(1) == groups && scale.size(2) == kTile,
              name, ": scale must be contiguous float32/float16 (", tiles, ", ", groups, ", 16), got ",
              scale.scalar_type(), " ", scale.sizes());
  if (shift.has_value())
    TORCH_CHECK(shift->scalar_type() == scale.scalar_type() && shift->is_contiguous() &&
                    shift->sizes() == scale.sizes(),
                name, ": shift must be like scale, got ", shift->scalar_type(), " ", shift->sizes());
  TORCH_CHECK((zero_point >= 0 && zero_point < (1 << bits)) || iq4_table(bits, zero_point), name,
              ": zero_point must lie in 0..", (1 << bits) - 1, (bits == 4 ? " (or be 128: IQ4 table codes)" : ""),
              ", got ", zero_point);
}

void check_int_args(const char* name, int bits, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                    const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& bias,
                    int64_t group_size, int64_t N, int64_t zero_point) {
  TORCH_CHECK(x.device().is_cpu(), name, ": tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2, name, ": x must be (M, K), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, name,
              ": x must be bfloat16 or float32, got ", x.scalar_type());
  check_packed(name, bits, x.size(1), codes, scale, shift, group_size, N, zero_point);
  check_bias(bias, N);
}

template <int BITS>
at::Tensor linear_int(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                      const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& bias,
                      int64_t group_size, int64_t N, int64_t zero_point) {
  static_assert(BITS == 8 || BITS == 6 || BITS == 5 || BITS == 4);
  const char* name = BITS == 8   ? "qwenkit linear_int8"
                     : BITS == 6 ? "qwenkit linear_q6_k"
                     : BITS == 5 ? "qwenkit linear_int5"
                                 : "qwenkit linear_int4";
  check_int_args(name, BITS, x, codes, scale, shift, bias, group_size, N, zero_point);
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor xc = x.contiguous();
  QuantizedRows& qr = thread_rows();
  const bool amx = amx_int_runs<BITS>(zero_point, M);  // the same results either way (int_amx.h)
  const int64_t padded = amx ? amx_padded_int_rows(M) : padded_rows(M);
  constexpr bool kHalves = BITS == 6;  // Q6_K's sub-blocks of 16 start from their own sums
  if (xc.scalar_type() == at::kFloat)
    quantize_rows(xc.data_ptr<float>(), M, padded, K, group_size, int8_zero_point(BITS, zero_point), qr, kHalves);
  else
    quantize_rows(xc.data_ptr<at::BFloat16>(), M, padded, K, group_size, int8_zero_point(BITS, zero_point), qr,
                  kHalves);
  const Output out(y, bias);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const auto run = [&](auto table) {
    constexpr bool kTable = decltype(table)::value;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (amx) {
      if (scale.scalar_type() == at::kFloat)
        int_run_amx<BITS, float, kTable>(qr, M, cp, scale.data_ptr<float>(),
                                         shift.has_value() ? shift->data_ptr<float>() : nullptr, N, group_size,
                                         zero_point, out);
      else
        int_run_amx<BITS, at::Half, kTable>(qr, M, cp, scale.data_ptr<at::Half>(),
                                            shift.has_value() ? shift->data_ptr<at::Half>() : nullptr, N, group_size,
                                            zero_point, out);
      return;
    }
#endif
    if (scale.scalar_type() == at::kFloat)
      int_run<BITS, float, kTable>(qr, cp, scale.data_ptr<float>(),
                                   shift.has_value() ? shift->data_ptr<float>() : nullptr, N, group_size, out);
    else
      int_run<BITS, at::Half, kTable>(qr, cp, scale.data_ptr<at::Half>(),
                                      shift.has_value() ? shift->data_ptr<at::Half>() : nullptr, N, group_size, out);
  };
  if (iq4_table(BITS, zero_point))
    run(std::true_type{});
  else
    run(std::false_type{});
  return y;
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& bias,
                       int64_t group_size, int64_t N, int64_t zero_point) {
  return linear_int<8>(x, codes, scale, shift, bias, group_size, N, zero_point);
}

at::Tensor linear_q6_k(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& bias,
                       int64_t group_size, int64_t N, int64_t zero_point) {
  return linear_int<6>(x, codes, scale, shift, bias, group_size, N, zero_point);
}

at::Tensor linear_int5(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& bias,
                       int64_t group_size, int64_t N, int64_t zero_point) {
  return linear_int<5>(x, codes, scale, shift, bias, group_size, N, zero_point);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& bias,
                       int64_t group_size, int64_t N, int64_t zero_point) {
  return linear_int<4>(x, codes, scale, shift, bias, group_size, N, zero_point);
}
