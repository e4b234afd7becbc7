// int_packing.h: integer codes into the tiles' layout, Q6_K decoding, packed rows back to float.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// (N, K) uint8 codes -> the integer tiles' layout (kernels.ops._tile_codes): per 16-row tile and per 4
// inputs (int8) or 8 (int4), the 16 rows' 4 bytes side by side; int4 holds inputs j and j + 4 of each 8
// as one byte's low and high nibble. int5: each 32 inputs as int4's 256 bytes of low nibbles, then 64
// bytes whose byte 4r + j holds, in bit q, the fifth bit of row r's input 4q + j. Rows past N are zeros. One pass, a tile (at most 16 K bytes of
// output, in L1) at a time: torch's strided copies and ORs of the same took 4.4 s of a 1.5B model's load.
at::Tensor pack_int_tiles(const at::Tensor& codes, int64_t bits) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2, "qwenkit pack_int_tiles: codes must be (N, K) uint8");
  TORCH_CHECK(bits == 8 || bits == 5 || bits == 4, "qwenkit pack_int_tiles: bits must be 8, 5 or 4");
  const int64_t group = bits == 8 ? 4 : bits == 5 ? 32 : 8;
  TORCH_CHECK(codes.size(1) % group == 0, "qwenkit pack_int_tiles: K must be a multiple of ", group);
  const at::Tensor c = codes.contiguous();
  const int64_t N = c.size(0), K = c.size(1), tiles = (N + kTile - 1) / kTile, tile_bytes = K * kTile * bits / 8;
  at::Tensor out = at::empty({tiles, tile_bytes}, c.options());
  const uint8_t* src = c.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint8_t* o = dst + t * tile_bytes;
      if ((t + 1) * kTile > N) std::memset(o, 0, tile_bytes);
      for (int64_t r = 0; r < kTile && t * kTile + r < N; ++r) {
        const uint8_t* in = src + (t * kTile + r) * K;
        if (bits == 8) {
          for (int64_t q = 0; q < K / 4; ++q) std::memcpy(o + (q * kTile + r) * 4, in + 4 * q, 4);
        } else if (bits == 5) {
          for (int64_t b = 0; b < K / 32; ++b) {
            uint8_t* blk = o + b * 320;
            const uint8_t* s = in + 32 * b;
            for (int64_t q = 0; q < 4; ++q)
              for (int j = 0; j < 4; ++j)
                blk[(q * kTile + r) * 4 + j] = uint8_t((s[8 * q + j] & 0x0f) | ((s[8 * q + j + 4] & 0x0f) << 4));
            for (int j = 0; j < 4; ++j) {
              uint8_t high = 0;
              for (int q = 0; q < 8; ++q) high |= uint8_t(((s[4 * q + j] >> 4) & 1) << q);
              blk[256 + 4 * r + j] = high;
            }
          }
        } else {
          for (int64_t q = 0; q < K / 8; ++q) {
            uint8_t* d = o + (q * kTile + r) * 4;
            const uint8_t* s = in + 8 * q;
            for (int j = 0; j < 4; ++j) d[j] = uint8_t(s[j] | (s[j + 4] << 4));
          }
        }
      }
    }
  });
  return out;
}

// (N, K) uint8 codes 0..63 and (K/16, N) int8 sub-block scales of a GGUF Q6_K weight -> its tiles
// (kQ6BlockBytes per 32 inputs, int_tile_bytes). Rows past N are zeros. One pass, a tile at a time.
at::Tensor pack_q6_k_tiles(const at::Tensor& codes, const at::Tensor& sub) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.size(1) % kQ6Group == 0,
              "qwenkit pack_q6_k_tiles: codes must be (N, K) uint8 with K a multiple of ", kQ6Group);
  const int64_t N = codes.size(0), K = codes.size(1), tiles = (N + kTile - 1) / kTile;
  TORCH_CHECK(sub.scalar_type() == at::kChar && sub.dim() == 2 && sub.size(0) == K / 16 && sub.size(1) == N,
              "qwenkit pack_q6_k_tiles: sub-block scales must be (K/16, N) = (", K / 16, ", ", N, ") int8");
  const at::Tensor c = codes.contiguous(), sc = sub.contiguous();
  const int64_t tile_bytes = int_tile_bytes(6, K);
  at::Tensor out = at::empty({tiles, tile_bytes}, c.options());
  const uint8_t* src = c.data_ptr<uint8_t>();
  const int8_t* sp = sc.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint8_t* o = dst + t * tile_bytes;
      if ((t + 1) * kTile > N) std::memset(o, 0, tile_bytes);
      for (int64_t r = 0; r < kTile && t * kTile + r < N; ++r) {
        const int64_t n = t * kTile + r;
        const uint8_t* in = src + n * K;
        for (int64_t b = 0; b < K / 32; ++b) {
          uint8_t* blk = o + b * kQ6BlockBytes;
          const uint8_t* q = in + 32 * b;
          for (int sb = 0; sb < 2; ++sb)  // a sub-block's run: quads 4 sb .. 4 sb + 3
            for (int j = 0; j < 4; ++j) {
              const uint8_t e = q[16 * sb + 12 + j];  // the fourth quad's code, two bits per vector
              for (int v = 0; v < 3; ++v)
                blk[sb * 192 + v * 64 + 4 * r + j] = uint8_t((q[16 * sb + 4 * v + j] & 0x3f) | (((e >> (2 * v)) & 3) << 6));
            }
          blk[384 + r] = uint8_t(sp[(2 * b) * N + n]);
          blk[400 + r] = uint8_t(sp[(2 * b + 1) * N + n]);
        }
      }
    }
  });
  return out;
}

// GGUF Q6_K blocks (N * K / 256 of 210 bytes) -> codes (N, K) uint8 q in 0..63 (the weight is
// d * sc * (q - 32)), the int8 sub-block scales sc (K/16, N) and d (K/256, N) float32: the file's values
// in the order pack_q6_k_tiles takes them, one pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_q6_k(const at::Tensor& blocks, int64_t N, int64_t K) {
  constexpr int64_t kBlockBytes = 210;
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && N >= 0 && K % kQ6Group == 0 &&
                  blocks.numel() == N * (K / kQ6Group) * kBlockBytes,
              "qwenkit decode_q6_k: blocks must be N * K / 256 Q6_K blocks of 210 contiguous bytes");
  at::Tensor codes = at::empty({N, K}, blocks.options());
  at::Tensor sub = at::empty({K / 16, N}, blocks.options().dtype(at::kChar));
  at::Tensor d = at::empty({K / kQ6Group, N}, blocks.options().dtype(at::kFloat));
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  int8_t* sp = sub.data_ptr<int8_t>();
  float* dp = d.data_ptr<float>();
  parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    const int64_t per_row = K / kQ6Group;
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < per_row; ++b) {
        const uint8_t* blk = src + (n * per_row + b) * kBlockBytes;
        const uint8_t *ql = blk, *qh = blk + 128;
        uint8_t* out = cp + n * K + b * kQ6Group;
        for (int j = 0; j < 8; ++j) {  // 8 runs of 32 values, in gguf-py's order (requantize_q6_k's)
          const int h = j / 4, jj = j % 4, low_shift = 4 * (jj / 2), high_shift = 2 * jj;
          const uint8_t* lq = ql + h * 64 + (jj % 2) * 32;
          const uint8_t* hq = qh + h * 32;
          for (int i = 0; i < 32; ++i)
            out[j * 32 + i] = uint8_t(((lq[i] >> low_shift) & 0x0F) | (((hq[i] >> high_shift) & 0x03) << 4));
        }
        for (int s = 0; s < 16; ++s) sp[(b * 16 + s) * N + n] = int8_t(blk[192 + s]);
        dp[b * N + n] = float(c10::Half(uint16_t(blk[208] | (blk[209] << 8)), c10::Half::from_bits()));
      }
    }
  });
  return {codes, sub, d};
}

// Rows `ids` of packed integer weights as fp32, each value (code - zero_point) * scale, then + shift (an
// IQ4 table code: (table byte - 128) * scale),
// rounded in that order as the reference (kernels.dequantize) does. For an embedding that shares a
// packed head's weights: a decode step looks up one row per sequence (torch's ten steps of unpacking
// took 80 us for one row of the bundled model's head).
at::Tensor dequantize_rows(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& shift,
                           const at::Tensor& ids, int64_t bits, int64_t group_size, int64_t K, int64_t N,
                           int64_t zero_point) {
  TORCH_CHECK(bits == 8 || bits == 6 || bits == 5 || bits == 4,
              "qwenkit dequantize_rows: bits must be 8, 6 (Q6_K), 5 or 4, got ", bits);
  check_packed("qwenkit dequantize_rows", bits, K, codes, scale, shift, group_size, N, zero_point);
  const int64_t groups = K / group_size, tile_bytes = int_tile_bytes(bits, K);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "qwenkit dequantize_rows: ids must be 1-D int64");
  const at::Tensor idc = ids.contiguous();
  const int64_t* ip = idc.data_ptr<int64_t>();
  const int64_t R = idc.numel();
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "qwenkit dequantize_rows: row ", ip[i], " outside 0..", N - 1);
  at::Tensor out = at::empty({R, K}, codes.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float z = static_cast<float>(zero_point);
  const bool table = iq4_table(bits, zero_point);  // the codes are IQ4 indices: their table bytes
  auto run = [&](const auto* sp, const auto* hp) {
    for (int64_t i = 0; i < R; ++i) {
      const int64_t t = ip[i] / kTile, r = ip[i] % kTile;
      const uint8_t* tile = cp + t * tile_bytes;
      float* w = op + i * K;
      // each 64 bytes: 4 inputs of the 16 rows (byte 4r + j), or 8 as nibbles (j low, 4 + j high); 5 bits:
      // per 32 inputs, 4 x 64 bytes of nibbles and 64 of fifth bits (pack_int_tiles)
      if (bits == 8)
        for (int64_t c = 0; c < K / 4; ++c)
          for (int64_t j = 0; j < 4; ++j) w[4 * c + j] = static_cast<float>(tile[c * 64 + 4 * r + j]);
      else if (bits == 6)  // (q - 32) x the sub-block's int8 scale here; x d below, as its group scale
        for (int64_t b = 0; b < K / 32; ++b) {
          const uint8_t* blk = tile + b * kQ6BlockBytes;
          for (int64_t v = 0; v < 8; ++v)
            for (int64_t j = 0; j < 4; ++j) {
              const uint8_t* run = blk + (v / 4) * 192 + 4 * r + j;
              const uint8_t code = v % 4 < 3 ? run[(v % 4) * 64] & 0x3f
                                             : (run[0] >> 6) | ((run[64] >> 6) << 2) | ((run[128] >> 6) << 4);
              const float sc = static_cast<float>(static_cast<int8_t>(blk[384 + (v / 4) * 16 + r]));
              w[32 * b + 4 * v + j] = (static_cast<float>(code) - z) * sc;
            }
        }
      else if (bits == 5)
        for (int64_t b = 0; b < K / 32; ++b) {
          const uint8_t* blk = tile + b * 320;
          for (int64_t q = 0; q < 8; ++q)
            for (int64_t j = 0; j < 4; ++j) {
              const uint8_t nib = blk[(q / 2) * 64 + 4 * r + j] >> (4 * (q % 2)) & 0x0f;
              const uint8_t high = (blk[256 + 4 * r + j] >> q) & 1;
              w[32 * b + 4 * q + j] = static_cast<float>(nib | (high << 4));
            }
        }
      else
        for (int64_t c = 0; c < K / 8; ++c)
          for (int64_t j = 0; j < 4; ++j) {
            const uint8_t b = tile[c * 64 + 4 * r + j];
            w[8 * c + j] = static_cast<float>(table ? kIq4Values[b & 0x0f] + kIq4ZeroPoint : b & 0x0f);
            w[8 * c + 4 + j] = static_cast<float>(table ? kIq4Values[b >> 4] + kIq4ZeroPoint : b >> 4);
          }
      for (int64_t g = 0; g < groups; ++g) {
        const float sc = static_cast<float>(sp[(t * groups + g) * kTile + r]);
        float* wg = w + g * group_size;
        if (bits == 6)  // the zero point is already off (Q6_K's sub-block scales)
          for (int64_t k = 0; k < group_size; ++k) wg[k] = wg[k] * sc;
        else
          for (int64_t k = 0; k < group_size; ++k) wg[k] = (wg[k] - z) * sc;
        if (hp != nullptr) {
          const float sh = static_cast<float>(hp[(t * groups + g) * kTile + r]);
          for (int64_t k = 0; k < group_size; ++k) wg[k] = wg[k] + sh;
        }
      }
    }
  };
  if (scale.scalar_type() == at::kFloat)
    run(scale.data_ptr<float>(), shift.has_value() ? shift->data_ptr<float>() : nullptr);
  else
    run(scale.data_ptr<at::Half>(), shift.has_value() ? shift->data_ptr<at::Half>() : nullptr);
  return out;
}
