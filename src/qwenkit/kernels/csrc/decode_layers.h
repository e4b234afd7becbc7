// decode_layers.h: a decode step through all decoder layers in one call.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// A whole decoder layer for a decode step (1..16 rows, one new token each), in one call: the ops of the parts
// before (linear_bf16, linear_int, step_ops.h, decode_attention.h) in the order and with the roundings
// qwenkit's modules use (norm, q/k/v product, RoPE, K/V into the pool, attention, o_proj, residual, norm,
// gate/up product, silu * up, down, residual), so its output equals the module path's bit for bit. At batch 1
// a layer's dozen Python module calls and torch ops cost about as much as its attention; here they are a few
// C++ calls.

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
  bool small_int4 = false;  // every product int4 codes, at most kRowGroupMacs multiply-adds a layer and row

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
    small_int4 = true;
    for (int64_t l = 0; l < L; ++l) small_int4 = small_int4 && layer_is_small_int4(ints.data() + 33 * l);
  }
  int64_t layers() const { return static_cast<int64_t>(k_pools.size()); }

  // Groups of rows a decode step of `rows` rows splits into, each taken through every layer by one
  // thread with every loop inside it on that thread: 2 where two threads run the kernels, the rows need
  // two of the integer tiles' passes of 8 (9-16 rows) and the layers are small int4 ones; else 1 (the
  // rows together, each op split across the threads). A layer runs a dozen parallel regions and between
  // them serial work (norms, residual adds, K/V copies, the regions' forks and joins): at 16 rows of the
  // bundled model the second thread waited a third of the step (perf). Split, each thread works its
  // rows through. Each row's arithmetic is the same either way (the tiles compute every row on its
  // own), so are the results. Measured per layer at 16 rows, groups against one piece (2 cores,
  // 2026-12-04): int4 1.39x at 1.6M multiply-adds a layer and row, 1.18x at 3.5M (the bundled model),
  // 1.09x at 6.3M, 1.04x at 15.5M, and the whole Qwen2.5-0.5B int4 step (24 such layers streaming from
  // memory, each thread reading every weight) 0.92-0.97x; int8 0.90-1.10x; bf16 0.67-0.90x (AMX's tiles
  // take 16 rows). Not with more threads (a group of 8 rows would hold one thread and leave the others
  // idle), nor below 9 rows (4 rows a thread: 0.77-0.89x).
  int64_t row_groups(int64_t rows) const {
    if (!small_int4 || rows <= kMaxMT || nested_in_region()) return 1;
    at::internal::lazy_init_num_threads();
    return at::get_num_threads() == 2 ? 2 : 1;
  }

 private:
  static constexpr int64_t kRowGroupMacs = 8 << 20;  // a layer's multiply-adds a row (the bundled model 3.5M)

  // ints: decode_layer's 33 for one layer (H, Hkv, D, then per linear its bits, group size, N, zero
  // point and bias mode: q/k/v or q, o, gate/up, down, then k and v)
  static bool layer_is_small_int4(const int64_t* ints) {
    const int64_t H = ints[0], D = ints[2];
    const auto bits = [&](int i) { return ints[3 + 5 * i]; };
    const auto N = [&](int i) { return ints[3 + 5 * i + 2]; };
    for (int i = 0; i < 6; ++i)
      if (bits(i) != 0 && bits(i) != 4) return false;
    const int64_t hidden = N(1), qkv = N(0) + (bits(4) != 0 ? N(4) + N(5) : 0);
    const int64_t macs = hidden * qkv + hidden * H * D + hidden * N(2) + N(3) * (N(2) / 2);
    return macs <= kRowGroupMacs;
  }
};

// A decode step through a run's layers, each as decode_layer, in one call; the rows in
// run->row_groups(M) groups taken through the layers side by side.
at::Tensor decode_layers(const c10::intrusive_ptr<DecodeRun>& run, const at::Tensor& x, const at::Tensor& slots,
                         const at::Tensor& gather, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& sin) {
  const at::TensorList tensors(run->tensors);
  const at::IntArrayRef ints(run->ints);
  const at::ArrayRef<double> floats(run->floats);
  TORCH_CHECK(x.dim() == 2 && slots.dim() == 1 && gather.dim() == 2 && positions.dim() == 1 && cos.dim() == 3 &&
                  sin.dim() == 3,
              "qwenkit decode_layers: x (rows, hidden), slots and positions (rows,), gather (rows, S) and cos/sin "
              "(1, rows, rot) expected");
  const auto through_layers = [&](int64_t r0, int64_t n) {
    const bool all = r0 == 0 && n == x.size(0);
    at::Tensor h = all ? x : x.narrow(0, r0, n);
    const at::Tensor s = all ? slots : slots.narrow(0, r0, n), g = all ? gather : gather.narrow(0, r0, n);
    const at::Tensor p = all ? positions : positions.narrow(0, r0, n);
    const at::Tensor c = all ? cos : cos.narrow(1, r0, n), sn = all ? sin : sin.narrow(1, r0, n);
    for (int64_t l = 0; l < run->layers(); ++l)
      h = decode_layer(h, tensors.slice(28 * l, 28), ints.slice(33 * l, 33), floats.slice(5 * l, 5), run->k_pools[l],
                       run->v_pools[l], s, g, p, c, sn);
    return h;
  };
  const int64_t M = x.size(0), groups = run->row_groups(M);
  if (groups == 1) return through_layers(0, M);
  TORCH_CHECK(slots.size(0) == M && gather.size(0) == M && positions.size(0) == M && cos.size(1) == M &&
                  sin.size(1) == M,
              "qwenkit decode_layers: slots, gather, positions, cos and sin must have one entry per row of x (", M,
              ")");
  at::Tensor out = at::empty_like(x);
  const at::ThreadLocalState caller;  // inference mode and the like: the other thread's ops run under them too
  parallel_parts(0, groups, 1, [&](int64_t g0, int64_t g1) {
    const at::ThreadLocalStateGuard as_caller(caller);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = M * g / groups, r1 = M * (g + 1) / groups;
      out.narrow(0, r0, r1 - r0).copy_(through_layers(r0, r1 - r0));
    }
  });
  return out;
}

// The groups a decode step of `rows` rows through `run` splits into (DecodeRun::row_groups), for tests.
int64_t decode_row_groups(const c10::intrusive_ptr<DecodeRun>& run, int64_t rows) { return run->row_groups(rows); }
