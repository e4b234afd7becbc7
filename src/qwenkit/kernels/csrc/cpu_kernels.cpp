// qwenkit CPU kernels: matrix-vector products for batch-1..16 decode on AVX-512 (BF16 + VNNI) CPUs.
//
// Decode reads every weight once per token, so these kernels are written around one rule: each weight
// byte comes from memory once per call, for all M activation rows (in passes of up to 8 rows over a
// tile held in cache). At 1-4 rows the arithmetic keeps up with memory; from 8 rows it is the bound, and
// each pass fetches the next tile while it computes, so memory keeps streaming. Threads split the
// output features N, claiming chunks of tiles as they go (parallel_for, torch's thread count).
//
//   linear_bf16(x bf16 (M,K), w (tiles), bias?, N)                 -> (M,N) bf16   (_mm512_dpbf16_ps)
//     (on AMX, _tile_dpbf16ps, where the CPU has it, K % 64 == 0 and use_amx has not turned it off)
//   linear_int8(x (M,K), codes, scale, shift?, bias?, group_size, N, zero_point)   (_mm512_dpbusd_epi32)
//   linear_int4(x (M,K), codes, scale, shift?, bias?, group_size, N, zero_point)
//     (zero_point 128: the 4-bit codes index IQ4's value table, kIq4Values + 128)
//   linear_int5(...), linear_q6_k(...): the same for 5-bit codes and GGUF Q6_K
//     (int5/int4 of 48 rows and more, int8 of 64, on AMX, _tile_dpbssd, where the CPU has AMX-INT8 and AMX is in use)
//   argmax_rows(logits fp32 (M,V)) -> (M,) int64, as torch.argmax(-1) (greedy sampling)
//   widen_rows(logits bf16 (M,V)) -> fp32, as .float(); finite_rows(logits fp32) -> (M,) bool: all finite
//   topk_rows(logits, k) -> values, ids (M, k); logsumexp_rows(logits, scales) -> (M,);
//   sample_cdf_rows(logits, scales, min_ps, us), sample_top_p_rows(logits, scales, top_ps, min_ps, keys)
//   -> (M,) int64: the sampler's passes over whole rows
//   dequantize_rows(codes, scale, shift?, ids, bits, group_size, K, N, zero_point) -> (len(ids), K) fp32:
//   rows of packed integer weights (an embedding lookup in a packed, tied head)
//   stream_read(t) -> int64: xor of every 64-byte line (a memory-bandwidth probe for the benchmark)
//   checksum_words(bytes uint8) -> (sum, xor) of its 64-bit words: the prepared-model cache's checksum
//   pack_int_tiles(codes uint8 (N,K), bits) -> the int8 or int4 tiles below (a load's packing)
//   pack_bf16_tiles(w bf16 (N,K)) -> linear_bf16's tiles (a bf16 checkpoint's packing, at every start)
//   requantize_q6_k(Q6_K blocks, N, K) -> int8 codes (N,K), scales (K/32,N): a GGUF Q6_K weight's load
//   where linear_q6_k does not run; there decode_q6_k(blocks, N, K) -> codes (N,K), sub-block scales
//   (K/16,N) int8, d (K/256,N), and pack_q6_k_tiles(codes, sub) -> linear_q6_k's tiles
//   decode_gguf_blocks(blocks, ggml type, N, K) -> codes (N,K), scale, shift (K/32,N): Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K,
//   IQ4_NL, IQ4_XS
//   quantize_rtn(weight (N,K), bits, group, sym) -> codes (N,K), scales, zeros (G,N): --quantize's rounding
//   lora_add_(y, x, at, bt, slots): served LoRA adapters' updates of a projection's rows, in place
//   rms_norm(x, weight, eps), silu_mul([gate | up]), rope_(x, cos, sin), decode_attention(q, k pool, v pool, gather, positions,
//   scale): the decode step's small ops, one call each instead of several torch kernels
//   prefill_attention(q, k pool, v pool, slots, start, scale): a prompt chunk's causal attention on AMX, keys in place
//   DecodeRun(per-layer weights, K pools, V pools): a run of decoder layers and their KV cache, held once;
//   decode_layers(run, x, slots, gather, positions, cos, sin, adapters?): a decode step through all of them, one
//   call (adapters: each row's served LoRA adapter slot)
//
// Integer weights are w[n,k] = (code[n,k] - zero_point) * scale + shift per group of `group_size` inputs
// (zero_point one integer for the whole matrix: 8 for Q4_0 and symmetric int4, 128 for Q8_0). The
// activations are quantized per row in blocks of 32 to int8 (scale = max|x| / 127), as llama.cpp does
// for its q8 dot products; the shift term uses the sums of those same quantized blocks, so the result is
// exactly dot(w, x_hat) in float and the rounding error of x never gets multiplied by the code offset.
// Packed layout (made by qwenkit/kernels/ops.py), in tiles of 16 output rows (N padded with zero rows):
//   bf16: (N/16, Kp * 16) with Kp = K rounded up to even; per 2 inputs k, k+1, 64 bytes: row r's pair at 4r.
//   int8 codes: (N/16, K * 16) bytes; per 4 inputs k..k+3, 64 bytes: row r's 4 codes at 4r.
//   int4 codes: (N/16, K * 8) bytes; per 8 inputs k..k+7, 64 bytes: byte 4r + i holds row r's code
//               k+i in its low nibble and k+4+i in its high nibble.
//   scale, shift: (N/16, K / group_size, 16) fp32 or fp16 (shift may be absent).
//
// One translation unit: this file's includes, level macros and operator registrations, and the parts it
// includes below in order, each one job (worker_pool.h, tiles.h, bf16_tiles.h, int_tiles_avx2.h, ...).
// A part uses what the parts before it define and is not compiled alone; build.py's cache key reads
// every header here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cpuid.h>
#include <immintrin.h>
#ifndef __AVX512F__
#include "avx2_compat.h"  // build.py's "avx2" and "avxvnni" levels: the AVX-512 intrinsics, on AVX2
#endif
#if defined(__AVX512F__) && !defined(__AVX512BF16__)
#include "avx512_nobf16.h"  // build.py's "avx512vnni" level: AVX-512 and VNNI, bf16 products on FMAs
#endif
// build.py's "avxvnni" level: the AVX2 build plus AVX-VNNI (Intel client cores since Alder Lake), whose
// 256-bit vpdpbusd takes the place of the integer tiles' vpmaddubsw + vpmaddwd + vpaddd.
#if !defined(__AVX512F__) && defined(__AVXVNNI__)
#define QK_AVXVNNI 1
#endif

#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// The parts, in dependency order.
#include "worker_pool.h"
#include "vector_helpers.h"
#include "tiles.h"
#include "bf16_amx.h"
#include "bf16_tiles.h"
#include "int_activations.h"
#include "int_tiles_avx512.h"
#include "int_tiles_avx2.h"
#include "q6k_tiles_avx2.h"
#include "int_amx.h"
#include "linear_int.h"
#include "int_packing.h"
#include "quantize_rtn.h"
#include "gguf_blocks.h"
#include "byte_scans.h"
#include "logit_rows.h"
#include "step_ops.h"
#include "decode_attention.h"
#include "prefill_attention.h"
#include "lora_update.h"
#include "layer_linear.h"
#include "moe_experts.h"
#include "decode_layers.h"

}  // namespace

TORCH_LIBRARY(qwenkit, m) {
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias, int N) -> Tensor");
  m.def("use_amx(bool on) -> bool", &use_amx);  // no tensors: no dispatch key
  m.def("int_amx_rows(int bits) -> int", &int_amx_rows);
  m.def("decode_prefetch(int mode) -> bool", &decode_prefetch);
  m.def(
      "linear_int8(Tensor x, Tensor codes, Tensor scale, Tensor? shift, Tensor? bias, int group_size, int N, int zero_point) "
      "-> Tensor");
  m.def(
      "linear_int4(Tensor x, Tensor codes, Tensor scale, Tensor? shift, Tensor? bias, int group_size, int N, int zero_point) "
      "-> Tensor");
  m.def(
      "linear_q6_k(Tensor x, Tensor codes, Tensor scale, Tensor? shift, Tensor? bias, int group_size, int N, int zero_point) "
      "-> Tensor");
  m.def("pack_q6_k_tiles(Tensor codes, Tensor sub) -> Tensor");
  m.def("decode_q6_k(Tensor blocks, int N, int K) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_int5(Tensor x, Tensor codes, Tensor scale, Tensor? shift, Tensor? bias, int group_size, int N, int zero_point) "
      "-> Tensor");
  m.def("stream_read(Tensor t) -> int");
  m.def("checksum_words(Tensor bytes) -> (int, int)");
  m.def("pack_int_tiles(Tensor codes, int bits) -> Tensor");
  m.def("pack_bf16_tiles(Tensor w) -> Tensor");
  m.def("requantize_q6_k(Tensor blocks, int N, int K) -> (Tensor, Tensor)");
  m.def("decode_gguf_blocks(Tensor blocks, int qtype, int N, int K) -> (Tensor, Tensor, Tensor)");
  m.def("quantize_rtn(Tensor weight, int bits, int group, bool sym) -> (Tensor, Tensor, Tensor)");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("widen_rows(Tensor x) -> Tensor");
  m.def("finite_rows(Tensor x) -> Tensor");
  m.def("topk_rows(Tensor x, int k) -> (Tensor, Tensor)");
  m.def("logsumexp_rows(Tensor x, float[] scales) -> Tensor");
  m.def("sample_cdf_rows(Tensor x, float[] scales, float[] min_ps, float[] us) -> Tensor");
  m.def("sample_top_p_rows(Tensor x, float[] scales, float[] top_ps, float[] min_ps, int[] keys) -> Tensor");
  m.def(
      "dequantize_rows(Tensor codes, Tensor scale, Tensor? shift, Tensor ids, int bits, int group_size, int K, int N, "
      "int zero_point) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor at, Tensor bt, Tensor slots) -> ()");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor gather, Tensor positions, float scale) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor slots, int start, float scale) -> Tensor");
  m.def("prefill_attention_runs(int head_dim) -> bool", &prefill_attention_runs);  // no tensors: no dispatch key
  m.class_<DecodeRun>("DecodeRun")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>>())
      .def("layers", &DecodeRun::layers);
  m.def(
      "decode_layers(__torch__.torch.classes.qwenkit.DecodeRun run, Tensor x, Tensor slots, Tensor gather, "
      "Tensor positions, Tensor cos, Tensor sin, Tensor? adapters) -> Tensor");
  m.def("decode_row_groups(__torch__.torch.classes.qwenkit.DecodeRun run, int rows) -> int", &decode_row_groups);
  m.def("moe_experts(Tensor x, Tensor ids, Tensor weights, Tensor[] tensors, int[] ints) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwenkit, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("linear_int5", &linear_int5);
  m.impl("linear_q6_k", &linear_q6_k);
  m.impl("pack_q6_k_tiles", &pack_q6_k_tiles);
  m.impl("decode_q6_k", &decode_q6_k);
  m.impl("stream_read", &stream_read);
  m.impl("checksum_words", &checksum_words);
  m.impl("pack_int_tiles", &pack_int_tiles);
  m.impl("pack_bf16_tiles", &pack_bf16_tiles);
  m.impl("requantize_q6_k", &requantize_q6_k);
  m.impl("decode_gguf_blocks", &decode_gguf_blocks);
  m.impl("quantize_rtn", &quantize_rtn);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("widen_rows", &widen_rows);
  m.impl("finite_rows", &finite_rows);
  m.impl("topk_rows", &topk_rows);
  m.impl("logsumexp_rows", &logsumexp_rows);
  m.impl("sample_cdf_rows", &sample_cdf_rows);
  m.impl("sample_top_p_rows", &sample_top_p_rows);
  m.impl("dequantize_rows", &dequantize_rows);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("lora_add_", &lora_add_);
  m.impl("rope_", &rope_);
  m.impl("decode_attention", &decode_attention);
  m.impl("prefill_attention", &prefill_attention);
  m.impl("decode_layers", &decode_layers);
  m.impl("moe_experts", &moe_experts);
}
