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

// Qwen3's per-head RMSNorm of q or k (rows x heads of D features) exactly as the model's norm module
// (quant.fused.FastRMSNorm) computes it: one kernel call, whatever the rows. torch's steps for more than
// 16 head rows (a step of 5 rows of 4 heads) summed in another order than the module's kernel: a MoE
// step's logits then differed from the module path's in the last bf16 bit.
at::Tensor head_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm(x, weight, eps);
}

// tensors: [input norm weight, post-attention norm weight, then per linear (q/k/v or q alone, o, gate/up,
//           down): weight or codes, scale, shift, bias, then the q and k norm weights (Qwen3), then
//           k and v as two more linears when q/k/v are three products, then a MoE layer's router weight
//           and its shared expert's gate (Qwen2-MoE), packed for linear_bf16, then served LoRA adapters'
//           at and bt (lora_add_) of q/k/v (all three outputs side by side), o, gate/up and down] (an empty
//           tensor where absent; a MoE layer's gate/up and down are its shared expert's, or absent)
// ints:    [H, Hkv, D, then per linear: bits (0: absent), group_size, N, zero_point, bias mode (0 none,
//           1 added in fp32 before rounding, 2 added to the rounded output); k's and v's last; then a MoE
//           layer's experts E (0: a dense feed-forward), top k and whether the top k weights are
//           renormalized]
// floats:  [input norm eps, post-attention norm eps, attention scale, q norm eps, k norm eps]
// experts, expert_ints: a MoE layer's E routed experts, 8 tensors and 10 ints each (gate/up, then down,
//           as the linears above); empty for a dense layer.
// x (M, hidden) bf16; pools (slots, Hkv, D) bf16, written at `slots` (M,); gather (M, S), positions (M,)
// as decode_attention; cos/sin (1, M, rot) as rope_; adapters (M,) each row's adapter slot for lora_add_
// (undefined: none). Returns the layer's output (M, hidden).
constexpr int64_t kLayerTensors = 38, kLayerInts = 36, kLayerFloats = 5;

// y += the served adapters' update of a product with input x, where the layer has one for it (tensors
// first, first + 1: at and bt) and the step has adapter rows.
void add_lora(at::Tensor& y, const at::Tensor& x, at::TensorList tensors, int64_t first, const at::Tensor& adapters) {
  if (adapters.defined() && tensors[first].numel()) lora_add_(y, x, tensors[first], tensors[first + 1], adapters);
}

at::Tensor decode_layer(const at::Tensor& x, at::TensorList tensors, at::IntArrayRef ints, at::ArrayRef<double> floats,
                        at::Tensor k_pool, at::Tensor v_pool, const at::Tensor& slots, const at::Tensor& gather,
                        const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                        at::TensorList experts, at::IntArrayRef expert_ints, const at::Tensor& adapters) {
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == kLayerTensors && static_cast<int64_t>(ints.size()) == kLayerInts &&
                  static_cast<int64_t>(floats.size()) == kLayerFloats,
              "qwenkit decode_layer: expected ", kLayerTensors, " tensors, ", kLayerInts, " ints and ", kLayerFloats,
              " floats, got ", tensors.size(), ", ", ints.size(), " and ", floats.size());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(0) >= 1 && x.size(0) <= 16,
              "qwenkit decode_layer: x must be (rows, hidden) bfloat16 with 1..16 rows, got ", x.sizes());
  const int64_t M = x.size(0), H = ints[0], Hkv = ints[1], D = ints[2];
  const int64_t E = ints[33], top_k = ints[34];
  TORCH_CHECK(static_cast<int64_t>(experts.size()) == 8 * E && static_cast<int64_t>(expert_ints.size()) == 10 * E &&
                  (E == 0 || (top_k >= 1 && top_k <= E && tensors[28].numel())),
              "qwenkit decode_layer: a MoE layer's ", E, " experts need 8 tensors and 10 ints each, a router and "
              "1..", E, " picks; got ", experts.size(), " tensors, ", expert_ints.size(), " ints, top k ", top_k);
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.size(1) == Hkv && k_pool.size(2) == D && v_pool.sizes() == k_pool.sizes() &&
                  k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.scalar_type() == at::kBFloat16 &&
                  v_pool.scalar_type() == at::kBFloat16,
              "qwenkit decode_layer: the pools must be contiguous bfloat16 (slots, ", Hkv, ", ", D, ")");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == M,
              "qwenkit decode_layer: slots must hold one int64 slot per row");
  LayerLinear lin[6];  // q/k/v (or q), o, gate/up, down, then k and v when q/k/v are three products
  for (int i = 0; i < 6; ++i) {
    const int64_t first = i < 4 ? 2 + 4 * i : 20 + 4 * (i - 4);  // after the q and k norm weights
    lin[i] = read_linear(tensors, first, ints.data() + 3 + 5 * i);
    const int64_t bits = lin[i].bits;
    const bool may_be_absent = i >= 4 || (E > 0 && i >= 2);  // k and v apart; a MoE layer's shared expert
    TORCH_CHECK(bits == 16 || bits == 8 || bits == 6 || bits == 5 || bits == 4 || (may_be_absent && bits == 0),
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
  add_lora(qkv, h, tensors, 30, adapters);
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
  add_lora(y, attn, tensors, 32, adapters);
  add_bf16_(y, x);  // x + o(attn)
  // feed-forward
  const at::Tensor h2 = rms_norm(y, tensors[1], floats[1]);
  // the dense feed-forward, or a MoE layer's shared expert: down(silu(gate) * up), with their adapters
  const auto feed_forward = [&]() {
    at::Tensor gate_up = run_linear(lin[2], h2);
    add_lora(gate_up, h2, tensors, 34, adapters);
    const at::Tensor act = silu_mul(gate_up);
    at::Tensor down = run_linear(lin[3], act);
    add_lora(down, act, tensors, 36, adapters);
    return down;
  };
  at::Tensor out;
  if (E == 0) {
    out = feed_forward();
  } else {  // MoEMLP.route, then the routed experts (moe_experts): torch's own softmax, topk and sum
    const at::Tensor logits = linear_bf16(h2, tensors[28], c10::nullopt, E);
    auto [weights, ids] = at::topk(at::softmax(logits, -1, at::kFloat), top_k, -1);
    if (ints[35]) weights = weights / weights.sum(-1, true);
    out = run_experts(h2, ids, weights.to(at::kBFloat16), layer_experts(ids, experts, expert_ints));
    if (lin[2].bits != 0) {  // Qwen2-MoE's shared expert behind its sigmoid gate, as MoEMLP.forward adds it
      TORCH_CHECK(lin[3].bits != 0 && tensors[29].numel(), "qwenkit decode_layer: a shared expert needs its ",
                  "down product and its gate");
      const at::Tensor shared = feed_forward();
      out = at::add(out, at::mul(at::sigmoid(linear_bf16(h2, tensors[29], c10::nullopt, 1)), shared));
    }
  }
  add_bf16_(out, y);  // y + feed-forward(norm(y))
  return out;
}

// A run of a model's consecutive decoder layers with their K/V pools, fixed for a model and its KV
// cache, held here once: layer l's arguments are the l-th 38 tensors, 36 ints and 5 floats (as
// decode_layer takes them) and its pools k_pools[l], v_pools[l]. Passing them with every step cost the
// bundled 135M model about 90 us a step (converting ~900 tensors and ~1,000 ints), 2% of its batch-1 step.
struct DecodeRun : torch::CustomClassHolder {
  std::vector<at::Tensor> tensors, k_pools, v_pools, experts;
  std::vector<int64_t> ints, expert_ints;
  std::vector<double> floats;
  std::vector<int64_t> first_expert;  // layer l's experts: experts first_expert[l] .. first_expert[l + 1] - 1
  bool small_int4 = false;  // every product int4 codes, at most kRowGroupMacs multiply-adds a layer and row

  DecodeRun(std::vector<at::Tensor> tensors_, std::vector<int64_t> ints_, std::vector<double> floats_,
            std::vector<at::Tensor> k_pools_, std::vector<at::Tensor> v_pools_, std::vector<at::Tensor> experts_,
            std::vector<int64_t> expert_ints_)
      : tensors(std::move(tensors_)), k_pools(std::move(k_pools_)), v_pools(std::move(v_pools_)),
        experts(std::move(experts_)), ints(std::move(ints_)), expert_ints(std::move(expert_ints_)),
        floats(std::move(floats_)) {
    const int64_t L = layers();
    TORCH_CHECK(L >= 1 && v_pools.size() == k_pools.size() && static_cast<int64_t>(tensors.size()) == kLayerTensors * L &&
                    static_cast<int64_t>(ints.size()) == kLayerInts * L &&
                    static_cast<int64_t>(floats.size()) == kLayerFloats * L,
                "qwenkit DecodeRun: expected, per layer, ", kLayerTensors, " tensors, ", kLayerInts, " ints, ",
                kLayerFloats, " floats and a K and a V pool; got ", tensors.size(), " tensors, ", ints.size(), " ints, ",
                floats.size(), " floats, ", k_pools.size(), " K pools and ", v_pools.size(), " V pools");
    first_expert.push_back(0);
    for (int64_t l = 0; l < L; ++l) first_expert.push_back(first_expert.back() + ints[kLayerInts * l + 33]);
    TORCH_CHECK(static_cast<int64_t>(experts.size()) == 8 * first_expert.back() &&
                    static_cast<int64_t>(expert_ints.size()) == 10 * first_expert.back(),
                "qwenkit DecodeRun: the layers' ", first_expert.back(), " experts need 8 tensors and 10 ints each; got ",
                experts.size(), " and ", expert_ints.size());
    small_int4 = true;
    for (int64_t l = 0; l < L; ++l) small_int4 = small_int4 && layer_is_small_int4(ints.data() + kLayerInts * l);
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

  // ints: decode_layer's for one layer (H, Hkv, D, then per linear its bits, group size, N, zero point and
  // bias mode: q/k/v or q, o, gate/up, down, then k and v; then the experts of a MoE layer, which is not)
  static bool layer_is_small_int4(const int64_t* ints) {
    if (ints[33] != 0) return false;
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
                         const at::Tensor& sin, const c10::optional<at::Tensor>& adapters) {
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
    const at::Tensor a = !adapters.has_value() ? at::Tensor() : all ? *adapters : adapters->narrow(0, r0, n);
    for (int64_t l = 0; l < run->layers(); ++l) {
      const int64_t e0 = run->first_expert[l], e = run->first_expert[l + 1] - e0;
      h = decode_layer(h, tensors.slice(kLayerTensors * l, kLayerTensors), ints.slice(kLayerInts * l, kLayerInts),
                       floats.slice(kLayerFloats * l, kLayerFloats), run->k_pools[l], run->v_pools[l], s, g, p, c, sn,
                       at::TensorList(run->experts).slice(8 * e0, 8 * e),
                       at::IntArrayRef(run->expert_ints).slice(10 * e0, 10 * e), a);
    }
    return h;
  };
  const int64_t M = x.size(0), groups = run->row_groups(M);
  if (groups == 1) return through_layers(0, M);
  TORCH_CHECK(slots.size(0) == M && gather.size(0) == M && positions.size(0) == M && cos.size(1) == M &&
                  sin.size(1) == M && (!adapters.has_value() || adapters->size(0) == M),
              "qwenkit decode_layers: slots, gather, positions, cos, sin and adapters must have one entry per row of x (",
              M, ")");
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
