// moe_experts.h: a MoE layer's routed experts over a step's rows, in one call.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// What MoEMLP._dispatch computes, with its roundings, so the result is bit for bit the same: each active
// expert runs once over the rows routed to it (rows ascending), gate/up product, silu * up, down product
// (run_linear, silu_mul: the kernels its modules call); each (row, rank) output is multiplied by its
// routing weight and rounded to bf16; a row's K outputs are then added in rank order, each sum rounded to
// bf16, as torch's bf16 ops round. At decode the Python loop over experts (sort, count, a host sync,
// slices, a module call per expert, gathers, K - 1 adds) cost about as much as reading the experts'
// weights: 1.2 ms against 0.84 for one Qwen3-30B-A3B layer at batch 1 (2026-12-04).
//
// x (M, hidden) bf16; ids (M, K) int64 expert of each (row, rank); weights (M, K) bf16 routing weights;
// tensors: per listed expert, its gate/up then its down product as decode_layer reads a linear (weight or
// codes, scale, shift, bias; an empty tensor where absent); ints: per listed expert, its id, then per
// product bits, group size, N, zero point, bias mode. Every expert some row picks must be listed.
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, at::TensorList tensors,
                       at::IntArrayRef ints) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "qwenkit moe_experts: x must be (rows, hidden) bfloat16 on the CPU, got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong,
              "qwenkit moe_experts: ids must be (rows, top_k) int64, got ", ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kBFloat16,
              "qwenkit moe_experts: weights must be bfloat16 like ids ", ids.sizes(), ", got ", weights.scalar_type(),
              " ", weights.sizes());
  const int64_t E = static_cast<int64_t>(tensors.size()) / 8;
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == 8 * E && static_cast<int64_t>(ints.size()) == 11 * E,
              "qwenkit moe_experts: expected 8 tensors and 11 ints per expert, got ", tensors.size(), " and ",
              ints.size());
  const int64_t M = x.size(0), K = ids.size(1), hidden = x.size(1);
  const at::Tensor xc = x.contiguous(), idc = ids.contiguous(), wc = weights.contiguous();
  const int64_t* idp = idc.data_ptr<int64_t>();
  const at::BFloat16* wp = wc.data_ptr<at::BFloat16>();
  at::Tensor pairs = at::empty({M, K, hidden}, x.options());  // each (row, rank)'s weighted expert output
  at::BFloat16* pp = pairs.data_ptr<at::BFloat16>();
  std::vector<char> done(M * K, 0);
  for (int64_t i = 0; i < E; ++i) {
    const int64_t expert = ints[11 * i];
    LayerLinear products[2];  // gate/up, down
    for (int j = 0; j < 2; ++j) {
      LayerLinear& l = products[j];
      auto t = [&](int k) { const at::Tensor& v = tensors[8 * i + 4 * j + k]; return v.numel() ? v : at::Tensor(); };
      l.w = tensors[8 * i + 4 * j];
      l.scale = t(1);
      l.shift = t(2);
      l.bias = t(3);
      const int64_t* c = ints.data() + 11 * i + 1 + 5 * j;
      l.bits = c[0];
      l.group_size = c[1];
      l.N = c[2];
      l.zero_point = c[3];
      l.bias_after_rounding = c[4] == 2;
      TORCH_CHECK(l.bits == 16 || l.bits == 8 || l.bits == 6 || l.bits == 5 || l.bits == 4,
                  "qwenkit moe_experts: bits must be 16, 8, 6 (Q6_K), 5 or 4, got ", l.bits, " for expert ", expert);
    }
    TORCH_CHECK(products[1].N == hidden, "qwenkit moe_experts: expert ", expert, "'s down product has ",
                products[1].N, " outputs, x has ", hidden, " features");
    std::vector<int64_t> rows, slots;  // rows routed to this expert (ascending) and their (row, rank) slots
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < K; ++r)
        if (idp[m * K + r] == expert) {
          rows.push_back(m);
          slots.push_back(m * K + r);
        }
    if (rows.empty()) continue;
    const bool all = static_cast<int64_t>(rows.size()) == M;  // every row, in order (each picks an expert once)
    const at::Tensor xs = all ? xc : xc.index_select(0, at::tensor(rows, at::kLong));
    const at::Tensor y = run_linear(products[1], silu_mul(run_linear(products[0], xs))).contiguous();
    const at::BFloat16* yp = y.data_ptr<at::BFloat16>();
    for (size_t j = 0; j < rows.size(); ++j) {
      const float w = static_cast<float>(wp[slots[j]]);
      at::BFloat16* out = pp + slots[j] * hidden;
      for (int64_t c = 0; c < hidden; ++c) out[c] = at::BFloat16(static_cast<float>(yp[j * hidden + c]) * w);
      done[slots[j]] = 1;
    }
  }
  for (int64_t s = 0; s < M * K; ++s)
    TORCH_CHECK(done[s], "qwenkit moe_experts: row ", s / K, " picks expert ", idp[s], ", which is not listed");
  at::Tensor out = at::empty({M, hidden}, x.options());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  for (int64_t m = 0; m < M; ++m) {
    const at::BFloat16* first = pp + m * K * hidden;
    at::BFloat16* o = op + m * hidden;
    std::memcpy(o, first, hidden * sizeof(at::BFloat16));
    for (int64_t r = 1; r < K; ++r) {
      const at::BFloat16* p = first + r * hidden;
      for (int64_t c = 0; c < hidden; ++c) o[c] = at::BFloat16(static_cast<float>(o[c]) + static_cast<float>(p[c]));
    }
  }
  return out;
}
