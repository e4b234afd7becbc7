// worker_pool.h: the kernels' own worker threads and parallel_for.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

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

 public:
  // Whether this thread runs a chunk of a job (a worker, or a caller in its own chunk).
  static bool inside() { return in_chunk(); }

 private:

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

// Whether this thread already runs a part of a region (OpenMP's or the kernels' own): a loop it starts
// then runs on it alone (decode_layers' row groups run whole layers so). Checked before openmp_alone,
// which would count an OpenMP worker as another thread calling the kernels.
inline bool nested_in_region() { return at::in_parallel_region() || WorkerPool::inside(); }

// f over [begin, end) in equal parts, one a thread: the regions' fork and join.
template <typename F>
inline void parallel_parts(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (nested_in_region()) {
    f(begin, end);
    return;
  }
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
  if (threads <= 1 || nested_in_region()) {
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
