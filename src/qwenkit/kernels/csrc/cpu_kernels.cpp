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
//   rms_norm(x, weight, eps), silu_mul([gate | up]), rope_(x, cos, sin), decode_attention(q, k pool, v pool, gather, positions,
//   scale): the decode step's small ops, one call each instead of several torch kernels
//   DecodeRun(per-layer weights, K pools, V pools): a run of decoder layers and their KV cache, held once;
//   decode_layers(run, x, slots, gather, positions, cos, sin): a decode step through all of them, one call
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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
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

// ---------------------------------------------------------------------------------------------------
// The kernels' own worker threads

// at::parallel_for runs on OpenMP, and libgomp keeps a team of workers for every thread that starts
// parallel regions. Once two threads have (the one that loaded the model and the engine's driver thread,
// in which `chat` and `serve` step it), libgomp manages more threads than there are cores and its
// workers stop spinning between regions: each region waits for a sleeping worker to wake, about 50 us
// on this machine, some 150 times a decode step. The bundled model decoded at 90 tokens/s in the driver
// thread against 215 in the loading thread. These workers are the kernels' own: one set per process,
// spinning briefly after each region and then sleeping, taken by one caller at a time (a second caller
// thread, or a call from inside a chunk, runs its loop serially).
class WorkerPool {
 public:
  static WorkerPool& get() {
    static std::once_flag once;
    std::call_once(once, [] {
      slot() = new WorkerPool();  // never destroyed: its threads may still be waiting when the process exits
      pthread_atfork(nullptr, nullptr, [] { slot() = new WorkerPool(); });  // a child has none of its threads
    });
    return *slot();
  }

  // f over [begin, end) split as at::parallel_for splits it: at most one chunk per thread (torch's
  // thread count), none smaller than grain, the caller taking the first; an exception reaches the caller.
  template <typename F>
  void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
    if (begin >= end) return;
    const int64_t n = end - begin;
    at::internal::lazy_init_num_threads();  // this thread's count from torch's setting
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), kMaxThreads);
    if (n <= grain || n <= 1 || threads <= 1 || in_chunk() || !busy_.try_lock()) {
      f(begin, end);
      return;
    }
    std::lock_guard<std::mutex> hold(busy_, std::adopt_lock);
    const int64_t g = std::max<int64_t>(grain, 1);
    const int64_t tasks = std::min<int64_t>(threads, (n + g - 1) / g);
    const int64_t chunk = (n + tasks - 1) / tasks;
    grow(tasks - 1);
    job_ = Job{&run_chunk<F>, &f, begin, end, chunk};
    error_ = nullptr;
    remaining_.store(tasks - 1, std::memory_order_relaxed);
    const uint64_t generation = (state_.load(std::memory_order_relaxed) >> 8) + 1;
    state_.store(generation << 8 | static_cast<uint64_t>(tasks), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    in_chunk() = true;
    try {
      f(begin, std::min(end, begin + chunk));
    } catch (...) {
      record(std::current_exception());
    }
    in_chunk() = false;
    while (remaining_.load(std::memory_order_acquire) > 0) _mm_pause();
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static constexpr int64_t kMaxThreads = 255;     // a job's chunks fit the state's low byte
  static constexpr int64_t kSpinNs = 200 * 1000;  // after a region a worker spins this long, then sleeps

  struct Job {
    void (*run)(const void* f, int64_t begin, int64_t end);
    const void* f;
    int64_t begin, end, chunk;
  };

  template <typename F>
  static void run_chunk(const void* f, int64_t begin, int64_t end) {
    (*static_cast<const F*>(f))(begin, end);
  }

  static WorkerPool*& slot() {
    static WorkerPool* pool = nullptr;
    return pool;
  }

  static bool& in_chunk() {
    thread_local bool inside = false;
    return inside;
  }

  void record(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(error_lock_);
    if (!error_) error_ = e;
  }

  // Starts workers up to `workers`, each knowing the generation before the job about to be published.
  void grow(int64_t workers) {
    const uint64_t before = state_.load(std::memory_order_relaxed) >> 8;
    for (; started_ < workers; ++started_) {
      const int64_t index = started_;
      std::thread([this, index, before] { work(index, before); }).detach();
    }
  }

  void work(int64_t index, uint64_t seen) {
    in_chunk() = true;
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kSpinNs);
      for (int64_t spins = 1; (s >> 8) == seen; ++spins) {
        _mm_pause();
        if (spins % 256 == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(sleep_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return (state_.load(std::memory_order_seq_cst) >> 8) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        }
        s = state_.load(std::memory_order_acquire);
      }
      seen = s >> 8;
      if (index + 1 < static_cast<int64_t>(s & 0xff)) {  // this job has a chunk for this worker
        const Job job = job_;
        const int64_t b = job.begin + (index + 1) * job.chunk;
        try {
          if (b < job.end) job.run(job.f, b, std::min(job.end, b + job.chunk));
        } catch (...) {
          record(std::current_exception());
        }
        remaining_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  std::mutex busy_;  // held by the caller of a parallel_for while its job runs
  int64_t started_ = 0;  // worker threads started (detached: they live as long as the process)
  Job job_{};
  std::atomic<uint64_t> state_{0};     // generation << 8 | chunks of the current job
  std::atomic<int64_t> remaining_{0};  // the workers' chunks of the current job not yet done
  std::atomic<int64_t> sleepers_{0};
  std::mutex sleep_;
  std::condition_variable wake_;
  std::mutex error_lock_;
  std::exception_ptr error_;
};

// at::parallel_for, on OpenMP in the process's main thread while no other living thread has called the
// kernels, else on the kernels' own threads (WorkerPool). With the main thread alone, OpenMP's team is
// the only one and spins between regions, and torch's own ops in a step (exp, log and softmax fork even
// for a few hundred values) share it; the kernels' threads spinning beside it would take turns with it
// on the cores. While another thread works (the engine's driver in `chat` and `serve`), OpenMP's workers
// sleep after every region (see WorkerPool), and the kernels use their own.
inline std::atomic<int64_t>& living_other_threads() {
  static std::atomic<int64_t> count{0};
  return count;
}

struct OtherThread {  // counted from a thread's first kernel call until it ends
  OtherThread() { living_other_threads().fetch_add(1, std::memory_order_relaxed); }
  ~OtherThread() { living_other_threads().fetch_sub(1, std::memory_order_relaxed); }
};

inline bool openmp_alone() {
  static const pid_t main_thread = getpid();
  thread_local const pid_t this_thread = static_cast<pid_t>(syscall(SYS_gettid));  // one system call a thread
  if (this_thread == main_thread)
    return living_other_threads().load(std::memory_order_relaxed) == 0;
  thread_local OtherThread counted;
  (void)counted;
  return false;
}

// Runs its chunks under the floating-point mode (MXCSR's rounding, flush-to-zero and denormals-are-zero
// bits) of the thread that made it, restoring the running thread's own after each. A worker thread keeps
// the mode it started with, while the caller's may change later (torch.set_flush_denormal, fesetround,
// a library that sets its own): a chunk's result must not depend on which thread runs it. A caller that
// rounded toward zero (fesetround) after the threads existed got different rows from call to call.
class CallerMode {
 public:
  CallerMode() : mode_(_mm_getcsr() & kControl) {}
  template <typename F>
  void run(const F& f, int64_t begin, int64_t end) const {
    const unsigned int own = _mm_getcsr();
    if ((own & kControl) == mode_) {
      f(begin, end);
      return;
    }
    struct Restore {
      unsigned int csr;
      ~Restore() { _mm_setcsr(csr); }
    } restore{own};
    _mm_setcsr((own & ~kControl) | mode_);  // the status flags stay the thread's
    f(begin, end);
  }

 private:
  static constexpr unsigned int kControl = 0xFFC0;  // DAZ, the exception masks, rounding, FTZ
  unsigned int mode_;
};

// f over [begin, end) in equal parts, one a thread: the regions' fork and join.
template <typename F>
inline void parallel_parts(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const CallerMode mode;
  const auto in_mode = [&](int64_t b, int64_t e) { mode.run(f, b, e); };
  if (openmp_alone())
    at::parallel_for(begin, end, grain, in_mode);
  else
    WorkerPool::get().parallel_for(begin, end, grain, in_mode);
}

// f(i0, i1) over [begin, end) in parts, one a thread as at::parallel_for splits it, each taken in chunks
// of at least `chunk` (about 8 a thread): a thread works through its own part front to back, one
// sequential stream as before, then takes chunks from the fronts of the parts still unfinished. So a
// thread that runs slower (a hybrid CPU's efficiency core, a time slice lost to another process, a
// VM's stolen cycles) has the end of its part done by the others instead of holding up the end of the
// region, as llama.cpp's matrix products claim chunks since 2024. `grain`: the least work worth a
// thread, as at::parallel_for's. Which thread runs a chunk never changes a result: every caller's
// chunks write their own outputs.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f, int64_t chunk = 1) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  at::internal::lazy_init_num_threads();
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (threads <= 1) {
    f(begin, end);
    return;
  }
  struct alignas(64) Part {  // a cache line each: a thread's claims on its own part stay in its cache
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::vector<Part> parts(threads);
  for (int64_t p = 0; p < threads; ++p) {
    parts[p].next.store(begin + n * p / threads, std::memory_order_relaxed);
    parts[p].end = begin + n * (p + 1) / threads;
  }
  const int64_t step = std::max<int64_t>({chunk, n / (8 * threads), 1});
  parallel_parts(0, threads, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t k = 0; k < threads; ++k) {  // its own part, then the others'
        Part& part = parts[(p + k) % threads];
        for (int64_t i0; (i0 = part.next.fetch_add(step, std::memory_order_relaxed)) < part.end;)
          f(i0, std::min(part.end, i0 + step));
      }
  });
}

// ---------------------------------------------------------------------------------------------------
// helpers

// The values IQ4_NL's and IQ4_XS's 4-bit indices stand for (ggml's kvalues_iq4nl). 4-bit codes with zero
// point 128 (no linear 4-bit code has one) are such indices: the weight is (kIq4Values[code] + 128 - 128)
// * scale, the table's bytes + 128 taking the place of the nibbles in the unsigned side of vpdpbusd, so
// IQ4 weights run at 4 bits instead of as int8 codes. AVX2 and AVX-VNNI look the nibbles up into int8
// codes in the int8 tile's layout and run those (the int4 tile's int16 pair sums would overflow on
// bytes up to 241).
constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
constexpr int64_t kIq4ZeroPoint = 128;
inline bool iq4_table(int64_t bits, int64_t zero_point) { return bits == 4 && zero_point == kIq4ZeroPoint; }

// GGUF Q6_K as the kernels hold it ("6 bits"): per 32 inputs of a 16-row tile, two runs of 192 bytes, one
// per sub-block of 16 (quads 4s .. 4s + 3, quad v: inputs 4v .. 4v + 3 of the 16 rows, byte 4r + j), each
// three 64-byte vectors holding the first three quads' 6-bit codes in bits 0-5 and the fourth quad's code
// two bits at a time in their bits 6-7 (low, middle, high pair); then the int8 scales of the two
// sub-blocks for the 16 rows. The code is q (0..63) on zero point 32; the float scale d is per 256 inputs.
constexpr int64_t kQ6BlockBytes = 416, kQ6Group = 256, kQ6ZeroPoint = 32;

// Software prefetch distance in bytes ahead of the weight streams; 0 (the default) issues none. Each
// thread reads its tiles as one sequential stream, which the hardware prefetchers follow on their own:
// on the Zen 4 we measured, prefetching 1-4 KB ahead made a decode step's matrix-vector products 8-25%
// slower (bf16 most), so it is off; -DQK_PREFETCH=N turns it on for a CPU where it pays.
#ifndef QK_PREFETCH
#define QK_PREFETCH 0
#endif
inline void prefetch(const void* p) {
  if constexpr (QK_PREFETCH > 0) _mm_prefetch(static_cast<const char*>(p) + QK_PREFETCH, _MM_HINT_T0);
}

// The next tile of a pass with 8 or more rows, fetched into L2 block by block while this tile is
// worked on. With that many rows a tile's arithmetic takes longer than reading it, the hardware
// prefetchers stop running ahead of the loads, and memory would idle while the cores compute: fetching
// the next tile meanwhile made 16-row products of the 0.5B model 20-25% faster. (At 1-4 rows the passes
// are memory bound and the hardware prefetchers keep up; see QK_PREFETCH.)
template <int64_t BYTES>
inline void prefetch_lines(const uint8_t* p) {
#pragma GCC unroll 8
  for (int64_t l = 0; l < BYTES; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + l), _MM_HINT_T1);
}

inline __m512 load_bf16_as_f32(const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

inline __m512 maskz_load_bf16_as_f32(__mmask16 m, const uint16_t* p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

// 16 floats rounded to bf16 (nearest even, as torch) and widened back.
inline __m512 round_bf16(__m512 v) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store_bf16(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v)); }

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline __mmask16 tail_mask16(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

// Rows of x are processed in tiles of a power of two (padding with zero rows), so only five tile
// sizes are compiled per kernel; the padding costs arithmetic, never memory traffic.
inline int64_t tile_rows(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16; }

// ---------------------------------------------------------------------------------------------------
// bf16 x bf16 -> fp32 accumulate
//
// Weights in tiles of 16 rows, "N-major" like the integer ones: each 64-byte vector holds inputs k, k+1
// of the 16 rows, so one dot product instruction advances 16 rows against a broadcast pair of x.

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

void check_bias(const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == n,
              "qwenkit kernels: bias must be a CPU vector of ", n, " values, got shape ", bias->sizes());
}

// Rows padded to a whole number of passes (1, 2, 4, or multiples of 8), the padding all zeros.
inline int64_t padded_rows(int64_t m) { return m <= kMaxMT ? tile_rows(m) : (m + kMaxMT - 1) / kMaxMT * kMaxMT; }

// Runs body(tile index, m0, rows in this pass) over all tiles in parallel, each tile's passes together
// so a tile is read from memory once; chunks of at least 64 KB of weights (a claim is an atomic add,
// on a cache line the thread holds while it works through its own part).
template <typename F>
void parallel_tiles(int64_t n, int64_t rows, int64_t tile_bytes, const F& body) {
  const int64_t tiles = (n + kTile - 1) / kTile, bytes = std::max<int64_t>(1, tile_bytes);
  const int64_t grain = std::max<int64_t>(1, (128 * 1024) / bytes);
  parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m0 = 0; m0 < rows; m0 += kMaxMT) body(t, m0, std::min<int64_t>(kMaxMT, rows - m0));
  }, (64 * 1024 + bytes - 1) / bytes);
}

#ifdef __AVX512F__
// ---------------------------------------------------------------------------------------------------
// bf16 x bf16 on AMX (Sapphire Rapids and later), for every row count
//
// The bf16 layout above is AMX's B-tile layout already: for one tile of 16 outputs, 16 consecutive
// input pairs are a 16 x 64-byte block (row p: the pair k, k+1 of each output). So AMX reads the packed
// weights as they are. TDPBF16PS does 16 x 16 x 32 products an instruction against vdpbf16ps's 16 x 2.
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

// x (M, K) -> (rows, kp) bf16, rows from amx_padded_rows (padding rows zero), each 32-pair block
// reordered to its even pairs, then its odd pairs.
std::vector<uint32_t> amx_rows(const uint16_t* x, int64_t M, int64_t K, int64_t rows, int64_t kp) {
  std::vector<uint32_t> out(rows * (kp / 2), 0);
  for (int64_t m = 0; m < M; ++m) {
    uint32_t* o = out.data() + m * (kp / 2);
    for (int64_t b = 0; b < kp / 2; b += 32)
      for (int i = 0; i < 32; ++i) {
        uint32_t pair;
        std::memcpy(&pair, x + m * K + 2 * (b + i), 4);
        o[b + (i & 1) * 16 + i / 2] = pair;
      }
  }
  return out;
}

__attribute__((target("amx-tile,amx-bf16"))) void amx_bf16_tiles(const uint32_t* xr, int64_t rows, int64_t kp,
                                                                  const uint16_t* w, int64_t t0, int64_t t1,
                                                                  const Output& out) {
  const int r = int(std::min<int64_t>(rows, 16));  // rows of the accumulator and x tiles
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = i < 6 ? r : 16;  // weight tiles: 16 pairs
  _tile_loadconfig(&cfg);
  const int64_t xstride = kp * 2, blocks = kp / 64;  // bytes per x row; 32-pair steps
  alignas(64) float c[4][16][16];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = reinterpret_cast<const uint8_t*>(w + t * kp * kTile);
    for (int64_t m0 = 0; m0 < rows; m0 += 32) {
      const bool two = m0 + 16 < rows;
      const uint8_t* x0 = reinterpret_cast<const uint8_t*>(xr) + m0 * xstride;
      const uint8_t* x1 = x0 + 16 * xstride;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* wb = tile + b * 2048;  // 32 pairs x 64 bytes
        if (m0 == 0)  // the first pass over this tile reads it from memory; later ones from cache
          for (int l = 0; l < 2048; l += 64)
            _mm_prefetch(reinterpret_cast<const char*>(wb + kAmxPrefetchBytes + l), _MM_HINT_T0);
        _tile_loadd(6, wb, 128);               // the even pairs
        _tile_loadd(7, wb + 64, 128);          // the odd pairs
        _tile_loadd(4, x0 + b * 128, xstride);
        _tile_loadd(5, x0 + b * 128 + 64, xstride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 7);
        if (two) {
          _tile_loadd(4, x1 + b * 128, xstride);
          _tile_loadd(5, x1 + b * 128 + 64, xstride);
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
  _tile_release();
}

// linear_bf16 on AMX: tiles split across threads, every row of x against each tile in turn.
void linear_bf16_amx(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t tiles, const Output& out) {
  const int64_t kp = K, rows = amx_padded_rows(M);
  const std::vector<uint32_t> xr = amx_rows(x, M, K, rows, kp);
  const int64_t tile_bytes = kp * kTile * 2;
  parallel_for(
      0, tiles, 1, [&](int64_t t0, int64_t t1) { amx_bf16_tiles(xr.data(), rows, kp, w, t0, t1, out); },
      (64 * 1024 + tile_bytes - 1) / tile_bytes);
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
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------
// int8 / int4 weights x int8 activations (VNNI u8 x s8 -> s32)
//
// Weights are stored in tiles of 16 output rows, "N-major": one 64-byte vector holds 4 consecutive
// inputs of each of the 16 rows (int8), or 8 of them as nibbles (int4). A dot product instruction then
// advances 16 rows at once against 4 broadcast activation bytes, the int32 sums of a block of 32 inputs
// need no horizontal reduction, and each tile is one sequential stream through memory.

// Activations quantized per row in blocks of 32, laid out for the tile passes: rows go in passes of
// `pass` rows (1, 2, 4 or 8), and within a pass every value is interleaved across its rows (the 4 int8
// codes of inputs 4j..4j+3 of each row side by side, then the next 4 inputs), so one pointer and
// constant offsets reach all of a pass's broadcasts.
struct QuantizedRows {
  int64_t rows = 0, pass = 0, K = 0, groups = 0;
  std::vector<int32_t> q;       // (rows / pass, K / 4, pass): 4 int8 codes each
  std::vector<float> scale;     // (rows / pass, K / 32, pass)
  std::vector<int32_t> start;   // (rows / pass, K / 32, pass): -zero_point * sum(q of the block), the dot's start
  std::vector<float> gsum;      // (rows / pass, groups, pass): sum of the dequantized x over each weight group
  std::vector<int32_t> half;    // (rows / pass, K / 32, pass): -zero_point * sum(q) of each block's first 16
  // Index of row m's entry i of a per-row table with `per_row` entries per row.
  int64_t at(int64_t m, int64_t i, int64_t per_row) const { return ((m / pass) * per_row + i) * pass + m % pass; }
};

// Rows per task of the small row-wise ops: `values` a task (a few thousand), so a 16-row step of a wide
// layer splits across the threads while a small one stays on the calling thread (a fork costs about a us).
inline int64_t row_grain(int64_t per_row, int64_t values = 8192) {
  return std::max<int64_t>(1, values / std::max<int64_t>(1, per_row));
}

// The calling thread's buffers, kept between calls: a decode step quantizes four inputs per layer.
QuantizedRows& thread_rows() {
  thread_local QuantizedRows qr;
  return qr;
}

// Lane r of the result = the largest of a[r]'s 8 lanes (max8_ps) or their sum (sum8_epi32): a transpose
// tree as attn_sum16's (pairs, then 64-bit pairs, then 128-bit halves), 21 instructions for 8 reductions
// instead of 8 dependent chains of 6 that each end in a scalar.
inline __m256 max8_ps(const __m256 (&a)[8]) {
  __m256 t[4], u[2];
  for (int i = 0; i < 4; ++i)
    t[i] = _mm256_max_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i) {
    const __m256d x = _mm256_castps_pd(t[2 * i]), y = _mm256_castps_pd(t[2 * i + 1]);
    u[i] = _mm256_max_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return _mm256_max_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

inline __m256i sum8_epi32(const __m256i (&a)[8]) {
  __m256i t[4], u[2];
  for (int i = 0; i < 4; ++i)
    t[i] = _mm256_add_epi32(_mm256_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    u[i] = _mm256_add_epi32(_mm256_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm256_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(u[0], u[1], 0x20), _mm256_permute2x128_si256(u[0], u[1], 0x31));
}

// 8 x 8 int32 transposed in place: a[r] lane j -> a[j] lane r.
inline void transpose8_epi32(__m256i (&a)[8]) {
  __m256i t[8], u[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(a[2 * i], a[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(a[2 * i], a[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    a[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
    a[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
  }
}

// Block b (32 inputs) of a whole pass of 8 rows, rows[r] (nullptr: a padding row, all zeros), rounded
// with the arithmetic of quantize_rows' one-row loop, but 8 rows at a time: the 8 maxima and code sums
// reduced together, the codes transposed into the pass's interleaved order and stored whole. q: the
// pass's block (8 x 8 int32 entries), scale/start: its 8 entries, gsum: the 8 entries of its group.
template <typename T>
inline void quantize_block8(const T* const (&rows)[8], int64_t b, int64_t zero_point, int32_t* q, float* scale,
                            int32_t* start, float* gsum, int32_t* half) {
  __m512 v0[8], v1[8];
  __m256 mx[8];
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) {
    if (rows[r] == nullptr) {
      v0[r] = v1[r] = _mm512_setzero_ps();
    } else if constexpr (std::is_same_v<T, float>) {
      v0[r] = _mm512_loadu_ps(rows[r] + b * 32);
      v1[r] = _mm512_loadu_ps(rows[r] + b * 32 + 16);
    } else {
      v0[r] = load_bf16_as_f32(reinterpret_cast<const uint16_t*>(rows[r]) + b * 32);
      v1[r] = load_bf16_as_f32(reinterpret_cast<const uint16_t*>(rows[r]) + b * 32 + 16);
    }
    const __m512 m = _mm512_max_ps(_mm512_abs_ps(v0[r]), _mm512_abs_ps(v1[r]));
    mx[r] = _mm256_max_ps(_mm512_castps512_ps256(m), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(m), 1)));
  }
  const __m256 amax = max8_ps(mx);
  const __m256 d = _mm256_div_ps(amax, _mm256_set1_ps(127.f));
  const __m256 inv = _mm256_blendv_ps(_mm256_setzero_ps(), _mm256_div_ps(_mm256_set1_ps(127.f), amax),
                                      _mm256_cmp_ps(amax, _mm256_setzero_ps(), _CMP_GT_OQ));
  alignas(32) float id[8];
  _mm256_store_ps(id, inv);
  __m256i codes[8], sums[8], firsts[8];
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) {
    const __m512 iv = _mm512_set1_ps(id[r]);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0[r], iv));  // round to nearest even
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1[r], iv));
    codes[r] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtsepi32_epi8(q0)), _mm512_cvtsepi32_epi8(q1), 1);
    const __m512i qs = _mm512_add_epi32(q0, q1);
    sums[r] = _mm256_add_epi32(_mm512_castsi512_si256(qs), _mm512_extracti64x4_epi64(qs, 1));
    if (half != nullptr) firsts[r] = _mm256_add_epi32(_mm512_castsi512_si256(q0), _mm512_extracti64x4_epi64(q0, 1));
  }
  if (half != nullptr)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(half),
                        _mm256_mullo_epi32(_mm256_set1_epi32(-static_cast<int32_t>(zero_point)), sum8_epi32(firsts)));
  transpose8_epi32(codes);  // codes[j]: the 4 codes of inputs 4j..4j+3 of each row
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j * 8), codes[j]);
  const __m256i qsum = sum8_epi32(sums);
  _mm256_storeu_ps(scale, d);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(start),
                      _mm256_mullo_epi32(_mm256_set1_epi32(-static_cast<int32_t>(zero_point)), qsum));
  _mm256_storeu_ps(gsum, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(qsum), _mm256_loadu_ps(gsum)));
}

// halves: also each block's sum over its first 16 inputs (qr.half), for weights with sub-blocks of 16.
template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t padded_rows, int64_t K, int64_t group_size,
                   int64_t zero_point, QuantizedRows& qr, bool halves = false) {
  const int64_t blocks = K / 32;
  qr.rows = padded_rows;
  qr.pass = std::min<int64_t>(padded_rows, kMaxMT);
  qr.K = K;
  qr.groups = K / group_size;
  const int64_t P = qr.pass, blocks_per_group = group_size / 32;
  auto fit = [](auto& v, int64_t n) { if (static_cast<int64_t>(v.size()) < n) v.resize(n); };
  fit(qr.q, padded_rows * K / 4);
  fit(qr.scale, padded_rows * blocks);
  fit(qr.start, padded_rows * blocks);
  fit(qr.gsum, padded_rows * qr.groups);
  if (halves) fit(qr.half, padded_rows * blocks);
  std::fill(qr.gsum.begin(), qr.gsum.begin() + padded_rows * qr.groups, 0.f);
  // The padding rows are zeros: written here for passes of 1-4 rows; quantize_block8 writes a pass of 8's.
  for (int64_t m = P == 8 ? padded_rows : rows; m < padded_rows; ++m) {
    for (int64_t j = 0; j < K / 4; ++j) qr.q[qr.at(m, j, K / 4)] = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      qr.scale[qr.at(m, b, blocks)] = 0.f, qr.start[qr.at(m, b, blocks)] = 0;
      if (halves) qr.half[qr.at(m, b, blocks)] = 0;
    }
  }
  // Tasks are (pass, run of whole weight groups): a pass's rows are interleaved 4 bytes apart, so
  // threads splitting one pass's rows wrote into the same cache lines (at 8 rows, a K=4608 input took
  // 48 us instead of 13). A few thousand values a task; one row of a small layer stays on this thread.
  const int64_t passes = (rows + P - 1) / P;
  const int64_t groups_per_task = std::max<int64_t>(1, 8192 / (P * group_size));
  const int64_t runs = (qr.groups + groups_per_task - 1) / groups_per_task;
  parallel_for(0, passes * runs, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) int8_t codes[32];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pass = t / runs, g0 = (t % runs) * groups_per_task;
      const int64_t g1 = std::min(qr.groups, g0 + groups_per_task);
      if (P == 8) {  // a whole pass at once (quantize_block8); its padding rows read as zeros
        const T* rowp[8];
        for (int64_t r = 0; r < 8; ++r) rowp[r] = pass * 8 + r < rows ? x + (pass * 8 + r) * K : nullptr;
        for (int64_t g = g0; g < g1; ++g)
          for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b)
            quantize_block8(rowp, b, zero_point, qr.q.data() + (pass * (K / 4) + b * 8) * 8,
                            qr.scale.data() + (pass * blocks + b) * 8, qr.start.data() + (pass * blocks + b) * 8,
                            qr.gsum.data() + (pass * qr.groups + g) * 8,
                            halves ? qr.half.data() + (pass * blocks + b) * 8 : nullptr);
        continue;
      }
      for (int64_t m = pass * P; m < std::min(rows, pass * P + P); ++m) {
        int32_t* qm = qr.q.data() + qr.at(m, 0, K / 4);  // row m's entry j is at [j * P]
        float* sm = qr.scale.data() + qr.at(m, 0, blocks);
        int32_t* startm = qr.start.data() + qr.at(m, 0, blocks);
        float* gm = qr.gsum.data() + qr.at(m, 0, qr.groups);
        for (int64_t g = g0; g < g1; ++g) {
          for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
            const T* p = x + m * K + b * 32;
            __m512 v0, v1;
            if constexpr (std::is_same_v<T, float>) {
              v0 = _mm512_loadu_ps(p);
              v1 = _mm512_loadu_ps(p + 16);
            } else {
              v0 = load_bf16_as_f32(reinterpret_cast<const uint16_t*>(p));
              v1 = load_bf16_as_f32(reinterpret_cast<const uint16_t*>(p) + 16);
            }
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float d = amax / 127.f;
            const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));  // round to nearest even
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
            _mm_store_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtsepi32_epi8(q0));
            _mm_store_si128(reinterpret_cast<__m128i*>(codes + 16), _mm512_cvtsepi32_epi8(q1));
            for (int64_t j = 0; j < 8; ++j) std::memcpy(qm + (b * 8 + j) * P, codes + 4 * j, 4);
            const int32_t qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            sm[b * P] = d;
            startm[b * P] = -static_cast<int32_t>(zero_point) * qsum;  // (c - z).q = c.q - z * sum(q)
            if (halves) qr.half[qr.at(m, b, blocks)] = -static_cast<int32_t>(zero_point) * _mm512_reduce_add_epi32(q0);
            gm[g * P] = std::fma(d, static_cast<float>(qsum), gm[g * P]);  // as quantize_block8's FMA
          }
        }
      }
    }
  });
}

template <typename S>
inline __m512 load16_f32(const S* p);
template <>
inline __m512 load16_f32<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16_f32<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// acc += w (u8) . the 4 int8 codes at p broadcast to every lane (s8), the broadcast folded into the
// instruction (compilers emit a separate broadcast for the intrinsics' set1).
inline __m512i dpbusd_bcast(__m512i acc, __m512i w, const int32_t* p) {
#ifdef __AVX512F__
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*p));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(*p));
#endif
}

#ifdef __AVX512F__
// Bit 4 of every byte: bit `Q` of the 5-bit tile's high-bit byte (the code of quad Q's input), moved up
// or down within its 16-bit word and masked to its own byte by the caller.
template <int Q>
inline __m512i high_bit_at_4(__m512i v) {
  if constexpr (Q <= 4) return _mm512_slli_epi16(v, 4 - Q);
  else return _mm512_srli_epi16(v, Q - 4);
}

// One tile of 16 outputs (from n0) against the MT activation rows of pass `p` (rows m0 = p * MT ..),
// stored to out. TABLE: int4 codes are IQ4 indices (kIq4Values), looked up with one vpshufb per 64 codes.
// BITS 5: a block's low nibbles as int4's, then 64 bytes whose bit q is the fifth bit of quad q's code.
template <int BITS, typename S, int MT, bool TABLE = false>
void int_tile(const QuantizedRows& qr, int64_t p, const uint8_t* tile, const S* tscale, const S* tshift,
              int64_t group_size, const Output& out, int64_t m0, int64_t n0, const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = qr.groups, blocks_per_group = group_size / 32;
  constexpr int64_t kBlockBytes = 64 * BITS;  // 16 rows x 32 inputs
  const int32_t* xq = qr.q.data() + p * (K / 4) * MT;
  const float* xs = qr.scale.data() + p * blocks * MT;
  const int32_t* xstart = qr.start.data() + p * blocks * MT;
  const float* xg = qr.gsum.data() + p * groups * MT;
  __m512 facc[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) facc[m] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0f), fifth = _mm512_set1_epi8(0x10);
  const __m512i table = _mm512_broadcast_i32x4(_mm_add_epi8(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values)), _mm_set1_epi8(char(kIq4ZeroPoint))));
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 sv = load16_f32<S>(tscale + g * kTile);
    if (tshift != nullptr) {
      const __m512 sh = load16_f32<S>(tshift + g * kTile);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) facc[m] = _mm512_fmadd_ps(sh, _mm512_set1_ps(xg[g * MT + m]), facc[m]);
    }
    // A group's blocks are summed scaled by the activations' block scales, and the sum times the weight
    // scale once per group: a multiply per block and row fewer than scaling every block by both.
    __m512 gacc[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) gacc[m] = _mm512_setzero_ps();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      const uint8_t* wb = tile + b * kBlockBytes;
      const int32_t* xb = xq + b * 8 * MT;
      prefetch(wb);
      if (next != nullptr) prefetch_lines<kBlockBytes>(next + b * kBlockBytes);
      __m512i iacc[MT];
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) iacc[m] = _mm512_set1_epi32(xstart[b * MT + m]);
      if constexpr (BITS == 8) {
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) {
          const __m512i w = _mm512_loadu_si512(wb + q * 64);
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) iacc[m] = dpbusd_bcast(iacc[m], w, xb + q * MT + m);
        }
      } else {
        const auto quads = [&](auto o_) {
          constexpr int o = decltype(o_)::value;
          const __m512i v = _mm512_loadu_si512(wb + o * 64);
          __m512i lo = _mm512_and_si512(v, nibble);
          __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          if constexpr (TABLE) lo = _mm512_shuffle_epi8(table, lo), hi = _mm512_shuffle_epi8(table, hi);
          if constexpr (BITS == 5) {  // (high & 0x10) | nibble, one vpternlogd each
            const __m512i h = _mm512_loadu_si512(wb + 256);
            lo = _mm512_ternarylogic_epi32(high_bit_at_4<2 * o>(h), fifth, lo, 0xEA);
            hi = _mm512_ternarylogic_epi32(high_bit_at_4<2 * o + 1>(h), fifth, hi, 0xEA);
          }
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) {
            iacc[m] = dpbusd_bcast(iacc[m], lo, xb + (2 * o) * MT + m);
            iacc[m] = dpbusd_bcast(iacc[m], hi, xb + (2 * o + 1) * MT + m);
          }
        };
        quads(std::integral_constant<int, 0>{});
        quads(std::integral_constant<int, 1>{});
        quads(std::integral_constant<int, 2>{});
        quads(std::integral_constant<int, 3>{});
      }
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m)
        gacc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m]), _mm512_set1_ps(xs[b * MT + m]), gacc[m]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) facc[m] = _mm512_fmadd_ps(gacc[m], sv, facc[m]);
  }
  for (int m = 0; m < MT; ++m) out.store(m0 + m, n0, facc[m]);
}

// int_tile for GGUF Q6_K (kQ6BlockBytes per 32 inputs): a block's two sub-blocks of 16 are summed apart,
// each from -32 x its activations' sum (the zero point), times its int8 scale in int32 (exact: at most
// 16 x 127 x 32 x 128 a sub-block), then the block as int_tile's, times d once per 256 inputs.
template <typename S, int MT>
void q6k_tile(const QuantizedRows& qr, int64_t p, const uint8_t* tile, const S* tscale, const Output& out,
              int64_t m0, int64_t n0, const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = K / kQ6Group;
  const int32_t* xq = qr.q.data() + p * (K / 4) * MT;
  const float* xs = qr.scale.data() + p * blocks * MT;
  const int32_t* xstart = qr.start.data() + p * blocks * MT;  // -32 x the block's sum
  const int32_t* xhalf = qr.half.data() + p * blocks * MT;    // -32 x the sum of its first 16
  __m512 facc[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) facc[m] = _mm512_setzero_ps();
  // bitwise selects (ternlog 0xE4: C ? A : B) by these masks, and the codes' six bits
  const __m512i low2 = _mm512_set1_epi8(0x03), low4 = _mm512_set1_epi8(0x0f), six = _mm512_set1_epi8(0x3f);
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 sv = load16_f32<S>(tscale + g * kTile);
    __m512 gacc[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) gacc[m] = _mm512_setzero_ps();
    for (int64_t b = g * (kQ6Group / 32); b < (g + 1) * (kQ6Group / 32); ++b) {
      const uint8_t* wb = tile + b * kQ6BlockBytes;
      const int32_t* xb = xq + b * 8 * MT;
      prefetch(wb);
      if (next != nullptr) prefetch_lines<kQ6BlockBytes>(next + b * kQ6BlockBytes);
      __m512i first[MT], second[MT];
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {  // broadcasts from memory; the second start by a vector subtract
        first[m] = _mm512_set1_epi32(xhalf[b * MT + m]);
        second[m] = _mm512_sub_epi32(_mm512_set1_epi32(xstart[b * MT + m]), first[m]);
      }
      // A sub-block's run: quads a, b, c in bits 0-5 of v0, v1, v2; quad e's pairs in their bits 6-7.
      const auto run = [&](const uint8_t* r, const int32_t* xr, __m512i(&acc)[MT]) {
        const __m512i v0 = _mm512_loadu_si512(r), v1 = _mm512_loadu_si512(r + 64), v2 = _mm512_loadu_si512(r + 128);
        const __m512i e1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v0, 6), _mm512_srli_epi16(v1, 4), low2, 0xE4);
        const __m512i e = _mm512_and_si512(_mm512_ternarylogic_epi32(e1, _mm512_srli_epi16(v2, 2), low4, 0xE4), six);
        const __m512i q[4] = {_mm512_and_si512(v0, six), _mm512_and_si512(v1, six), _mm512_and_si512(v2, six), e};
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v)
#pragma GCC unroll 8
          for (int m = 0; m < MT; ++m) acc[m] = dpbusd_bcast(acc[m], q[v], xr + v * MT + m);
      };
      run(wb, xb, first);
      run(wb + 192, xb + 4 * MT, second);
      const __m512i sa = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 384)));
      const __m512i sb = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 400)));
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const __m512i iacc = _mm512_add_epi32(_mm512_mullo_epi32(first[m], sa), _mm512_mullo_epi32(second[m], sb));
        gacc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc), _mm512_set1_ps(xs[b * MT + m]), gacc[m]);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) facc[m] = _mm512_fmadd_ps(gacc[m], sv, facc[m]);
  }
  for (int m = 0; m < MT; ++m) out.store(m0 + m, n0, facc[m]);
}
#else
// Bit 4 of every byte: bit Q of a 5-bit block's fifth-bit bytes (quad Q's), as high_bit_at_4, masked.
template <int Q>
__attribute__((always_inline)) inline __m256i fifth_bit_at_4(__m256i v) {
  const __m256i bit4 = _mm256_set1_epi8(0x10);
  if constexpr (Q <= 4) return _mm256_and_si256(_mm256_slli_epi16(v, 4 - Q), bit4);
  else return _mm256_and_si256(_mm256_srli_epi16(v, Q - 4), bit4);
}

// Step O of a 4- or 5-bit block, one half: v the 32 bytes of nibbles, fifth the half's 32 fifth-bit bytes
// (BITS 5). lo: the codes of quad 2O (inputs 8O..8O+3), hi: of quad 2O + 1, one byte each (0..15 or 0..31).
template <int BITS, int O>
__attribute__((always_inline)) inline void unpack_step(__m256i v, __m256i fifth, __m256i& lo, __m256i& hi) {
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  lo = _mm256_and_si256(v, nibble);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
  if constexpr (BITS == 5) {
    lo = _mm256_or_si256(lo, fifth_bit_at_4<2 * O>(fifth));
    hi = _mm256_or_si256(hi, fifth_bit_at_4<2 * O + 1>(fifth));
  }
}

template <int... O, typename F>
__attribute__((always_inline)) inline void for_steps(std::integer_sequence<int, O...>, F&& f) {
  (f(std::integral_constant<int, O>{}), ...);
}

// The fifth-bit bytes of H halves of a 5-bit block at wb (nothing for 4-bit codes).
template <int BITS, int H>
__attribute__((always_inline)) inline void load_fifth(const uint8_t* wb, __m256i (&fifth)[H]) {
  if constexpr (BITS == 5)
    for (int h = 0; h < H; ++h) fifth[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 256 + 32 * h));
}

// unpack_step for H halves of the block at wb (half h at wb + 32 h).
template <int BITS, int O, int H>
__attribute__((always_inline)) inline void unpack_halves(const uint8_t* wb, const __m256i (&fifth)[H],
                                                         __m256i (&lo)[H], __m256i (&hi)[H]) {
#pragma GCC unroll 4
  for (int h = 0; h < H; ++h)
    unpack_step<BITS, O>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + O * 64 + 32 * h)),
                         BITS == 5 ? fifth[h] : __m256i{}, lo[h], hi[h]);
}

// A block's int4 or int5 codes (4 steps of 64 bytes; int5: then 64 fifth-bit bytes) as the 4x2 tiles read
// them, a byte a code: per step, quad 2o of both halves, then quad 2o + 1 (128 bytes).
// TABLE: IQ4 indices, looked up into their int8 codes (kIq4Values + 128), as the int8 tile's layout.
template <int BITS, bool TABLE = false>
__attribute__((always_inline)) inline void unpack_block(const uint8_t* w, uint8_t* u) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_add_epi8(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values)), _mm_set1_epi8(char(kIq4ZeroPoint))));
  __m256i fifth[2];
  load_fifth<BITS, 2>(w, fifth);
  for_steps(std::make_integer_sequence<int, 4>{}, [&](auto o_) {
    constexpr int o = decltype(o_)::value;
    __m256i* out = reinterpret_cast<__m256i*>(u + 128 * o);
    __m256i lo[2], hi[2];
    unpack_halves<BITS, o, 2>(w, fifth, lo, hi);
    for (int h = 0; h < 2; ++h) {
      if constexpr (TABLE) lo[h] = _mm256_shuffle_epi8(table, lo[h]), hi[h] = _mm256_shuffle_epi8(table, hi[h]);
      _mm256_store_si256(out + h, lo[h]);
      _mm256_store_si256(out + 2 + h, hi[h]);
    }
  });
}

#ifdef QK_AVXVNNI
// One block (32 inputs) of R rows against H halves of the tile on AVX-VNNI: the int32 sums from the block
// starts, the u8 codes (int4/int5 codes or int8 bytes, zero point not removed: int8_zero_point) times the
// s8 activations in vpdpbusd, exact as the AVX2 chains' sums are, so every result is the AVX2 build's.
template <int BITS, int R, int H, int MT>
__attribute__((always_inline)) inline void vnni_block(const uint8_t* wb, const int32_t* xb, const int32_t* start,
                                                      __m256i (&iacc)[R][H]) {
#pragma GCC unroll 4
  for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) iacc[m][h] = _mm256_set1_epi32(start[m]);
  if constexpr (BITS == 8) {
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      __m256i w[H];
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) w[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * 64 + 32 * h));
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h)
          iacc[m][h] = _mm256_dpbusd_avx_epi32(iacc[m][h], w[h], _mm256_set1_epi32(xb[q * MT + m]));
    }
    return;
  }
  __m256i fifth[H];
  load_fifth<BITS, H>(wb, fifth);
  for_steps(std::make_integer_sequence<int, 4>{}, [&](auto o_) {
    constexpr int o = decltype(o_)::value;
    __m256i lo[H], hi[H];
    unpack_halves<BITS, o, H>(wb, fifth, lo, hi);
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) {
        iacc[m][h] = _mm256_dpbusd_avx_epi32(iacc[m][h], lo[h], _mm256_set1_epi32(xb[(2 * o) * MT + m]));
        iacc[m][h] = _mm256_dpbusd_avx_epi32(iacc[m][h], hi[h], _mm256_set1_epi32(xb[(2 * o + 1) * MT + m]));
      }
  });
}
#endif

// The AVX2 form of the tile for passes of 1-2 rows: vpmaddubsw (u8 x s8 pairs -> int16) and vpmaddwd in
// place of vpdpbusd, for R rows of the pass and H 8-output halves of the tile (32 of each 64 bytes) at a
// time, so the accumulators fit AVX2's 16 registers: int4 takes both halves (each broadcast serves 16
// outputs; 15% faster at one row), int8 one half at a time (the tile is read again from cache for the
// other). Passes of 4-8 rows (two passes of 8 together) take int_tile_quads. int4 codes (0..15)
// times int8 activations never saturate vpmaddubsw's int16 pairs, so a block's 8 pairs are summed in
// int16 before one widening. int8 codes are made signed (code - 128, which int8_zero_point has already
// moved into the block starts) and multiplied as |w| . sign(x, w), which keeps each int16 pair in range.
// On AVX-VNNI, vnni_block does the integer part. The float arithmetic is the AVX-512 tile's, in the same
// order.
template <int BITS, typename S, int R, int H, int MT, bool TABLE = false>
void int_tile_rows(const QuantizedRows& qr, int64_t p, int64_t r0, int h0, const uint8_t* tile, const S* tscale,
                   const S* tshift, int64_t group_size, float (*y)[16], const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = qr.groups, blocks_per_group = group_size / 32;
  constexpr int64_t kBlockBytes = 64 * BITS;  // 16 rows x 32 inputs
  const int32_t* xq = qr.q.data() + p * (K / 4) * MT + r0;
  const float* xs = qr.scale.data() + p * blocks * MT + r0;
  const int32_t* xstart = qr.start.data() + p * blocks * MT + r0;
  const float* xg = qr.gsum.data() + p * groups * MT + r0;
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  constexpr int kCodeBits = TABLE ? 8 : BITS;  // the codes the arithmetic takes
  alignas(32) uint8_t table_codes[TABLE ? 512 : 1];
  const auto half = [&](const qk_m512& v, int h) { return (H == 2 ? h : h0) == 0 ? v.lo : v.hi; };  // of 16 scales
  __m256 facc[R][H];
#pragma GCC unroll 4
  for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) facc[m][h] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const qk_m512 sv = load16_f32<S>(tscale + g * kTile);
    if (tshift != nullptr) {
      const qk_m512 sh = load16_f32<S>(tshift + g * kTile);
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h) facc[m][h] = _mm256_fmadd_ps(half(sh, h), _mm256_set1_ps(xg[g * MT + m]), facc[m][h]);
    }
    __m256 gacc[R][H];
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) gacc[m][h] = _mm256_setzero_ps();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      const uint8_t* wb = tile + b * kBlockBytes + (H == 2 ? 0 : 32 * h0);
      if constexpr (TABLE) {  // IQ4 indices: looked up into int8 codes, the int8 tile's layout, run as those
        unpack_block<4, true>(tile + b * kBlockBytes, table_codes);
        wb = table_codes + (H == 2 ? 0 : 32 * h0);
      }
      const int32_t* xb = xq + b * 8 * MT;
      if (next != nullptr) prefetch_lines<kBlockBytes>(next + b * kBlockBytes);
      __m256i iacc[R][H];
#ifdef QK_AVXVNNI
      vnni_block<kCodeBits, R, H, MT>(wb, xb, xstart + b * MT, iacc);
#else
      if constexpr (kCodeBits == 8) {
#pragma GCC unroll 4
        for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
          for (int h = 0; h < H; ++h) iacc[m][h] = _mm256_set1_epi32(xstart[b * MT + m]);
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) {
          __m256i w[H], aw[H];
#pragma GCC unroll 4
          for (int h = 0; h < H; ++h) {
            w[h] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * 64 + 32 * h)), flip);
            aw[h] = _mm256_abs_epi8(w[h]);
          }
#pragma GCC unroll 4
          for (int m = 0; m < R; ++m) {
            const __m256i xv = _mm256_set1_epi32(xb[q * MT + m]);
#pragma GCC unroll 4
            for (int h = 0; h < H; ++h)
              iacc[m][h] = _mm256_add_epi32(
                  iacc[m][h], _mm256_madd_epi16(_mm256_maddubs_epi16(aw[h], _mm256_sign_epi8(xv, w[h])), ones));
          }
        }
      } else {
        // int16 pair sums, widened to int32 every kWiden steps: int4 after all 4 (16 products of at most
        // 15 x 128 each), int5 after 2 (8 of at most 31 x 128), within int16 either way
        constexpr int kWiden = BITS == 4 ? 4 : 2;
        __m256i sum16[R][H], fifth[H];
#pragma GCC unroll 4
        for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
          for (int h = 0; h < H; ++h) {
            sum16[m][h] = _mm256_setzero_si256();
            iacc[m][h] = _mm256_set1_epi32(xstart[b * MT + m]);
          }
        load_fifth<BITS, H>(wb, fifth);
        for_steps(std::make_integer_sequence<int, 4>{}, [&](auto o_) {
          constexpr int o = decltype(o_)::value;
          __m256i lo[H], hi[H];
          unpack_halves<BITS, o, H>(wb, fifth, lo, hi);
#pragma GCC unroll 4
          for (int m = 0; m < R; ++m) {
            const __m256i x0 = _mm256_set1_epi32(xb[(2 * o) * MT + m]), x1 = _mm256_set1_epi32(xb[(2 * o + 1) * MT + m]);
#pragma GCC unroll 4
            for (int h = 0; h < H; ++h) {
              sum16[m][h] = _mm256_add_epi16(sum16[m][h], _mm256_maddubs_epi16(lo[h], x0));
              sum16[m][h] = _mm256_add_epi16(sum16[m][h], _mm256_maddubs_epi16(hi[h], x1));
            }
          }
          if constexpr (o % kWiden == kWiden - 1) {
#pragma GCC unroll 4
            for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
              for (int h = 0; h < H; ++h) {
                iacc[m][h] = _mm256_add_epi32(iacc[m][h], _mm256_madd_epi16(sum16[m][h], ones));
                sum16[m][h] = _mm256_setzero_si256();
              }
          }
        });
      }
#endif
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h)
          gacc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m][h]), _mm256_set1_ps(xs[b * MT + m]), gacc[m][h]);
    }
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) facc[m][h] = _mm256_fmadd_ps(gacc[m][h], half(sv, h), facc[m][h]);
  }
#pragma GCC unroll 4
  for (int m = 0; m < R; ++m)
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) _mm256_storeu_ps(y[m] + 8 * (H == 2 ? h : h0), facc[m][h]);
}

// One block of 32 int4 inputs for 4 rows of a pass of MT rows and both halves of the tile: sum[m][h] +=
// the int16 pair sums of vpmaddubsw. Written out: given the same intrinsics, GCC reassociated the int16
// sums across the block, computed every product first and spilled them (an asm block keeps this order).
// x: the pass's 4-byte activation groups, MT rows apart (row m of group j at x[MT j + m]).
#define QK_I4_ROW(o, m, a0, a1)                                                                   \
  "vpbroadcastd " #o "*2*%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                            \
  "vpmaddubsw %[xv], %[lo0], %[t]\n\tvpaddw %[t], %[" #a0 "], %[" #a0 "]\n\t"                      \
  "vpmaddubsw %[xv], %[lo1], %[t]\n\tvpaddw %[t], %[" #a1 "], %[" #a1 "]\n\t"                      \
  "vpbroadcastd " #o "*2*%c[st]+%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                          \
  "vpmaddubsw %[xv], %[hi0], %[t]\n\tvpaddw %[t], %[" #a0 "], %[" #a0 "]\n\t"                      \
  "vpmaddubsw %[xv], %[hi1], %[t]\n\tvpaddw %[t], %[" #a1 "], %[" #a1 "]\n\t"
// Step o's codes, both halves, as unpack_block left them: lo0/lo1 quad 2o's, hi0/hi1 quad 2o + 1's.
#define QK_I4_UNPACKED(o)                                                                         \
  "vmovdqa " #o "*128(%[u]), %[lo0]\n\tvmovdqa " #o "*128+32(%[u]), %[lo1]\n\t"                     \
  "vmovdqa " #o "*128+64(%[u]), %[hi0]\n\tvmovdqa " #o "*128+96(%[u]), %[hi1]\n\t"
#define QK_I4_STEP(o) \
  QK_I4_UNPACKED(o) QK_I4_ROW(o, 0, a00, a01) QK_I4_ROW(o, 1, a10, a11) QK_I4_ROW(o, 2, a20, a21) QK_I4_ROW(o, 3, a30, a31)
template <int MT>
__attribute__((always_inline)) inline void int4_block_4x2(
    const uint8_t* u, const int32_t* x, __m256i (*sum)[2]) {
  __m256i lo0, lo1, hi0, hi1, xv, t;
  asm(QK_I4_STEP(0) QK_I4_STEP(1) QK_I4_STEP(2) QK_I4_STEP(3)
      : [a00] "+x"(sum[0][0]), [a01] "+x"(sum[0][1]), [a10] "+x"(sum[1][0]), [a11] "+x"(sum[1][1]),
        [a20] "+x"(sum[2][0]), [a21] "+x"(sum[2][1]), [a30] "+x"(sum[3][0]), [a31] "+x"(sum[3][1]),
        [lo0] "=&x"(lo0), [lo1] "=&x"(lo1), [hi0] "=&x"(hi0), [hi1] "=&x"(hi1), [xv] "=&x"(xv), [t] "=&x"(t)
      : [u] "r"(u), [x] "r"(x), [st] "i"(4 * MT), "m"(*reinterpret_cast<const uint8_t(*)[512]>(u)),
        "m"(*reinterpret_cast<const int32_t(*)[8 * MT]>(x)));
}
// Steps 0 and 1 only (8 products a lane: int_block_4x2 widens 5-bit codes' sums after each two steps).
template <int MT>
__attribute__((always_inline)) inline void int4_half_block_4x2(
    const uint8_t* u, const int32_t* x, __m256i (*sum)[2]) {
  __m256i lo0, lo1, hi0, hi1, xv, t;
  asm(QK_I4_STEP(0) QK_I4_STEP(1)
      : [a00] "+x"(sum[0][0]), [a01] "+x"(sum[0][1]), [a10] "+x"(sum[1][0]), [a11] "+x"(sum[1][1]),
        [a20] "+x"(sum[2][0]), [a21] "+x"(sum[2][1]), [a30] "+x"(sum[3][0]), [a31] "+x"(sum[3][1]),
        [lo0] "=&x"(lo0), [lo1] "=&x"(lo1), [hi0] "=&x"(hi0), [hi1] "=&x"(hi1), [xv] "=&x"(xv), [t] "=&x"(t)
      : [u] "r"(u), [x] "r"(x), [st] "i"(4 * MT), "m"(*reinterpret_cast<const uint8_t(*)[256]>(u)),
        "m"(*reinterpret_cast<const int32_t(*)[4 * MT]>(x)));
}
#undef QK_I4_STEP
#undef QK_I4_ROW

// The same for int8 codes (made signed by XOR 0x80, as int_tile_rows does): sum[m][h] += the int32 sums of
// |w| . sign(x, w), 8 groups of 4 inputs.
#define QK_I8_ROW(q, m, a0, a1)                                                                   \
  "vpbroadcastd " #q "*%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                         \
  "vpsignb %[w0], %[xv], %[t]\n\tvpmaddubsw %[t], %[a0], %[t]\n\t"                                \
  "vpmaddwd %[ones], %[t], %[t]\n\tvpaddd %[t], %[" #a0 "], %[" #a0 "]\n\t"                        \
  "vpsignb %[w1], %[xv], %[t]\n\tvpmaddubsw %[t], %[a1], %[t]\n\t"                                \
  "vpmaddwd %[ones], %[t], %[t]\n\tvpaddd %[t], %[" #a1 "], %[" #a1 "]\n\t"
#define QK_I8_STEP(q)                                                                             \
  "vpxor " #q "*64(%[w]), %[flip], %[w0]\n\tvpxor " #q "*64+32(%[w]), %[flip], %[w1]\n\t"           \
  "vpabsb %[w0], %[a0]\n\tvpabsb %[w1], %[a1]\n\t"                                                 \
  QK_I8_ROW(q, 0, s00, s01) QK_I8_ROW(q, 1, s10, s11) QK_I8_ROW(q, 2, s20, s21) QK_I8_ROW(q, 3, s30, s31)
template <int MT>
__attribute__((always_inline)) inline void int8_block_4x2(
    const uint8_t* w, const int32_t* x, __m256i flip, __m256i ones, __m256i (*sum)[2]) {
  __m256i w0, w1, a0, a1, xv, t;
  asm(QK_I8_STEP(0) QK_I8_STEP(1) QK_I8_STEP(2) QK_I8_STEP(3) QK_I8_STEP(4) QK_I8_STEP(5) QK_I8_STEP(6)
          QK_I8_STEP(7)
      : [s00] "+x"(sum[0][0]), [s01] "+x"(sum[0][1]), [s10] "+x"(sum[1][0]), [s11] "+x"(sum[1][1]),
        [s20] "+x"(sum[2][0]), [s21] "+x"(sum[2][1]), [s30] "+x"(sum[3][0]), [s31] "+x"(sum[3][1]),
        [w0] "=&x"(w0), [w1] "=&x"(w1), [a0] "=&x"(a0), [a1] "=&x"(a1), [xv] "=&x"(xv), [t] "=&x"(t)
      : [w] "r"(w), [x] "r"(x), [st] "i"(4 * MT), [flip] "x"(flip), [ones] "x"(ones),
        "m"(*reinterpret_cast<const uint8_t(*)[512]>(w)), "m"(*reinterpret_cast<const int32_t(*)[8 * MT]>(x)));
}
#undef QK_I8_STEP
#undef QK_I8_ROW

#ifdef QK_AVXVNNI
// The same two blocks on AVX-VNNI: sum[m][h] += the int32 sums of vpdpbusd (u8 codes, s8 activations),
// no int16 stage, the int8 codes as they are (their zero point in the block starts, as on AVX-512).
#define QK_V4_ROW(o, m, a0, a1)                                                                   \
  "vpbroadcastd " #o "*2*%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                            \
  "%{vex%} vpdpbusd %[xv], %[lo0], %[" #a0 "]\n\t%{vex%} vpdpbusd %[xv], %[lo1], %[" #a1 "]\n\t"          \
  "vpbroadcastd " #o "*2*%c[st]+%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                      \
  "%{vex%} vpdpbusd %[xv], %[hi0], %[" #a0 "]\n\t%{vex%} vpdpbusd %[xv], %[hi1], %[" #a1 "]\n\t"
#define QK_V4_STEP(o) \
  QK_I4_UNPACKED(o) QK_V4_ROW(o, 0, a00, a01) QK_V4_ROW(o, 1, a10, a11) QK_V4_ROW(o, 2, a20, a21) QK_V4_ROW(o, 3, a30, a31)
template <int MT>
__attribute__((always_inline)) inline void int4_block_4x2_vnni(
    const uint8_t* u, const int32_t* x, __m256i (*sum)[2]) {
  __m256i lo0, lo1, hi0, hi1, xv;
  asm(QK_V4_STEP(0) QK_V4_STEP(1) QK_V4_STEP(2) QK_V4_STEP(3)
      : [a00] "+x"(sum[0][0]), [a01] "+x"(sum[0][1]), [a10] "+x"(sum[1][0]), [a11] "+x"(sum[1][1]),
        [a20] "+x"(sum[2][0]), [a21] "+x"(sum[2][1]), [a30] "+x"(sum[3][0]), [a31] "+x"(sum[3][1]),
        [lo0] "=&x"(lo0), [lo1] "=&x"(lo1), [hi0] "=&x"(hi0), [hi1] "=&x"(hi1), [xv] "=&x"(xv)
      : [u] "r"(u), [x] "r"(x), [st] "i"(4 * MT), "m"(*reinterpret_cast<const uint8_t(*)[512]>(u)),
        "m"(*reinterpret_cast<const int32_t(*)[8 * MT]>(x)));
}
#undef QK_V4_STEP
#undef QK_V4_ROW

#define QK_V8_ROW(q, m, a0, a1)                                                                   \
  "vpbroadcastd " #q "*%c[st]+" #m "*4(%[x]), %[xv]\n\t"                                         \
  "%{vex%} vpdpbusd %[xv], %[w0], %[" #a0 "]\n\t%{vex%} vpdpbusd %[xv], %[w1], %[" #a1 "]\n\t"
#define QK_V8_STEP(q)                                                                             \
  "vmovdqu " #q "*64(%[w]), %[w0]\n\tvmovdqu " #q "*64+32(%[w]), %[w1]\n\t"                         \
  QK_V8_ROW(q, 0, s00, s01) QK_V8_ROW(q, 1, s10, s11) QK_V8_ROW(q, 2, s20, s21) QK_V8_ROW(q, 3, s30, s31)
template <int MT>
__attribute__((always_inline)) inline void int8_block_4x2_vnni(
    const uint8_t* w, const int32_t* x, __m256i (*sum)[2]) {
  __m256i w0, w1, xv;
  asm(QK_V8_STEP(0) QK_V8_STEP(1) QK_V8_STEP(2) QK_V8_STEP(3) QK_V8_STEP(4) QK_V8_STEP(5) QK_V8_STEP(6)
          QK_V8_STEP(7)
      : [s00] "+x"(sum[0][0]), [s01] "+x"(sum[0][1]), [s10] "+x"(sum[1][0]), [s11] "+x"(sum[1][1]),
        [s20] "+x"(sum[2][0]), [s21] "+x"(sum[2][1]), [s30] "+x"(sum[3][0]), [s31] "+x"(sum[3][1]),
        [w0] "=&x"(w0), [w1] "=&x"(w1), [xv] "=&x"(xv)
      : [w] "r"(w), [x] "r"(x), [st] "i"(4 * MT), "m"(*reinterpret_cast<const uint8_t(*)[512]>(w)),
        "m"(*reinterpret_cast<const int32_t(*)[8 * MT]>(x)));
}
#undef QK_V8_STEP
#undef QK_V8_ROW
#endif
#undef QK_I4_UNPACKED

// One block's int32 sums for rows 0-3 of the pass and both halves, the block's start included; w: the
// block's int8 codes, or its int4/int5 codes as unpack_block left them.
template <int BITS, int MT>
__attribute__((always_inline)) inline void int_block_4x2(const uint8_t* w, const int32_t* x, const int32_t* start,
                                                         __m256i (*iacc)[2]) {
#ifdef QK_AVXVNNI
  for (int m = 0; m < 4; ++m) iacc[m][0] = iacc[m][1] = _mm256_set1_epi32(start[m]);
  if constexpr (BITS == 8)
    int8_block_4x2_vnni<MT>(w, x, iacc);
  else
    int4_block_4x2_vnni<MT>(w, x, iacc);  // 5-bit codes alike: vpdpbusd has no int16 stage
  return;
#endif
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {
    for (int m = 0; m < 4; ++m) iacc[m][0] = iacc[m][1] = _mm256_set1_epi32(start[m]);
    int8_block_4x2<MT>(w, x, _mm256_set1_epi8(char(0x80)), ones, iacc);
  } else if constexpr (BITS == 5) {  // two steps at a time, so the int16 pair sums stay in range
    for (int m = 0; m < 4; ++m) iacc[m][0] = iacc[m][1] = _mm256_set1_epi32(start[m]);
    for (int half = 0; half < 2; ++half) {
      __m256i sum16[4][2];
      for (int m = 0; m < 4; ++m) sum16[m][0] = sum16[m][1] = _mm256_setzero_si256();
      int4_half_block_4x2<MT>(w + 256 * half, x + 4 * MT * half, sum16);
      for (int m = 0; m < 4; ++m)
        for (int h = 0; h < 2; ++h) iacc[m][h] = _mm256_add_epi32(iacc[m][h], _mm256_madd_epi16(sum16[m][h], ones));
    }
  } else {
    __m256i sum16[4][2];
    for (int m = 0; m < 4; ++m) sum16[m][0] = sum16[m][1] = _mm256_setzero_si256();
    int4_block_4x2<MT>(w, x, sum16);
    for (int m = 0; m < 4; ++m)
      for (int h = 0; h < 2; ++h)
        iacc[m][h] = _mm256_add_epi32(_mm256_set1_epi32(start[m]), _mm256_madd_epi16(sum16[m][h], ones));
  }
}

constexpr int kMaxQuads = 4;  // 4-row groups a tile call works on: 16 rows, two passes of 8

// `quads` groups of 4 rows (quad i: rows 4i..4i+3 from pass p's first, in passes of MT rows) against both
// halves of an int8, int4, int5 or IQ4 tile (prompts and decode steps of 3-16 rows): block by block, so a block is
// read from L1 (and int4/int5 unpacked) once for all the quads, int_block_4x2 for a quad's integer part, then
// int_tile_rows' float arithmetic in the same order, so a row's result is the same in any pass. The float
// sums live in L1, through a pointer GCC cannot see through (kept in registers, they and the values GCC
// hoisted were spilled at every group). 16 rows of a 4864 x 896 product, g32 with minimums, one thread:
// int4 1.50 -> 0.97 ms, int8 1.92 -> 1.42 (a pass of 4 rows at a time, unpacking per pass).
template <int BITS, typename S, int MT, bool TABLE = false>
void int_tile_quads(const QuantizedRows& qr, int64_t p, int quads, const uint8_t* tile, const S* tscale,
                    const S* tshift, int64_t group_size, float (*y)[16], const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = qr.groups, blocks_per_group = group_size / 32;
  const int32_t* xq[kMaxQuads];
  const float* xs[kMaxQuads];
  const int32_t* xstart[kMaxQuads];
  const float* xg[kMaxQuads];
  for (int i = 0; i < quads; ++i) {
    const int64_t pass = p + 4 * i / MT, r0 = 4 * i % MT;
    xq[i] = qr.q.data() + pass * (K / 4) * MT + r0;
    xs[i] = qr.scale.data() + pass * blocks * MT + r0;
    xstart[i] = qr.start.data() + pass * blocks * MT + r0;
    xg[i] = qr.gsum.data() + pass * groups * MT + r0;
  }
  constexpr int64_t kBlockBytes = 64 * BITS;  // 16 rows x 32 inputs
  alignas(32) uint8_t unpacked[512];
  alignas(32) __m256 sums[2][4 * kMaxQuads][2];
  __m256(*acc)[4 * kMaxQuads][2] = sums;
  asm("" : "+r"(acc));
  __m256(&F)[4 * kMaxQuads][2] = acc[0];
  __m256(&G)[4 * kMaxQuads][2] = acc[1];
  for (int m = 0; m < 4 * quads; ++m)
    for (int h = 0; h < 2; ++h) F[m][h] = _mm256_setzero_ps();
  // the block's codes as int_block_4x2 reads them
  const auto block_codes = [&](int64_t b) -> const uint8_t* {
    if (next != nullptr) prefetch_lines<kBlockBytes>(next + b * kBlockBytes);
    if constexpr (BITS == 8) return tile + b * kBlockBytes;
    unpack_block<BITS, TABLE>(tile + b * kBlockBytes, unpacked);
    return unpacked;
  };
  if (blocks_per_group == 1) {  // a group per block (GGUF, g32): no group sums, the same roundings
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* w = block_codes(b);
      const qk_m512 sv = load16_f32<S>(tscale + b * kTile);
      const qk_m512 sh = tshift != nullptr ? load16_f32<S>(tshift + b * kTile) : qk_m512{};
      for (int i = 0; i < quads; ++i) {
        __m256i iacc[4][2];
        int_block_4x2<TABLE ? 8 : BITS, MT>(w, xq[i] + b * 8 * MT, xstart[i] + b * MT, iacc);
        for (int m = 0; m < 4; ++m) {
          const __m256 xsm = _mm256_set1_ps(xs[i][b * MT + m]), xgm = _mm256_set1_ps(xg[i][b * MT + m]);
          for (int h = 0; h < 2; ++h) {
            __m256 f = F[4 * i + m][h];
            if (tshift != nullptr) f = _mm256_fmadd_ps(h == 0 ? sh.lo : sh.hi, xgm, f);
            const __m256 gsum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m][h]), xsm, _mm256_setzero_ps());
            F[4 * i + m][h] = _mm256_fmadd_ps(gsum, h == 0 ? sv.lo : sv.hi, f);
          }
        }
      }
    }
  }
  for (int64_t g = 0; blocks_per_group > 1 && g < groups; ++g) {
    if (tshift != nullptr) {
      const qk_m512 sh = load16_f32<S>(tshift + g * kTile);
      for (int i = 0; i < quads; ++i)
        for (int m = 0; m < 4; ++m) {
          const __m256 xgm = _mm256_set1_ps(xg[i][g * MT + m]);
          F[4 * i + m][0] = _mm256_fmadd_ps(sh.lo, xgm, F[4 * i + m][0]);
          F[4 * i + m][1] = _mm256_fmadd_ps(sh.hi, xgm, F[4 * i + m][1]);
        }
    }
    for (int m = 0; m < 4 * quads; ++m)
      for (int h = 0; h < 2; ++h) G[m][h] = _mm256_setzero_ps();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      const uint8_t* w = block_codes(b);
      for (int i = 0; i < quads; ++i) {
        __m256i iacc[4][2];
        int_block_4x2<TABLE ? 8 : BITS, MT>(w, xq[i] + b * 8 * MT, xstart[i] + b * MT, iacc);
        for (int m = 0; m < 4; ++m) {
          const __m256 xsm = _mm256_set1_ps(xs[i][b * MT + m]);
          for (int h = 0; h < 2; ++h)
            G[4 * i + m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m][h]), xsm, G[4 * i + m][h]);
        }
      }
    }
    const qk_m512 sv = load16_f32<S>(tscale + g * kTile);
    for (int m = 0; m < 4 * quads; ++m) {
      F[m][0] = _mm256_fmadd_ps(G[m][0], sv.lo, F[m][0]);
      F[m][1] = _mm256_fmadd_ps(G[m][1], sv.hi, F[m][1]);
    }
  }
  for (int m = 0; m < 4 * quads; ++m) {
    _mm256_storeu_ps(y[m], F[m][0]);
    _mm256_storeu_ps(y[m] + 8, F[m][1]);
  }
}

template <int BITS, typename S, int MT, bool TABLE = false>
void int_tile(const QuantizedRows& qr, int64_t p, const uint8_t* tile, const S* tscale, const S* tshift,
              int64_t group_size, const Output& out, int64_t m0, int64_t n0, const uint8_t* next) {
  alignas(32) float y[MT][16];
  if constexpr (MT >= 4) {
    int_tile_quads<BITS, S, MT, TABLE>(qr, p, MT / 4, tile, tscale, tshift, group_size, y, next);
  } else {
    constexpr int H = BITS == 8 || TABLE ? 1 : 2;  // as measured fastest (int4)
    for (int h0 = 0; h0 < 2; h0 += H)
      int_tile_rows<BITS, S, MT, H, MT, TABLE>(qr, p, 0, h0, tile, tscale, tshift, group_size, y,
                                                h0 == 0 ? next : nullptr);
  }
  for (int m = 0; m < MT; ++m) out.store(m0 + m, n0, _mm512_loadu_ps(y[m]));
}

// Passes p and p + 1 of 8 rows each, as one call: every block of the tile read, and int4/int5 unpacked, once
// for the 16 rows (a decode step of 9-16 rows, a prompt's rows 16 at a time).
template <int BITS, typename S, bool TABLE = false>
void int_tile_pair(const QuantizedRows& qr, int64_t p, const uint8_t* tile, const S* tscale, const S* tshift,
                   int64_t group_size, const Output& out, int64_t m0, int64_t n0, const uint8_t* next) {
  alignas(32) float y[16][16];
  int_tile_quads<BITS, S, 8, TABLE>(qr, p, 4, tile, tscale, tshift, group_size, y, next);
  for (int m = 0; m < 16; ++m) out.store(m0 + m, n0, _mm512_loadu_ps(y[m]));
}

// Half h0 of Q6_K block wb's sub-block sb: its 4 quads' codes (0..63, a byte each), and its int8 scale per
// output as int32 (s32) and in both int16 halves of each output's lane (s16, for vpmaddwd).
__attribute__((always_inline)) inline void q6k_unpack_half(const uint8_t* wb, int sb, int h0, __m256i (&q)[4],
                                                           __m256i& s16, __m256i& s32) {
  const __m256i six = _mm256_set1_epi8(0x3f), low2 = _mm256_set1_epi8(0x03), low16 = _mm256_set1_epi32(0xffff);
  s32 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + 384 + 16 * sb + 8 * h0)));
  s16 = _mm256_or_si256(_mm256_and_si256(s32, low16), _mm256_slli_epi32(s32, 16));
  const uint8_t* r = wb + 192 * sb + 32 * h0;
  const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r));
  const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 64));
  const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 128));
  q[0] = _mm256_and_si256(v0, six);
  q[1] = _mm256_and_si256(v1, six);
  q[2] = _mm256_and_si256(v2, six);
  q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v0, 6), low2),
                         _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v1, 4), _mm256_slli_epi16(low2, 2)),
                                         _mm256_and_si256(_mm256_srli_epi16(v2, 2), _mm256_slli_epi16(low2, 4))));
}

// One row's sum over a sub-block, times its scale: start (-32 x the activations' sum) x s32, then two
// quads at a time, their pair sums in int16, widened by vpmaddwd with s16. x: the row's 4-byte activation
// groups of the sub-block, MT apart.
template <int MT>
__attribute__((always_inline)) inline __m256i q6k_sub_sum(const __m256i (&q)[4], __m256i s16, __m256i s32,
                                                          int32_t start, const int32_t* x) {
  __m256i sum = _mm256_mullo_epi32(_mm256_set1_epi32(start), s32);
#pragma GCC unroll 2
  for (int v = 0; v < 4; v += 2) {
    const __m256i pair = _mm256_add_epi16(_mm256_maddubs_epi16(q[v], _mm256_set1_epi32(x[v * MT])),
                                          _mm256_maddubs_epi16(q[v + 1], _mm256_set1_epi32(x[(v + 1) * MT])));
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pair, s16));
  }
  return sum;
}

// GGUF Q6_K on AVX2/AVX-VNNI, R rows of a pass against half h0 of the tile (its 8 outputs), the AVX-512
// q6k_tile's integer sums and float arithmetic in the same order, so the products are its bit for bit.
// A sub-block's 4 quads of 6-bit codes go through vpmaddubsw in pairs (two pair sums of at most 63 x 128
// fit int16) and vpmaddwd by the sub-block's int8 scale, set in both int16 halves of each output's lane:
// the scaling costs nothing over the widening the int8 tile does anyway. The sub-block's zero point
// (-32 x its activations' sum) is scaled with one vpmulld.
template <typename S, int MT, int R>
void q6k_rows(const QuantizedRows& qr, int64_t p, int64_t r0, int h0, const uint8_t* tile, const S* tscale,
              float (*y)[16], const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = K / kQ6Group;
  const int32_t* xq = qr.q.data() + p * (K / 4) * MT + r0;
  const float* xs = qr.scale.data() + p * blocks * MT + r0;
  const int32_t* xstart = qr.start.data() + p * blocks * MT + r0;  // -32 x the block's sum
  const int32_t* xhalf = qr.half.data() + p * blocks * MT + r0;    // -32 x the sum of its first 16
  __m256 facc[R];
  for (int m = 0; m < R; ++m) facc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const qk_m512 sv = load16_f32<S>(tscale + g * kTile);
    __m256 gacc[R];
    for (int m = 0; m < R; ++m) gacc[m] = _mm256_setzero_ps();
    for (int64_t b = g * (kQ6Group / 32); b < (g + 1) * (kQ6Group / 32); ++b) {
      const uint8_t* wb = tile + b * kQ6BlockBytes;
      const int32_t* xb = xq + b * 8 * MT;
      if (next != nullptr && h0 == 0 && r0 == 0) prefetch_lines<kQ6BlockBytes>(next + b * kQ6BlockBytes);
      __m256i iacc[R];
      const auto sub_block = [&](int sb) {
        __m256i q[4], s16, s32;
        q6k_unpack_half(wb, sb, h0, q, s16, s32);
#pragma GCC unroll 4
        for (int m = 0; m < R; ++m) {
          const int32_t start = sb == 0 ? xhalf[b * MT + m] : xstart[b * MT + m] - xhalf[b * MT + m];
          const __m256i acc = q6k_sub_sum<MT>(q, s16, s32, start, xb + 4 * sb * MT + m);
          iacc[m] = sb == 0 ? acc : _mm256_add_epi32(iacc[m], acc);
        }
      };
      sub_block(0);
      sub_block(1);
#pragma GCC unroll 4
      for (int m = 0; m < R; ++m)
        gacc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_set1_ps(xs[b * MT + m]), gacc[m]);
    }
    for (int m = 0; m < R; ++m) facc[m] = _mm256_fmadd_ps(gacc[m], h0 == 0 ? sv.lo : sv.hi, facc[m]);
  }
  for (int m = 0; m < R; ++m) _mm256_storeu_ps(y[r0 + m] + 8 * h0, facc[m]);
}

// q6k_rows for passes of 4-8 rows: a block's half unpacked once into registers for every row of the
// pass (unpacking it again per pair of rows made 16-row products 30% slower than the int8 tile's), the
// float sums in L1 as int_tile_quads keeps them. The same integer sums and float order as q6k_rows.
template <typename S, int MT>
void q6k_many_rows(const QuantizedRows& qr, int64_t p, int h0, const uint8_t* tile, const S* tscale,
                   float (*y)[16], const uint8_t* next) {
  const int64_t K = qr.K, blocks = K / 32, groups = K / kQ6Group;
  const int32_t* xq = qr.q.data() + p * (K / 4) * MT;
  const float* xs = qr.scale.data() + p * blocks * MT;
  const int32_t* xstart = qr.start.data() + p * blocks * MT;
  const int32_t* xhalf = qr.half.data() + p * blocks * MT;
  alignas(32) __m256 sums[2][MT];
  __m256(*acc)[MT] = sums;
  asm("" : "+r"(acc));  // through a pointer GCC cannot see through: kept in L1, not spilled per block
  __m256(&F)[MT] = acc[0];
  __m256(&G)[MT] = acc[1];
  for (int m = 0; m < MT; ++m) F[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const qk_m512 sv = load16_f32<S>(tscale + g * kTile);
    for (int m = 0; m < MT; ++m) G[m] = _mm256_setzero_ps();
    for (int64_t b = g * (kQ6Group / 32); b < (g + 1) * (kQ6Group / 32); ++b) {
      const uint8_t* wb = tile + b * kQ6BlockBytes;
      const int32_t* xb = xq + b * 8 * MT;
      if (next != nullptr && h0 == 0) prefetch_lines<kQ6BlockBytes>(next + b * kQ6BlockBytes);
      __m256i q[2][4], s16[2], s32[2];
      for (int sb = 0; sb < 2; ++sb) q6k_unpack_half(wb, sb, h0, q[sb], s16[sb], s32[sb]);
      for (int m = 0; m < MT; ++m) {
        __m256i iacc = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int sb = 0; sb < 2; ++sb) {
          const int32_t start = sb == 0 ? xhalf[b * MT + m] : xstart[b * MT + m] - xhalf[b * MT + m];
          const __m256i sum = q6k_sub_sum<MT>(q[sb], s16[sb], s32[sb], start, xb + 4 * sb * MT + m);
          iacc = sb == 0 ? sum : _mm256_add_epi32(iacc, sum);
        }
        G[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_set1_ps(xs[b * MT + m]), G[m]);
      }
    }
    for (int m = 0; m < MT; ++m) F[m] = _mm256_fmadd_ps(G[m], h0 == 0 ? sv.lo : sv.hi, F[m]);
  }
  for (int m = 0; m < MT; ++m) _mm256_storeu_ps(y[m] + 8 * h0, F[m]);
}

// q6k_tile on AVX2/AVX-VNNI: each half of the tile apart (the registers of one half); 1-2 rows by
// q6k_rows, more by q6k_many_rows.
template <typename S, int MT>
void q6k_tile(const QuantizedRows& qr, int64_t p, const uint8_t* tile, const S* tscale, const Output& out,
              int64_t m0, int64_t n0, const uint8_t* next) {
  alignas(32) float y[MT][16];
  for (int h0 = 0; h0 < 2; ++h0) {
    if constexpr (MT >= 4)
      q6k_many_rows<S, MT>(qr, p, h0, tile, tscale, y, next);
    else
      q6k_rows<S, MT, MT>(qr, p, 0, h0, tile, tscale, y, next);
  }
  for (int m = 0; m < MT; ++m) out.store(m0 + m, n0, _mm512_loadu_ps(y[m]));
}
#endif

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
template <int BITS, typename S, bool TABLE = false>
void int_run(const QuantizedRows& qr, const uint8_t* codes, const S* scale, const S* shift, int64_t N,
             int64_t group_size, const Output& out) {
  const int64_t groups = qr.groups, tile_bytes = int_tile_bytes(BITS, qr.K);
  parallel_tiles(N, qr.rows, tile_bytes, [&](int64_t t, int64_t m0, int64_t mt) {
    const uint8_t* tile = codes + t * tile_bytes;
    const S* ts = scale + t * groups * kTile;
    const S* th = shift == nullptr ? nullptr : shift + t * groups * kTile;
    const int64_t p = m0 / qr.pass;
    const uint8_t* next = next_tile(tile, tile_bytes, t, N, qr.rows);
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
  });
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
  const int64_t padded = padded_rows(M);
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

constexpr float kF16Tiny = 6.103515625e-05f;  // float16's smallest normal value

// quant/quantizer.py's round_scale: a scale rounded *up* to a float16 value (at least kF16Tiny), so the
// group's whole range stays on the grid with the stored scale.
inline float round_scale_up_f16(float scale) {
  c10::Half s16(std::max(scale, kF16Tiny));
  if (float(s16) < scale) s16 = c10::Half(uint16_t(s16.x + 1), c10::Half::from_bits());
  return float(s16);
}

// Round-to-nearest quantization of an (N, K) bf16, fp16 or fp32 weight in groups of `group` inputs (the last
// one shorter when `group` does not divide K), exactly as quant/rtn.py's quantize_weight_rtn computes it
// in torch: per group the range [min(w, 0), max(w, 0)] (symmetric: +-max |w|; an all-zero group [-1, 1]),
// scale = range / (2^bits - 1) in fp32, zero = 2^(bits-1) (symmetric) or round-half-even(-min / scale)
// from that scale, then the scale rounded up to an fp16 value, code = clamp(round(w / scale) + zero, 0,
// 2^bits - 1). Returns codes (N, K) uint8, scales (G, N) fp32, zeros (G, N) int16. One pass a row: torch's
// dozen full passes took 8.5 s of a 0.5B model's `--quantize int4` load.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rtn(const at::Tensor& weight, int64_t bits, int64_t group,
                                                            bool sym) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(weight.dim() == 2 && (dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat),
              "qwenkit quantize_rtn: weight must be (N, K) bfloat16, float16 or float32");
  TORCH_CHECK((bits == 4 || bits == 8) && group > 0, "qwenkit quantize_rtn: bits 4 or 8, a positive group");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), G = (K + group - 1) / group;
  const float maxq = float((1 << bits) - 1);
  at::Tensor codes = at::empty({N, K}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({G, N}, w.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({G, N}, w.options().dtype(at::kShort));
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  int16_t* zp = zeros.data_ptr<int16_t>();
  const void* src = w.data_ptr();
  parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> buffer(K);
    float* __restrict row = buffer.data();  // locals: byte stores below may not alias them (else no SIMD)
    for (int64_t n = n0; n < n1; ++n) {
      if (dtype == at::kBFloat16) {
        const uint16_t* __restrict r = static_cast<const uint16_t*>(src) + n * K;
        for (int64_t k = 0; k < K; ++k) row[k] = c10::detail::f32_from_bits(r[k]);
      } else if (dtype == at::kHalf) {
        const at::Half* __restrict r = static_cast<const at::Half*>(src) + n * K;
        for (int64_t k = 0; k < K; ++k) row[k] = float(r[k]);
      } else {
        std::memcpy(row, static_cast<const float*>(src) + n * K, K * 4);
      }
      uint8_t* __restrict out = cp + n * K;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * group, k1 = std::min(K, k0 + group);
        // the group's min and max in 16 independent lanes (one chain each: vectorized, no latency chain)
        float lo16[16], hi16[16], lo = row[k0], hi = row[k0];
        for (int j = 0; j < 16; ++j) lo16[j] = hi16[j] = row[k0];
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16)
          for (int j = 0; j < 16; ++j) lo16[j] = std::min(lo16[j], row[k + j]), hi16[j] = std::max(hi16[j], row[k + j]);
        for (int j = 0; j < 16; ++j) lo = std::min(lo, lo16[j]), hi = std::max(hi, hi16[j]);
        for (; k < k1; ++k) lo = std::min(lo, row[k]), hi = std::max(hi, row[k]);
        float xmin = std::min(lo, 0.f), xmax = std::max(hi, 0.f);
        if (sym) {
          xmax = std::max(std::fabs(xmin), xmax);
          if (xmin < 0) xmin = -xmax;
        }
        if (xmin == 0 && xmax == 0) xmin = -1.f, xmax = 1.f;
        const float scale = (xmax - xmin) / maxq;
        const float zero = sym ? float(1 << (bits - 1)) : std::nearbyint(-xmin / scale);
        const float step = round_scale_up_f16(scale), top = maxq;
        for (int64_t i = k0; i < k1; ++i)
          out[i] = uint8_t(int32_t(std::min(top, std::max(0.f, std::nearbyint(row[i] / step) + zero))));
        sp[g * N + n] = step;
        zp[g * N + n] = int16_t(zero);
      }
    }
  });
  return {codes, scales, zeros};
}

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

// ---------------------------------------------------------------------------------------------------
// Rows of logits as the sampler's passes read them: float32, or the model's own bf16 output, widened
// exactly as it is read (a 16-row step of a 49k vocabulary no longer writes a 3 MB float32 copy first).
inline __m512 maskz_load_row16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 maskz_load_row16(__mmask16 m, const uint16_t* p) { return maskz_load_bf16_as_f32(m, p); }
inline __m512 load_row16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_row16(const uint16_t* p) { return load_bf16_as_f32(p); }
inline float row_value(const float* p, int64_t i) { return p[i]; }
inline float row_value(const uint16_t* p, int64_t i) {
  const uint32_t u = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// the float32 bits of 16 values (0 past the mask)
inline __m512i maskz_load_row_bits(__mmask16 m, const float* p) { return _mm512_maskz_loadu_epi32(m, p); }
inline __m512i maskz_load_row_bits(__mmask16 m, const uint16_t* p) {
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16);
}

// A (M, V) float32 or bf16 CPU tensor of logits, contiguous; f(pointer to its first row) for its type.
template <typename F>
auto with_logit_rows(const at::Tensor& x, const char* name, const F& f) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.dim() == 2,
              "qwenkit ", name, ": x must be a float32 or bfloat16 (M, V) CPU tensor, got ", x.scalar_type(), " ",
              x.sizes());
  const at::Tensor xc = x.contiguous();
  if (xc.scalar_type() == at::kFloat) return f(xc, xc.data_ptr<float>());
  return f(xc, reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()));
}

// argmax over the last dimension of float32 or bf16 logits (M, V), as torch.argmax: the first index of the
// largest value, or of the first NaN. torch's runs one row at a time, scalar: 1 ms for a step's 16 rows
// of a 152k vocabulary, more than a layer. Rows are cut into chunks, each reduced in 16 lanes (a lane
// keeps its first maximum), the chunks combined in order.
constexpr int64_t kArgmaxChunk = 16384;

struct ArgmaxPart {
  float value;
  int64_t index;
  bool nan;
};

template <typename T>
ArgmaxPart argmax_chunk(const T* x, int64_t begin, int64_t end) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  __m512i best_at = _mm512_set1_epi32(0);
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  bool nan = false;
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {  // offsets from begin fit in 32 bits (a chunk)
    const __m512 v = load_row16(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
    const __mmask16 up = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, up, v);
    best_at = _mm512_mask_mov_epi32(best_at, up, at);
    at = _mm512_add_epi32(at, step);
  }
  alignas(64) float values[16];
  alignas(64) int32_t where[16];
  _mm512_store_ps(values, best);
  _mm512_store_si512(where, best_at);
  ArgmaxPart part{-INFINITY, begin, false};  // every value -inf: the first index
  for (int l = 0; l < 16; ++l) {  // a lane holds its first maximum; ties go to the lowest index
    const int64_t index = begin + where[l];
    if (values[l] > part.value || (values[l] == part.value && values[l] != -INFINITY && index < part.index))
      part = {values[l], index, false};
  }
  for (; i < end; ++i) {
    const float v = row_value(x, i);
    if (v != v)
      nan = true;
    else if (v > part.value)
      part = {v, i, false};
  }
  if (nan)
    for (int64_t j = begin; j < end; ++j)
      if (row_value(x, j) != row_value(x, j)) return {row_value(x, j), j, true};
  return part;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() != 2 || x.size(1) > 0, "qwenkit argmax_rows: rows must not be empty");
  return with_logit_rows(x, "argmax_rows", [&](const at::Tensor& xc, const auto* p) {
    const int64_t M = xc.size(0), V = xc.size(1), chunks = (V + kArgmaxChunk - 1) / kArgmaxChunk;
    std::vector<ArgmaxPart> parts(M * chunks);
    parallel_for(0, M * chunks, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t m = i / chunks, c = i % chunks;
        parts[i] = argmax_chunk(p + m * V, c * kArgmaxChunk, std::min(V, (c + 1) * kArgmaxChunk));
      }
    });
    at::Tensor out = at::empty({M}, xc.options().dtype(at::kLong));
    int64_t* o = out.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) {
      ArgmaxPart best = parts[m * chunks];
      for (int64_t c = 1; c < chunks && !best.nan; ++c) {
        const ArgmaxPart& part = parts[m * chunks + c];
        if (part.nan || part.value > best.value) best = part;
      }
      o[m] = best.index;
    }
    return out;
  });
}

// bf16 logits (M, V) widened to float32 (exactly, as .float()), and whether each float32 row is all
// finite: the engine's two passes over a step's logits, on these threads. torch's own ran on OpenMP,
// whose worker, spinning after each such region, took a core from the kernels' workers for milliseconds.
at::Tensor widen_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2,
              "qwenkit widen_rows: x must be a bfloat16 (M, V) CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  const int64_t n = xc.numel();
  parallel_for(0, (n + 4095) / 4096, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0 * 4096; i < std::min(n, b1 * 4096); i += 16) {
      const __mmask16 m = tail_mask16(n - i);
      _mm512_mask_storeu_ps(yp + i, m, maskz_load_bf16_as_f32(m, xp + i));
    }
  });
  return y;
}

at::Tensor finite_rows(const at::Tensor& x) {
  return with_logit_rows(x, "finite_rows", [&](const at::Tensor& xc, const auto* p) {
    const int64_t M = xc.size(0), V = xc.size(1);
    at::Tensor out = at::empty({M}, xc.options().dtype(at::kBool));
    bool* o = out.data_ptr<bool>();
    const __m512i exponent = _mm512_set1_epi32(0x7f800000);
    parallel_for(0, M, row_grain(V, 65536), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        __mmask16 bad = 0;  // any lane whose exponent is all ones: inf or NaN
        for (int64_t j = 0; j < V; j += 16) {
          const __m512i v = maskz_load_row_bits(tail_mask16(V - j), p + m * V + j);
          bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(v, exponent), exponent);
        }
        o[m] = bad == 0;
      }
    });
    return out;
  });
}

// ---------------------------------------------------------------------------------------------------
// Small per-layer ops of the decode step, where torch's own run as several kernels (one dispatch and
// one temporary each), which at batch 1 costs more than the arithmetic.

// y = weight * bf16(x * rsqrt(mean(x^2) + eps)), the norm in fp32: what qwenkit's RMSNorm computes for
// bf16 x and weight (F.rms_norm on x.float(), cast back, then the weight multiply), one pass per row.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "qwenkit rms_norm: x and weight must be bfloat16 CPU tensors");
  const int64_t K = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == K, "qwenkit rms_norm: weight must be (", K, ",)");
  at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t M = K == 0 ? 0 : xc.numel() / K;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  auto bf = [](uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; };
  // two passes of light arithmetic: on one thread up to 16 x 896 values (a second one cost more than it saved)
  parallel_for(0, M, row_grain(K, 16384), [&](int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const uint16_t* xr = xp + m * K;
    // the sum of squares in double: a bf16 square is exact there, and the mean does not depend on
    // the order of summation at these sizes
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 v = load_bf16_as_f32(xr + k);
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      s0 = _mm512_fmadd_pd(lo, lo, s0);
      s1 = _mm512_fmadd_pd(hi, hi, s1);
    }
    double ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    for (int64_t i = k; i < K; ++i) ss += double(bf(xr[i])) * double(bf(xr[i]));
    const float r = 1.f / std::sqrt(float(ss / double(K)) + float(eps));
    const __m512 rv = _mm512_set1_ps(r);
    for (k = 0; k + 16 <= K; k += 16)
      store_bf16(yp + m * K + k,
                 _mm512_mul_ps(load_bf16_as_f32(wp + k), round_bf16(_mm512_mul_ps(load_bf16_as_f32(xr + k), rv))));
    for (; k < K; ++k) yp[m * K + k] = f32_to_bf16(bf(wp[k]) * bf(f32_to_bf16(bf(xr[k]) * r)));
  }
  });
  return y;
}

// e^x for 16 floats: Cephes' expf polynomial after reduction by ln 2 (about 1 ulp), 2^n by scalef, so
// large |x| give inf and 0 as expf does.
inline __m512 exp512(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}


// ---------------------------------------------------------------------------------------------------
// The sampler's passes over whole rows of float32 logits (M, V), one row per task: torch's topk took
// 0.5 ms for a 16-row step of a 49k vocabulary (1.6 ms at 152k) and its logsumexp 2.5 ms (9.4 ms).

// The k largest of each row, sorted descending, ties to the lower index; values may be -inf, not NaN
// (the sampler's logits are checked finite first).
// One vector pass per row against a running threshold (the k-th best so far): after the first few
// thousand values almost none pass, so a row costs about what its argmax does.
std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& x, int64_t k) {
  return with_logit_rows(x, "topk_rows", [&](const at::Tensor& xc, const auto* xp) {
  const int64_t M = xc.size(0), V = xc.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "qwenkit topk_rows: k must lie in 1..", V, ", got ", k);
  at::Tensor values = at::empty({M, k}, xc.options().dtype(at::kFloat)),
             ids = at::empty({M, k}, xc.options().dtype(at::kLong));
  float* vp = values.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  using Entry = std::pair<float, int64_t>;
  const auto better = [](const Entry& a, const Entry& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  const int64_t cap = std::max<int64_t>(4 * k, 256);  // candidates held before the k best are picked again
  parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<Entry> kept;
    kept.reserve(cap + 16);
    alignas(64) float pv[16];
    for (int64_t m = m0; m < m1; ++m) {
      const auto* r = xp + m * V;
      kept.clear();
      for (int64_t i = 0; i < k; ++i) {
        TORCH_CHECK(row_value(r, i) == row_value(r, i), "qwenkit topk_rows: row ", m, " holds NaN");
        kept.emplace_back(row_value(r, i), i);
      }
      // Keep the k best of what is held (nth_element); the threshold is the worst of them: a later
      // value enters only if strictly greater, as an equal one has the higher index and loses the tie.
      const auto trim = [&]() {
        std::nth_element(kept.begin(), kept.begin() + (k - 1), kept.end(), better);
        kept.resize(k);
        return kept[k - 1].first;
      };
      float threshold = trim();
      int64_t i = k;
      for (; i + 16 <= V; i += 16) {
        const __m512 v = load_row16(r + i);
        __mmask16 up = _mm512_cmp_ps_mask(v, _mm512_set1_ps(threshold), _CMP_GT_OQ);
        if (!up) continue;
        _mm512_store_ps(pv, v);
        for (; up; up &= up - 1) {
          const int l = __builtin_ctz(up);
          kept.emplace_back(pv[l], i + l);
        }
        if (static_cast<int64_t>(kept.size()) >= cap) threshold = trim();
      }
      for (; i < V; ++i)
        if (row_value(r, i) > threshold) kept.emplace_back(row_value(r, i), i);
      std::sort(kept.begin(), kept.end(), better);
      for (int64_t j = 0; j < k; ++j) {
        vp[m * k + j] = kept[j].first;
        ip[m * k + j] = kept[j].second;
      }
    }
  });
  return std::make_tuple(values, ids);
  });
}

// The largest of a row's V floats (-inf for a row of -inf).
template <typename T>
inline float row_max(const T* r, int64_t V) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 t = tail_mask16(V - i);
    mx = _mm512_mask_max_ps(mx, t, mx, maskz_load_row16(t, r + i));
  }
  return _mm512_reduce_max_ps(mx);
}

// log(sum_i e^(scales[m] * x_i)) of each row m (scales > 0: 1 / each row's temperature), in float32: the
// max first, then the sum of e^(scale * (x_i - max)) in 16 lanes. -inf values add nothing; a row of -inf
// gives -inf. Values may be -inf, not NaN.
at::Tensor logsumexp_rows(const at::Tensor& x, at::ArrayRef<double> scales) {
  return with_logit_rows(x, "logsumexp_rows", [&](const at::Tensor& xc, const auto* xp) {
  const int64_t M = xc.size(0), V = xc.size(1);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == M, "qwenkit logsumexp_rows: one scale per row: ", M, " rows, ",
              scales.size(), " scales");
  for (double sc : scales) TORCH_CHECK(sc > 0, "qwenkit logsumexp_rows: scales must be positive, got ", sc);
  at::Tensor out = at::empty({M}, xc.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const auto* r = xp + m * V;
      const float top = row_max(r, V);
      if (top == -INFINITY) {
        op[m] = top;
        continue;
      }
      const float s = static_cast<float>(scales[m]);
      const __m512 sv = _mm512_set1_ps(s), tv = _mm512_set1_ps(top);
      __m512 total = _mm512_setzero_ps();
      for (int64_t i = 0; i < V; i += 16) {
        const __mmask16 t = tail_mask16(V - i);
        const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(maskz_load_row16(t, r + i), tv), sv));
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(t, e));
      }
      op[m] = s * top + std::log(_mm512_reduce_add_ps(total));
    }
  });
  return out;
  });
}


// A categorical draw per row from softmax(scales[m] * x) by its cumulative sum, without writing the
// probabilities: e_i = e^(scale * (x_i - max)), tokens with e_i < min_ps[m] (min-p: below min_p times
// the most likely) count as 0, and the draw is the first index whose running sum of e exceeds
// us[m] * sum(e), us in [0, 1). Three passes over the row (max, sum, search; the search stops at the
// draw), where torch's divide, softmax, cumsum and searchsorted wrote a (rows, V) tensor each: 12 ms for
// 16 rows of a 152k vocabulary, this about 1 ms. x may hold -inf, not NaN.
at::Tensor sample_cdf_rows(const at::Tensor& x, at::ArrayRef<double> scales, at::ArrayRef<double> min_ps,
                           at::ArrayRef<double> us) {
  TORCH_CHECK(x.dim() != 2 || x.size(1) > 0, "qwenkit sample_cdf_rows: rows must not be empty");
  return with_logit_rows(x, "sample_cdf_rows", [&](const at::Tensor& xc, const auto* xp) {
  const int64_t M = xc.size(0), V = xc.size(1);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == M && static_cast<int64_t>(min_ps.size()) == M &&
                  static_cast<int64_t>(us.size()) == M,
              "qwenkit sample_cdf_rows: one scale, min_p and uniform per row: ", M, " rows");
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(scales[m] > 0 && min_ps[m] >= 0 && min_ps[m] <= 1 && us[m] >= 0 && us[m] < 1,
                "qwenkit sample_cdf_rows: row ", m, " needs scale > 0, min_p in [0, 1] and u in [0, 1)");
  at::Tensor out = at::empty({M}, xc.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const auto* r = xp + m * V;
      const float top = row_max(r, V);
      const __m512 sv = _mm512_set1_ps(static_cast<float>(scales[m])), tv = _mm512_set1_ps(top),
                   floor = _mm512_set1_ps(static_cast<float>(min_ps[m]));
      // e of 16 values from i, 0 past the end, below the min-p floor, or where x is -inf
      const auto e16 = [&](int64_t i) {
        const __mmask16 t = tail_mask16(V - i);
        const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(maskz_load_row16(t, r + i), tv), sv));
        return _mm512_maskz_mov_ps(t & _mm512_cmp_ps_mask(e, floor, _CMP_GE_OQ), e);
      };
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < V; i += 16) sum = _mm512_add_ps(sum, e16(i));
      const float target = static_cast<float>(us[m]) * _mm512_reduce_add_ps(sum);
      int64_t pick = -1, last = 0;
      float running = 0.f;
      alignas(64) float e[16];
      for (int64_t i = 0; i < V && pick < 0; i += 16) {
        _mm512_store_ps(e, e16(i));
        for (int l = 0; l < 16 && i + l < V; ++l) {
          if (e[l] == 0.f) continue;
          last = i + l;
          running += e[l];
          if (running > target) {
            pick = last;
            break;
          }
        }
      }
      op[m] = pick >= 0 ? pick : last;  // rounding left the target past the sum: the last possible token
    }
  });
  return out;
  });
}


// splitmix64's mix of key + id * golden as an Exp(1) value -log(u), u in (0, 1): the same noise, bit for
// bit in its uniform, as the sampler's ``_keyed_exp``.
inline double keyed_exp(int64_t key, int64_t id) {
  uint64_t z = static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(key);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return -std::log((static_cast<double>(z >> 11) + 0.5) * 0x1.0p-53);
}

// A top-p draw per row without sorting the row: e_i = e^(scale * (x_i - max)), Z = sum e. Token j is in
// the nucleus when the mass of the tokens better than it (larger e, or equal e and a lower index) is
// below top_p * Z; of those, tokens with e < min_p are dropped; the draw is the race argmax e_j / E_j
// with E_j = keyed_exp(key, j). The nucleus boundary comes from a histogram of e by its float bits (16
// buckets an octave), only the boundary bucket's tokens sorted. Tokens with e below (1 - top_p) * Z / V
// cannot be in any nucleus (all such tokens together hold less than 1 - top_p of the mass) and are
// skipped by a vector compare. x may hold -inf, not NaN.
at::Tensor sample_top_p_rows(const at::Tensor& x, at::ArrayRef<double> scales, at::ArrayRef<double> top_ps,
                             at::ArrayRef<double> min_ps, at::IntArrayRef keys) {
  TORCH_CHECK(x.dim() != 2 || x.size(1) > 0, "qwenkit sample_top_p_rows: rows must not be empty");
  return with_logit_rows(x, "sample_top_p_rows", [&](const at::Tensor& xc, const auto* xp) {
  const int64_t M = xc.size(0), V = xc.size(1);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == M && static_cast<int64_t>(top_ps.size()) == M &&
                  static_cast<int64_t>(min_ps.size()) == M && static_cast<int64_t>(keys.size()) == M,
              "qwenkit sample_top_p_rows: one scale, top_p, min_p and key per row: ", M, " rows");
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(scales[m] > 0 && top_ps[m] > 0 && top_ps[m] <= 1 && min_ps[m] >= 0 && min_ps[m] <= 1,
                "qwenkit sample_top_p_rows: row ", m, " needs scale > 0, top_p in (0, 1] and min_p in [0, 1]");
  at::Tensor out = at::empty({M}, xc.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  constexpr int kBuckets = 1024;
  const auto bucket_of = [](float e) {  // e in (0, 1]: 0 for e = 1, larger as e shrinks
    uint32_t u;
    std::memcpy(&u, &e, 4);
    return static_cast<int>(std::min<uint32_t>(kBuckets - 1, (0x3F800000u - u) >> 19));
  };
  parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> mass(kBuckets);
    std::vector<std::pair<float, int64_t>> edge;
    alignas(64) float e16[16];
    for (int64_t m = m0; m < m1; ++m) {
      const auto* r = xp + m * V;
      const float top = row_max(r, V);
      const __m512 sv = _mm512_set1_ps(static_cast<float>(scales[m])), tv = _mm512_set1_ps(top);
      const auto exps = [&](int64_t i) {  // e of 16 values from i, 0 past the end or where x is -inf
        const __mmask16 t = tail_mask16(V - i);
        return _mm512_maskz_mov_ps(t, exp512(_mm512_mul_ps(_mm512_sub_ps(maskz_load_row16(t, r + i), tv), sv)));
      };
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < V; i += 16) sum = _mm512_add_ps(sum, exps(i));
      const float Z = _mm512_reduce_add_ps(sum), p = static_cast<float>(top_ps[m]) * Z;
      const __m512 skip = _mm512_set1_ps((1.f - static_cast<float>(top_ps[m])) * Z / static_cast<float>(V));
      // mass per bucket of the tokens that may be in the nucleus
      std::fill(mass.begin(), mass.end(), 0.f);
      // calls f(e, j) for every token j that may be in the nucleus (e >= skip and e > 0), in order
      const auto each_candidate = [&](const auto& f) {
        for (int64_t i = 0; i < V; i += 16) {
          const __m512 e = exps(i);
          __mmask16 in = _mm512_cmp_ps_mask(e, skip, _CMP_GE_OQ) & _mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_GT_OQ);
          if (!in) continue;
          _mm512_store_ps(e16, e);
          for (; in; in &= in - 1) {
            const int l = __builtin_ctz(in);
            f(e16[l], i + l);
          }
        }
      };
      each_candidate([&](float e, int64_t) { mass[bucket_of(e)] += e; });
      int boundary = 0;
      float before = 0.f;  // mass of the buckets better than the boundary bucket
      while (boundary < kBuckets - 1 && before + mass[boundary] < p) before += mass[boundary++];
      // the boundary bucket's tokens, best first (ties to the lower index), kept while the mass before
      // each is below p: the last kept one is the cut
      edge.clear();
      each_candidate([&](float e, int64_t j) {
        if (bucket_of(e) == boundary) edge.emplace_back(e, j);
      });
      std::sort(edge.begin(), edge.end(), [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
      std::pair<float, int64_t> cut{INFINITY, -1};  // tokens of the boundary bucket at or better than cut
      float running = before;
      for (const auto& t : edge) {
        if (running >= p) break;
        cut = t;
        running += t.first;
      }
      const float floor = static_cast<float>(min_ps[m]);
      double best = -1.0;
      int64_t pick = -1;
      each_candidate([&](float v, int64_t j) {
        const int b = bucket_of(v);
        const bool member = b < boundary || (b == boundary && (v > cut.first || (v == cut.first && j <= cut.second)));
        if (!member || v < floor) return;
        const double ratio = v / keyed_exp(keys[m], j);
        if (ratio > best) best = ratio, pick = j;
      });
      op[m] = pick >= 0 ? pick : 0;
    }
  });
  return out;
  });
}


// silu(gate) * up for x = [gate | up] (..., 2F) bf16 -> (..., F) bf16, each product rounded as torch's
// F.silu(gate) * up rounds it (silu to bf16, then the product to bf16).
at::Tensor silu_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "qwenkit silu_mul: x must be bfloat16 on the CPU");
  const int64_t F2 = x.size(-1);
  TORCH_CHECK(F2 % 2 == 0, "qwenkit silu_mul: the last dimension must be even, got ", F2);
  const int64_t F = F2 / 2;
  at::Tensor xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = F;
  at::Tensor y = at::empty(shape, x.options());
  const int64_t M = F == 0 ? 0 : xc.numel() / F2;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  auto bf = [](uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; };
  const __m512 one = _mm512_set1_ps(1.f);
  parallel_for(0, M, row_grain(F2), [&](int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const uint16_t* gate = xp + m * F2;
    const uint16_t* up = gate + F;
    int64_t f = 0;
    for (; f + 16 <= F; f += 16) {
      const __m512 g = load_bf16_as_f32(gate + f);
      const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      const __m512 p = _mm512_mul_ps(round_bf16(s), load_bf16_as_f32(up + f));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(yp + m * F + f), (__m256i)_mm512_cvtneps_pbh(p));
    }
    for (; f < F; ++f) {
      const float g = bf(gate[f]);
      const float s = bf(f32_to_bf16(g / (1.f + std::exp(-g))));
      yp[m * F + f] = f32_to_bf16(s * bf(up[f]));
    }
  }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------
// Decode attention, flash-decoding style: each row's keys are cut into chunks of kAttnChunk (boundaries
// a function of that row's own key count only), each (row, KV head, chunk) is an independent partial
// softmax (max, sum, weighted values) for all G query heads sharing that KV head, and the partials are
// combined in chunk order. A row's arithmetic is thus the same alone or in any batch, on any number of
// threads, and run to run.

constexpr int64_t kAttnChunk = 128;  // keys per partial softmax
constexpr int kAttnHeads = 8;        // query heads accumulated together in one pass over the values

// Lane i of the result = horizontal sum of r[i]: 16 dot products' partial sums reduced by a transpose
// tree (45 instructions for 16 sums instead of 16 full horizontal reductions).
inline __m512 attn_sum16(const __m512 (&r)[16]) {
  __m512 t[8], u[4], w[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // 128-bit lane: [r2i, r2i+1, r2i, r2i+1] partials
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]), _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // 128-bit lane: [r4i .. r4i+3] partials
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: [r8i..8i+3, same, r8i+4..8i+7, same]
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// q . k in 16 lanes of partial sums, by bf16 pair products (exact in fp32). qv: the query in pieces of
// 32 (the last one zero-padded when D % 32 == 16); NQ = D / 16, or 0 for a head dim known only at run time.
template <int NQ>
inline __m512 attn_dot(const __m512i* qv, const uint16_t* k, int64_t nq) {
  const int64_t n = NQ > 0 ? NQ : nq;
  __m512 a = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int64_t i = 0; i < n / 2; ++i)
    a = _mm512_dpbf16_ps(a, (__m512bh)qv[i], (__m512bh)_mm512_loadu_si512(k + 32 * i));
  if (n % 2)
    a = _mm512_dpbf16_ps(a, (__m512bh)qv[n / 2], (__m512bh)_mm512_maskz_loadu_epi16(0xffff, k + 32 * (n / 2)));
  return a;
}

// Prefetches the `bytes` of a key or value row (into L1 for T0, L2 for T1).
template <_mm_hint HINT>
inline void attn_prefetch_row(const uint16_t* row, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + o, HINT);
}

// Scaled scores of `count` keys (rows krows) for G query heads (qh, G x D) into sc[g * kAttnChunk + j]:
// 16 keys at a time, each read from memory once for all G heads (and kept in L1 while they are scored).
// The gather table says where every key is, so all of the chunk's keys are prefetched to L2 up front
// (scattered blocks defeat the hardware prefetchers), the next 16 to L1, and these 16 keys' values to L2.
template <int NQ>
void attn_scores(const uint16_t* qh, int64_t G, int64_t D, const uint16_t* const* krows,
                 const uint16_t* const* vrows, int64_t count, float scale, float* sc) {
  const int64_t nq = D / 16;
  constexpr int kMaxPieces = NQ > 0 ? (NQ + 1) / 2 : 1;
  std::vector<__m512i> qbuf(NQ > 0 ? 0 : (nq + 1) / 2);
  __m512i qfixed[kMaxPieces];
  __m512i* qv = NQ > 0 ? qfixed : qbuf.data();
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t j = 16; j < count; ++j) attn_prefetch_row<_MM_HINT_T1>(krows[j], 2 * D);
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    for (int64_t j = j0 + 16; j < std::min<int64_t>(count, j0 + 32); ++j) attn_prefetch_row<_MM_HINT_T0>(krows[j], 2 * D);
    for (int64_t j = j0; j < std::min<int64_t>(count, j0 + 16); ++j) attn_prefetch_row<_MM_HINT_T1>(vrows[j], 2 * D);
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* q = qh + g * D;
      for (int64_t i = 0; i < nq / 2; ++i) qv[i] = _mm512_loadu_si512(q + 32 * i);
      if (nq % 2) qv[nq / 2] = _mm512_maskz_loadu_epi16(0xffff, q + 32 * (nq / 2));
      __m512 r[16];
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj)  // keys past the end score the first key again; masked later
        r[jj] = attn_dot<NQ>(qv, krows[j0 + jj < count ? j0 + jj : 0], nq);
      _mm512_storeu_ps(sc + g * kAttnChunk + j0, _mm512_mul_ps(attn_sum16(r), sv));
    }
  }
}

// acc[g * D + d0 + i] = sum_j p[g * kAttnChunk + j] * v_j[d0 + i] for GH heads, i < 16 * NV: one pass over
// the keys' values, the GH x NV accumulators in registers.
template <int GH, int NV>
void attn_values(const float* p, const uint16_t* const* vrows, int64_t count, int64_t d0, int64_t D, float* acc) {
  __m512 a[GH][NV];
#pragma GCC unroll 8
  for (int g = 0; g < GH; ++g)
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) a[g][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    const uint16_t* v = vrows[j] + d0;
    __m512 x[NV];
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) x[i] = load_bf16_as_f32(v + 16 * i);
#pragma GCC unroll 8
    for (int g = 0; g < GH; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * kAttnChunk + j]);
#pragma GCC unroll 4
      for (int i = 0; i < NV; ++i) a[g][i] = _mm512_fmadd_ps(w, x[i], a[g][i]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GH; ++g)
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + g * D + d0 + 16 * i, a[g][i]);
}

template <int NV>
void attn_values_heads(int64_t gh, const float* p, const uint16_t* const* vrows, int64_t count, int64_t d0,
                       int64_t D, float* acc) {
  switch (gh) {
    case 1: attn_values<1, NV>(p, vrows, count, d0, D, acc); break;
    case 2: attn_values<2, NV>(p, vrows, count, d0, D, acc); break;
    case 3: attn_values<3, NV>(p, vrows, count, d0, D, acc); break;
    case 4: attn_values<4, NV>(p, vrows, count, d0, D, acc); break;
    case 5: attn_values<5, NV>(p, vrows, count, d0, D, acc); break;
    case 6: attn_values<6, NV>(p, vrows, count, d0, D, acc); break;
    case 7: attn_values<7, NV>(p, vrows, count, d0, D, acc); break;
    default: attn_values<8, NV>(p, vrows, count, d0, D, acc); break;
  }
}

// One partial softmax: `count` keys (rows krows / vrows) against the G query heads at qh. Writes, per
// head g, the scores' max m[g], sum[g] = sum_j e^(s_j - m), and acc[g * D ..] = sum_j e^(s_j - m) v_j.
// sc: scratch of G * kAttnChunk floats.
void attn_partial(const uint16_t* qh, int64_t G, int64_t D, const uint16_t* const* krows,
                  const uint16_t* const* vrows, int64_t count, float scale, float* sc, float* m, float* sum,
                  float* acc) {
  switch (D / 16) {
    case 1: attn_scores<1>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 2: attn_scores<2>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 3: attn_scores<3>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 4: attn_scores<4>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 5: attn_scores<5>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 6: attn_scores<6>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 7: attn_scores<7>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 8: attn_scores<8>(qh, G, D, krows, vrows, count, scale, sc); break;
    case 16: attn_scores<16>(qh, G, D, krows, vrows, count, scale, sc); break;
    default: attn_scores<0>(qh, G, D, krows, vrows, count, scale, sc); break;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = sc + g * kAttnChunk;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < count; j += 16) mx = _mm512_mask_max_ps(mx, tail_mask16(count - j), mx, _mm512_loadu_ps(s + j));
    const float mg = _mm512_reduce_max_ps(mx);
    const __m512 mv = _mm512_set1_ps(mg);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < count; j += 16) {  // keys past the end get weight 0
      const __m512 e = _mm512_maskz_mov_ps(tail_mask16(count - j), exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv)));
      _mm512_storeu_ps(s + j, e);
      total = _mm512_add_ps(total, e);
    }
    m[g] = mg;
    sum[g] = _mm512_reduce_add_ps(total);
  }
  for (int64_t g0 = 0; g0 < G; g0 += kAttnHeads) {
    const int64_t gh = std::min<int64_t>(kAttnHeads, G - g0);
    const float* p = sc + g0 * kAttnChunk;
    float* a = acc + g0 * D;
    int64_t d0 = 0;
    if (gh <= 6)  // 4 vectors per head still fit the registers: fewer passes over the values
      for (; d0 + 64 <= D; d0 += 64) attn_values_heads<4>(gh, p, vrows, count, d0, D, a);
    for (; d0 + 32 <= D; d0 += 32) attn_values_heads<2>(gh, p, vrows, count, d0, D, a);
    if (d0 < D) attn_values_heads<1>(gh, p, vrows, count, d0, D, a);
  }
}

// Combines one (row, KV head)'s partial softmaxes (each m[G], sum[G], acc[G * D], `stride` floats
// apart) in chunk order: rescaled to the common max, summed, divided; out: the G heads' bf16 rows.
void attn_combine(const float* part, int64_t chunks, int64_t stride, int64_t G, int64_t D, uint16_t* out) {
  float few[16];  // a context of up to 2048 keys: no allocation
  std::vector<float> many(chunks > 16 ? chunks : 0);
  float* coef = chunks > 16 ? many.data() : few;
  for (int64_t g = 0; g < G; ++g) {
    float mx = -INFINITY, total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, part[c * stride + g]);
    for (int64_t c = 0; c < chunks; ++c) {
      coef[c] = std::exp(part[c * stride + g] - mx);
      total += coef[c] * part[c * stride + G + g];
    }
    const __m512 inv = _mm512_set1_ps(1.f / total);
    for (int64_t d = 0; d < D; d += 16) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c)
        a = _mm512_fmadd_ps(_mm512_set1_ps(coef[c]), _mm512_loadu_ps(part + c * stride + 2 * G + g * D + d), a);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * D + d), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(a, inv)));
    }
  }
}

// One query per row over its keys in the paged KV pool, read in place: q (B, H, D), k/v pools
// (slots, Hkv, D), gather (B, S) slot of each key, positions (B,): row b sees keys 0..positions[b].
// Query head i reads KV head i / (H / Hkv) (grouped-query attention). fp32 softmax and sums, bf16 out.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& gather,
                            const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && kc.scalar_type() == at::kBFloat16 && vc.scalar_type() == at::kBFloat16,
              "qwenkit decode_attention: q and the pools must be bfloat16");
  TORCH_CHECK(q.dim() == 3 && kc.dim() == 3 && vc.sizes() == kc.sizes() && kc.is_contiguous() && vc.is_contiguous(),
              "qwenkit decode_attention: q (B, H, D), contiguous pools (slots, Hkv, D)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = kc.size(1), slots = kc.size(0);
  TORCH_CHECK(kc.size(2) == D && Hkv > 0 && H % Hkv == 0 && D % 16 == 0 && D > 0,
              "qwenkit decode_attention: head shapes do not match");
  TORCH_CHECK(gather.scalar_type() == at::kLong && gather.dim() == 2 && gather.size(0) == B &&
                  positions.scalar_type() == at::kLong && positions.numel() == B,
              "qwenkit decode_attention: gather (B, S) and positions (B,) must be int64");
  const int64_t S = gather.size(1), G = H / Hkv;
  // a row's heads must be contiguous; rows may be apart (decode_layer's q: a view into the q/k/v rows)
  const at::Tensor qc = q.stride(2) == 1 && q.stride(1) == D ? q : q.contiguous();
  const int64_t q_row = qc.stride(0);
  const at::Tensor gc = gather.contiguous(), pc = positions.contiguous();
  const int64_t* gp = gc.data_ptr<int64_t>();
  const int64_t* pp = pc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < S, "qwenkit decode_attention: position ", pp[b], " outside the ", S, " gathered keys");
  for (int64_t i = 0; i < B * S; ++i)
    TORCH_CHECK(gp[i] >= 0 && gp[i] < slots, "qwenkit decode_attention: slot ", gp[i], " outside the pool");
  at::Tensor out = at::empty({B, H, D}, q.options());
  if (B == 0 || H == 0) return out;
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(kc.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(vc.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());

  // Tasks (row, chunk, KV head), row-major; first[b] = the index of row b's first task. A chunk's first
  // task fetches its keys' and values' whole pool rows (every KV head's, side by side in the pool) into
  // L2 for the chunk's other heads, which then need not wait on memory each for its own slice: 2-3%
  // of the bundled model's 16-row step on the Zen 4 (adjacent steps alternated).
  std::vector<int64_t> first(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) first[b + 1] = first[b] + Hkv * ((pp[b] + kAttnChunk) / kAttnChunk);
  const int64_t tasks = first[B], stride = G * (D + 2);  // per task: m[G], sum[G], acc[G * D]
  std::vector<float> partial(tasks * stride);
  std::vector<std::atomic<int32_t>> done(B * Hkv);  // chunks finished per (row, KV head), zeroed
  parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> sc;  // a thread's scratch, kept: it runs several chunks a call
    thread_local std::vector<const uint16_t*> krows, vrows;
    sc.resize(G * kAttnChunk);
    krows.resize(kAttnChunk);
    vrows.resize(kAttnChunk);
    int64_t b = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[b + 1]) ++b;
      const int64_t chunks = (first[b + 1] - first[b]) / Hkv, c = (t - first[b]) / Hkv, h = (t - first[b]) % Hkv,
                    j0 = c * kAttnChunk, count = std::min<int64_t>(kAttnChunk, pp[b] + 1 - j0);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t row = gp[b * S + j0 + j] * Hkv * D;
        if (h == 0 && Hkv > 1) {
          attn_prefetch_row<_MM_HINT_T1>(kp + row, 2 * Hkv * D);
          attn_prefetch_row<_MM_HINT_T1>(vp + row, 2 * Hkv * D);
        }
        krows[j] = kp + row + h * D;
        vrows[j] = vp + row + h * D;
      }
      float* part = partial.data() + t * stride;
      attn_partial(qp + b * q_row + h * G * D, G, D, krows.data(), vrows.data(), count, float(scale), sc.data(), part,
                   part + G, part + 2 * G);
      // Whichever thread finishes a (row, KV head)'s last chunk combines them (the same arithmetic
      // whoever does it); acq_rel makes the other chunks' partials visible to it.
      if (done[b * Hkv + h].fetch_add(1, std::memory_order_acq_rel) + 1 == chunks)
        attn_combine(partial.data() + (first[b] + h) * stride, chunks, Hkv * stride, G, D, op + (b * H + h * G) * D);
    }
  });
  return out;
}


// Rotate-half RoPE in place on x (B, T, heads, D) bf16 (any strides but a contiguous last dimension),
// the first `rot` features of every head; cos/sin (B, T, rot). In bf16 (cos/sin bf16) each product and
// the sum are rounded to bf16, as torch's x * cos + rotate_half(x) * sin; in fp32 (cos/sin float32) the
// products and sum stay float and only the result is rounded (Qwen v1's float32 rotation).
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 4 && x.stride(3) == 1,
              "qwenkit rope_: x must be a bfloat16 (B, T, heads, D) CPU tensor with a contiguous last dimension");
  const int64_t B = x.size(0), T = x.size(1), NH = x.size(2), D = x.size(3);
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T && cos.sizes() == sin.sizes() &&
                  cos.scalar_type() == sin.scalar_type() && cos.size(2) % 2 == 0 && cos.size(2) <= D,
              "qwenkit rope_: cos and sin must be (B, T, rot) with an even rot <= head dim");
  const bool f32 = cos.scalar_type() == at::kFloat;
  TORCH_CHECK(f32 || cos.scalar_type() == at::kBFloat16, "qwenkit rope_: cos/sin must be float32 or bfloat16");
  const int64_t rot = cos.size(2), half = rot / 2;
  at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  auto bf = [](uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; };
  auto r = [&](float v) { return bf(f32_to_bf16(v)); };
  uint16_t* xp = reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>());
  const float* cf = f32 ? cc.data_ptr<float>() : nullptr;
  const float* sf = f32 ? sc.data_ptr<float>() : nullptr;
  const uint16_t* cb = f32 ? nullptr : reinterpret_cast<const uint16_t*>(cc.data_ptr<at::BFloat16>());
  const uint16_t* sb = f32 ? nullptr : reinterpret_cast<const uint16_t*>(sc.data_ptr<at::BFloat16>());
  parallel_for(0, B * T, row_grain(NH * rot), [&](int64_t r0, int64_t r1) {
    std::vector<float> c(rot), sn(rot), h(rot);
    for (int64_t bt = r0; bt < r1; ++bt) {
      const int64_t b = bt / T, t = bt % T, o = bt * rot;
      for (int64_t i = 0; i < rot; ++i) {
        c[i] = f32 ? cf[o + i] : bf(cb[o + i]);
        sn[i] = f32 ? sf[o + i] : bf(sb[o + i]);
      }
      for (int64_t hd = 0; hd < NH; ++hd) {
        uint16_t* v = xp + b * x.stride(0) + t * x.stride(1) + hd * x.stride(2);
        if (!f32 && half % 16 == 0) {  // the same roundings, 16 features at a time
          for (int64_t j = 0; j < half; j += 16) {
            const __m512 a = load_bf16_as_f32(v + j), bb = load_bf16_as_f32(v + half + j);
            const __m512 c1 = _mm512_loadu_ps(c.data() + j), c2 = _mm512_loadu_ps(c.data() + half + j);
            const __m512 s1 = _mm512_loadu_ps(sn.data() + j), s2 = _mm512_loadu_ps(sn.data() + half + j);
            const __m512 y1 = round_bf16(_mm512_sub_ps(round_bf16(_mm512_mul_ps(a, c1)), round_bf16(_mm512_mul_ps(bb, s1))));
            const __m512 y2 = round_bf16(_mm512_add_ps(round_bf16(_mm512_mul_ps(bb, c2)), round_bf16(_mm512_mul_ps(a, s2))));
            store_bf16(v + j, y1);
            store_bf16(v + half + j, y2);
          }
          continue;
        }
        for (int64_t i = 0; i < rot; ++i) h[i] = bf(v[i]);
        for (int64_t i = 0; i < rot; ++i) {
          const float other = i < half ? -h[i + half] : h[i - half];  // rotate_half: (-x2, x1)
          const float y = f32 ? h[i] * c[i] + other * sn[i] : r(r(h[i] * c[i]) + r(other * sn[i]));
          v[i] = f32_to_bf16(y);
        }
      }
    }
  });
}


// ---------------------------------------------------------------------------------------------------
// A whole decoder layer for a decode step (1..16 rows, one new token each), in one call: the ops above
// in the order and with the roundings qwenkit's modules use (norm, q/k/v product, RoPE, K/V into the
// pool, attention, o_proj, residual, norm, gate/up product, silu * up, down, residual), so its output
// equals the module path's bit for bit. At batch 1 a layer's dozen Python module calls and torch ops
// cost about as much as its attention; here they are a few C++ calls.

// One linear layer, read from decode_layer's argument lists.
struct LayerLinear {
  int64_t bits = 16;  // 16: bf16 tiles (linear_bf16); 8 / 5 / 4: integer codes (linear_int8/5/4); 6: Q6_K
  at::Tensor w, scale, shift, bias;  // shift, bias: undefined when absent
  int64_t group_size = 0, N = 0, zero_point = 0;
  bool bias_after_rounding = false;  // QuantizedLinear adds its bias to the rounded bf16 output
};

inline c10::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// y += r for a bf16 (rows, N) y, contiguous, and r bf16 of y's shape or one (N) row added to every row
// (the residual x + layer(x); Qwen2's q/k/v bias on an integer product): each sum rounded to bf16 as
// torch's bf16 add does, in place; one loop here instead of a torch call with its dispatch and the
// tensor it allocates (~10 us a layer as at::add, a fiftieth of a 0.5B int4 batch-1 step).
void add_bf16_(at::Tensor& y, const at::Tensor& r) {
  const int64_t N = y.dim() == 2 ? y.size(1) : -1;
  const bool row = r.dim() == 1 && r.size(0) == N;
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 && r.scalar_type() == at::kBFloat16 && y.dim() == 2 &&
                  y.is_contiguous() && (row || y.sizes() == r.sizes()),
              "qwenkit decode_layer: add of a bfloat16 ", r.sizes(), " to a bfloat16 ", y.sizes());
  const at::Tensor rc = r.contiguous();
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const uint16_t* rp = reinterpret_cast<const uint16_t*>(rc.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < y.size(0); ++m) {
    uint16_t* ym = yp + m * N;
    const uint16_t* rm = rp + (row ? 0 : m * N);
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 mk = tail_mask16(N - n);
      const __m512 v = _mm512_add_ps(maskz_load_bf16_as_f32(mk, ym + n), maskz_load_bf16_as_f32(mk, rm + n));
      _mm256_mask_storeu_epi16(ym + n, mk, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

at::Tensor run_linear(const LayerLinear& l, const at::Tensor& x) {
  const c10::optional<at::Tensor> in_kernel = l.bias_after_rounding ? c10::nullopt : present(l.bias);
  at::Tensor y;
  if (l.bits == 16)
    y = linear_bf16(x, l.w, in_kernel, l.N);
  else if (l.bits == 8)
    y = linear_int<8>(x, l.w, l.scale, present(l.shift), in_kernel, l.group_size, l.N, l.zero_point);
  else if (l.bits == 6)
    y = linear_int<6>(x, l.w, l.scale, present(l.shift), in_kernel, l.group_size, l.N, l.zero_point);
  else if (l.bits == 5)
    y = linear_int<5>(x, l.w, l.scale, present(l.shift), in_kernel, l.group_size, l.N, l.zero_point);
  else
    y = linear_int<4>(x, l.w, l.scale, present(l.shift), in_kernel, l.group_size, l.N, l.zero_point);
  if (l.bias_after_rounding && l.bias.defined()) add_bf16_(y, l.bias);  // QuantizedLinear's y + bias
  return y;
}

// Qwen3's per-head RMSNorm of q or k (rows x heads of D features) exactly as the model's norm module
// computes it: one kernel call for a decode step's 16 or fewer rows, else torch's steps (in float, cast
// back, then the weight multiply).
at::Tensor head_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  if (rows <= 16) return rms_norm(x, weight, eps);
  return at::mul(weight, at::rms_norm(x.to(at::kFloat), {D}, c10::nullopt, eps).to(at::kBFloat16));
}

// tensors: [input norm weight, post-attention norm weight, then per linear (q/k/v or q alone, o, gate/up,
//           down): weight or codes, scale, shift, bias, then the q and k norm weights (Qwen3), then
//           k and v as two more linears when q/k/v are three products] (an empty tensor where absent)
// ints:    [H, Hkv, D, then per linear: bits (0: absent), group_size, N, zero_point, bias mode (0 none,
//           1 added in fp32 before rounding, 2 added to the rounded output); k's and v's last]
// floats:  [input norm eps, post-attention norm eps, attention scale, q norm eps, k norm eps]
// x (M, hidden) bf16; pools (slots, Hkv, D) bf16, written at `slots` (M,); gather (M, S), positions (M,)
// as decode_attention; cos/sin (1, M, rot) as rope_. Returns the layer's output (M, hidden).
at::Tensor decode_layer(const at::Tensor& x, at::TensorList tensors, at::IntArrayRef ints, at::ArrayRef<double> floats,
                        at::Tensor k_pool, at::Tensor v_pool, const at::Tensor& slots, const at::Tensor& gather,
                        const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(tensors.size() == 28 && ints.size() == 33 && floats.size() == 5,
              "qwenkit decode_layer: expected 28 tensors, 33 ints and 5 floats, got ", tensors.size(), ", ",
              ints.size(), " and ", floats.size());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(0) >= 1 && x.size(0) <= 16,
              "qwenkit decode_layer: x must be (rows, hidden) bfloat16 with 1..16 rows, got ", x.sizes());
  const int64_t M = x.size(0), H = ints[0], Hkv = ints[1], D = ints[2];
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.size(1) == Hkv && k_pool.size(2) == D && v_pool.sizes() == k_pool.sizes() &&
                  k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.scalar_type() == at::kBFloat16 &&
                  v_pool.scalar_type() == at::kBFloat16,
              "qwenkit decode_layer: the pools must be contiguous bfloat16 (slots, ", Hkv, ", ", D, ")");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == M,
              "qwenkit decode_layer: slots must hold one int64 slot per row");
  LayerLinear lin[6];  // q/k/v (or q), o, gate/up, down, then k and v when q/k/v are three products
  for (int i = 0; i < 6; ++i) {
    LayerLinear& l = lin[i];
    const int64_t first = i < 4 ? 2 + 4 * i : 20 + 4 * (i - 4);  // after the q and k norm weights
    auto t = [&](int j) { const at::Tensor& v = tensors[first + j]; return v.numel() ? v : at::Tensor(); };
    l.w = tensors[first];
    l.scale = t(1);
    l.shift = t(2);
    l.bias = t(3);
    const int64_t* c = ints.data() + 3 + 5 * i;
    l.bits = c[0];
    l.group_size = c[1];
    l.N = c[2];
    l.zero_point = c[3];
    l.bias_after_rounding = c[4] == 2;
    TORCH_CHECK(l.bits == 16 || l.bits == 8 || l.bits == 6 || l.bits == 5 || l.bits == 4 || (i >= 4 && l.bits == 0),
                "qwenkit decode_layer: bits must be 16, 8, 6 (Q6_K), 5 or 4");
  }
  const bool three = lin[4].bits != 0;
  TORCH_CHECK(three == (lin[5].bits != 0), "qwenkit decode_layer: k and v come as two linears or none");
  const int64_t qkv_n = three ? lin[0].N + lin[4].N + lin[5].N : lin[0].N;
  TORCH_CHECK(qkv_n == (H + 2 * Hkv) * D && (!three || (lin[0].N == H * D && lin[4].N == Hkv * D)),
              "qwenkit decode_layer: the q/k/v products have ", qkv_n, " outputs, the heads need ",
              (H + 2 * Hkv) * D);
  // attention
  at::Tensor h = rms_norm(x, tensors[0], floats[0]);
  // (M, (H + 2 Hkv) D): one product, or q, k and v side by side (their weights differ in kind, as a
  // GGUF file's Q4_K q/k and Q6_K v)
  at::Tensor qkv = three ? at::cat({run_linear(lin[0], h), run_linear(lin[4], h), run_linear(lin[5], h)}, 1)
                         : run_linear(lin[0], h);
  at::Tensor heads = qkv.view({1, M, H + 2 * Hkv, D});
  if (tensors[18].numel()) {  // Qwen3: each q and k head normalized before RoPE, as the modules do
    heads.narrow(2, 0, H).copy_(head_norm(heads.narrow(2, 0, H), tensors[18], floats[3]));
    heads.narrow(2, H, Hkv).copy_(head_norm(heads.narrow(2, H, Hkv), tensors[19], floats[4]));
  }
  at::Tensor qk = heads.narrow(2, 0, H + Hkv);
  rope_(qk, cos, sin);
  const at::Tensor slots_c = slots.contiguous();  // kept alive: a copy when slots is a strided view
  const int64_t* sp = slots_c.data_ptr<int64_t>();
  const int64_t nslots = k_pool.size(0), row = Hkv * D;
  auto* kp = reinterpret_cast<uint16_t*>(k_pool.data_ptr<at::BFloat16>());
  auto* vp = reinterpret_cast<uint16_t*>(v_pool.data_ptr<at::BFloat16>());
  const auto* src = reinterpret_cast<const uint16_t*>(qkv.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(sp[m] >= 0 && sp[m] < nslots, "qwenkit decode_layer: slot ", sp[m], " outside the pool");
    const uint16_t* r = src + m * (H + 2 * Hkv) * D;
    std::memcpy(kp + sp[m] * row, r + H * D, row * 2);
    std::memcpy(vp + sp[m] * row, r + (H + Hkv) * D, row * 2);
  }
  at::Tensor q = qkv.view({M, H + 2 * Hkv, D}).narrow(1, 0, H);
  at::Tensor attn = decode_attention(q, k_pool, v_pool, gather, positions, floats[2]).view({M, H * D});
  at::Tensor y = run_linear(lin[1], attn);
  add_bf16_(y, x);  // x + o(attn)
  // feed-forward
  at::Tensor gate_up = run_linear(lin[2], rms_norm(y, tensors[1], floats[1]));
  at::Tensor out = run_linear(lin[3], silu_mul(gate_up));
  add_bf16_(out, y);  // y + down(silu(gate) * up)
  return out;
}

// A run of a model's consecutive decoder layers with their K/V pools, fixed for a model and its KV
// cache, held here once: layer l's arguments are the l-th 28 tensors, 33 ints and 5 floats (as
// decode_layer takes them) and its pools k_pools[l], v_pools[l]. Passing them with every step cost the
// bundled 135M model about 90 us a step (converting ~900 tensors and ~1,000 ints), 2% of its batch-1 step.
struct DecodeRun : torch::CustomClassHolder {
  std::vector<at::Tensor> tensors, k_pools, v_pools;
  std::vector<int64_t> ints;
  std::vector<double> floats;

  DecodeRun(std::vector<at::Tensor> tensors_, std::vector<int64_t> ints_, std::vector<double> floats_,
            std::vector<at::Tensor> k_pools_, std::vector<at::Tensor> v_pools_)
      : tensors(std::move(tensors_)), k_pools(std::move(k_pools_)), v_pools(std::move(v_pools_)),
        ints(std::move(ints_)), floats(std::move(floats_)) {
    const int64_t L = layers();
    TORCH_CHECK(L >= 1 && v_pools.size() == k_pools.size() && static_cast<int64_t>(tensors.size()) == 28 * L &&
                    static_cast<int64_t>(ints.size()) == 33 * L && static_cast<int64_t>(floats.size()) == 5 * L,
                "qwenkit DecodeRun: expected, per layer, 28 tensors, 33 ints, 5 floats and a K and a V pool; got ",
                tensors.size(), " tensors, ", ints.size(), " ints, ", floats.size(), " floats, ", k_pools.size(),
                " K pools and ", v_pools.size(), " V pools");
  }
  int64_t layers() const { return static_cast<int64_t>(k_pools.size()); }
};

// A decode step through a run's layers, each as decode_layer, in one call.
at::Tensor decode_layers(const c10::intrusive_ptr<DecodeRun>& run, const at::Tensor& x, const at::Tensor& slots,
                         const at::Tensor& gather, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& sin) {
  const at::TensorList tensors(run->tensors);
  const at::IntArrayRef ints(run->ints);
  const at::ArrayRef<double> floats(run->floats);
  at::Tensor h = x;
  for (int64_t l = 0; l < run->layers(); ++l)
    h = decode_layer(h, tensors.slice(28 * l, 28), ints.slice(33 * l, 33), floats.slice(5 * l, 5), run->k_pools[l],
                     run->v_pools[l], slots, gather, positions, cos, sin);
  return h;
}

}  // namespace

TORCH_LIBRARY(qwenkit, m) {
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias, int N) -> Tensor");
  m.def("use_amx(bool on) -> bool", &use_amx);  // no tensors: no dispatch key
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
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor gather, Tensor positions, float scale) -> Tensor");
  m.class_<DecodeRun>("DecodeRun")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>>())
      .def("layers", &DecodeRun::layers);
  m.def(
      "decode_layers(__torch__.torch.classes.qwenkit.DecodeRun run, Tensor x, Tensor slots, Tensor gather, "
      "Tensor positions, Tensor cos, Tensor sin) -> Tensor");
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
  m.impl("rope_", &rope_);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_layers", &decode_layers);
}
