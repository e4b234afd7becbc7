// moe_experts.h: a MoE layer's routed experts over a step's rows, in one call.
// Part of cpu_kernels.cpp, which includes it inside its anonymous namespace after the parts before it
// (one translation unit: the parts share its includes and helpers and are not compiled alone).
#pragma once

// One weight's share of a grouped product: its rows' activations, quantized as linear_int quantizes them,
// its codes and scales, and where its outputs go.
template <typename S>
struct GroupPart {
  QuantizedRows qr;
  const uint8_t* codes = nullptr;
  const S* scale = nullptr;
  const S* shift = nullptr;
  at::Tensor y;
  bool amx = false;             // rows enough for AMX (amx_int_runs): the part's tiles run there
  std::vector<int8_t> xblocks;  // then its codes as AMX reads them (codes_by_block)
};

template <int BITS, typename S, bool TABLE>
std::vector<at::Tensor> int_group(const std::vector<at::Tensor>& xs, const std::vector<const LayerLinear*>& ls) {
  const LayerLinear& kind = *ls[0];
  std::vector<GroupPart<S>> parts(ls.size());
  std::vector<Output> outs;
  outs.reserve(ls.size());
  for (size_t i = 0; i < ls.size(); ++i) {
    const at::Tensor x = xs[i].contiguous();
    GroupPart<S>& part = parts[i];
    const int64_t M = x.size(0);
    part.amx = amx_int_runs<BITS>(kind.zero_point, M);  // the same results either way (int_amx.h)
    quantize_rows(x.data_ptr<at::BFloat16>(), M, part.amx ? amx_padded_int_rows(M) : padded_rows(M), x.size(1),
                  kind.group_size, int8_zero_point(BITS, kind.zero_point), part.qr, BITS == 6);
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (part.amx) codes_by_block(part.qr, M, part.xblocks);
#endif
    part.codes = ls[i]->w.data_ptr<uint8_t>();
    part.scale = ls[i]->scale.data_ptr<S>();
    part.shift = ls[i]->shift.defined() ? ls[i]->shift.data_ptr<S>() : nullptr;
    part.y = at::empty({M, kind.N}, x.options());
    outs.emplace_back(part.y, c10::nullopt);
  }
  const int64_t tiles = (kind.N + kTile - 1) / kTile, tile_bytes = int_tile_bytes(BITS, parts[0].qr.K);
  const int64_t items = tiles * static_cast<int64_t>(parts.size());
  parallel_for(0, items, std::max<int64_t>(1, (128 * 1024) / tile_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const GroupPart<S>& part = parts[i / tiles];
#if defined(__AVX512F__) && defined(__AVX512BF16__)
      if (part.amx) {  // a prompt's share: every row against this tile on AMX, x whole in one panel
        amx_int_tiles<BITS, S, TABLE>(part.qr, part.xblocks.data(), part.codes, part.scale, part.shift,
                                      kind.group_size, kind.zero_point, outs[i / tiles], i % tiles, i % tiles + 1,
                                      part.qr.rows);
        continue;
      }
#endif
      for (int64_t m0 = 0; m0 < part.qr.rows; m0 += kMaxMT)
        int_tile_task<BITS, S, TABLE>(part.qr, part.codes, part.scale, part.shift, kind.N, kind.group_size,
                                      outs[i / tiles], i % tiles, m0, std::min<int64_t>(kMaxMT, part.qr.rows - m0));
    }
  });
  std::vector<at::Tensor> ys;
  for (auto& part : parts) ys.push_back(part.y);
  return ys;
}

// Whether ls can run as one grouped product: integer weights of one kind (bits, group size, outputs, zero
// point, scale dtype, with or without shift), no bias, each x small enough to be read from cache by every
// tile (a prompt's larger share takes run_linear's panels).
bool groupable(const std::vector<at::Tensor>& xs, const std::vector<const LayerLinear*>& ls) {
  const LayerLinear& k = *ls[0];
  if (k.bits == 16) return false;
  for (size_t i = 0; i < ls.size(); ++i) {
    const LayerLinear& l = *ls[i];
    if (l.bits != k.bits || l.group_size != k.group_size || l.N != k.N || l.zero_point != k.zero_point ||
        l.scale.scalar_type() != k.scale.scalar_type() || l.shift.defined() != k.shift.defined() || l.bias.defined() ||
        xs[i].size(0) * xs[i].size(1) * 2 > kPanelBytes)
      return false;
  }
  return true;
}

// y_i = ls[i](xs[i]) for every i, each output what run_linear gives it (the same quantized rows, the same
// tile kernels), in one parallel region over all the weights' tiles where groupable: for a decode step's
// experts, 8 small products' forks, joins and ragged ends cost a fifth of reading their weights.
std::vector<at::Tensor> run_linears(const std::vector<at::Tensor>& xs, const std::vector<const LayerLinear*>& ls) {
  if (ls.empty()) return {};
  if (!groupable(xs, ls)) {
    std::vector<at::Tensor> ys;
    for (size_t i = 0; i < ls.size(); ++i) ys.push_back(run_linear(*ls[i], xs[i]));
    return ys;
  }
  const LayerLinear& k = *ls[0];
  for (size_t i = 0; i < ls.size(); ++i)
    check_int_args("qwenkit moe_experts", static_cast<int>(k.bits), xs[i], ls[i]->w, ls[i]->scale, present(ls[i]->shift),
                   c10::nullopt, k.group_size, k.N, k.zero_point);
  const bool half = k.scale.scalar_type() == at::kHalf;
  const auto run = [&](auto bits_c, auto table_c) {
    constexpr int kBits = decltype(bits_c)::value;
    constexpr bool kTable = decltype(table_c)::value;
    return half ? int_group<kBits, at::Half, kTable>(xs, ls) : int_group<kBits, float, kTable>(xs, ls);
  };
  using F = std::false_type;
  switch (k.bits) {
    case 8: return run(std::integral_constant<int, 8>{}, F{});
    case 6: return run(std::integral_constant<int, 6>{}, F{});
    case 5: return run(std::integral_constant<int, 5>{}, F{});
    default:
      if (iq4_table(4, k.zero_point)) return run(std::integral_constant<int, 4>{}, std::true_type{});
      return run(std::integral_constant<int, 4>{}, F{});
  }
}

// A routed expert: its id and its two products (gate/up fused, down).
struct Expert {
  int64_t id;
  LayerLinear gate_up, down;
};

// Expert `id` from 8 tensors at tensors[first] and 10 ints at c (gate/up, then down, as read_linear reads them).
Expert read_expert(int64_t id, at::TensorList tensors, int64_t first, const int64_t* c) {
  Expert e{id, read_linear(tensors, first, c), read_linear(tensors, first + 4, c + 5)};
  for (const LayerLinear* l : {&e.gate_up, &e.down})
    TORCH_CHECK(l->bits == 16 || l->bits == 8 || l->bits == 6 || l->bits == 5 || l->bits == 4,
                "qwenkit moe_experts: bits must be 16, 8, 6 (Q6_K), 5 or 4, got ", l->bits, " for expert ", id);
  return e;
}

// What MoEMLP._dispatch computes, with its roundings, so the result is bit for bit the same: each picked
// expert runs once over the rows routed to it (rows ascending): gate/up product, silu * up, down product
// (run_linear's kernels, the experts' integer products in one parallel region: run_linears); each (row,
// rank) output is multiplied by its routing weight and rounded to bf16; a row's K outputs are then added
// in rank order in fp32 and the sum rounded to bf16 once (as transformers 5's experts add them). At decode
// the Python loop over experts (sort, count, a host sync, slices, a module call per expert, gathers, K - 1
// adds) cost about as much as reading the experts' weights: 1.2 ms against 0.84 for one Qwen3-30B-A3B
// layer at batch 1 (2026-12-04).
//
// x (M, hidden) bf16; ids (M, K) int64 expert of each (row, rank); weights (M, K) bf16 routing weights;
// experts: every expert some row picks (others are skipped).
at::Tensor run_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                       const std::vector<Expert>& experts) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "qwenkit moe_experts: x must be (rows, hidden) bfloat16 on the CPU, got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong,
              "qwenkit moe_experts: ids must be (rows, top_k) int64, got ", ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kBFloat16,
              "qwenkit moe_experts: weights must be bfloat16 like ids ", ids.sizes(), ", got ", weights.scalar_type(),
              " ", weights.sizes());
  const int64_t M = x.size(0), K = ids.size(1), hidden = x.size(1);
  const at::Tensor xc = x.contiguous(), idc = ids.contiguous(), wc = weights.contiguous();
  const int64_t* idp = idc.data_ptr<int64_t>();
  const at::BFloat16* wp = wc.data_ptr<at::BFloat16>();
  at::Tensor pairs = at::empty({M, K, hidden}, x.options());  // each (row, rank)'s weighted expert output
  at::BFloat16* pp = pairs.data_ptr<at::BFloat16>();
  std::vector<char> done(M * K, 0);
  std::vector<std::vector<int64_t>> slots;  // (row, rank) slots routed to each expert run, rows ascending
  std::vector<at::Tensor> xs;               // and their rows of x
  std::vector<const LayerLinear*> gate_ups, downs;
  for (const Expert& e : experts) {
    TORCH_CHECK(e.down.N == hidden, "qwenkit moe_experts: expert ", e.id, "'s down product has ", e.down.N,
                " outputs, x has ", hidden, " features");
    std::vector<int64_t> rows, to;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < K; ++r)
        if (idp[m * K + r] == e.id) {
          rows.push_back(m);
          to.push_back(m * K + r);
        }
    if (rows.empty()) continue;
    const bool all = static_cast<int64_t>(rows.size()) == M;  // every row, in order (each picks an expert once)
    xs.push_back(all ? xc : xc.index_select(0, at::tensor(rows, at::kLong)));
    slots.push_back(std::move(to));
    gate_ups.push_back(&e.gate_up);
    downs.push_back(&e.down);
  }
  std::vector<at::Tensor> hs = run_linears(xs, gate_ups);
  for (auto& h : hs) h = silu_mul(h);
  const std::vector<at::Tensor> ys = run_linears(hs, downs);
  for (size_t a = 0; a < ys.size(); ++a) {
    const at::Tensor y = ys[a].contiguous();
    const uint16_t* yp = reinterpret_cast<const uint16_t*>(y.data_ptr<at::BFloat16>());
    for (size_t j = 0; j < slots[a].size(); ++j) {  // times its routing weight, rounded to bf16
      const int64_t s = slots[a][j];
      const __m512 w = _mm512_set1_ps(static_cast<float>(wp[s]));
      uint16_t* out = reinterpret_cast<uint16_t*>(pp) + s * hidden;
      for (int64_t c = 0; c < hidden; c += 16) {
        const __mmask16 mk = tail_mask16(hidden - c);
        const __m512 v = _mm512_mul_ps(maskz_load_bf16_as_f32(mk, yp + j * hidden + c), w);
        _mm256_mask_storeu_epi16(out + c, mk, (__m256i)_mm512_cvtneps_pbh(v));
      }
      done[s] = 1;
    }
  }
  for (int64_t s = 0; s < M * K; ++s)
    TORCH_CHECK(done[s], "qwenkit moe_experts: row ", s / K, " picks expert ", idp[s], ", which is not listed");
  // each row's K outputs added in rank order in fp32, the sum rounded to bf16 once
  at::Tensor out = at::empty({M, hidden}, x.options());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint16_t* pq = reinterpret_cast<const uint16_t*>(pp);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < hidden; c += 16) {
      const __mmask16 mk = tail_mask16(hidden - c);
      const uint16_t* row = pq + m * K * hidden + c;
      __m512 acc = maskz_load_bf16_as_f32(mk, row);
      for (int64_t r = 1; r < K; ++r) acc = _mm512_add_ps(acc, maskz_load_bf16_as_f32(mk, row + r * hidden));
      _mm256_mask_storeu_epi16(op + m * hidden + c, mk, (__m256i)_mm512_cvtneps_pbh(acc));
    }
  return out;
}

// The experts of a layer (8 tensors and 10 ints each, expert e the e-th) that ids picks, ascending.
std::vector<Expert> layer_experts(const at::Tensor& ids, at::TensorList tensors, at::IntArrayRef ints) {
  const int64_t E = static_cast<int64_t>(tensors.size()) / 8;
  std::vector<char> picked(E, 0);
  const at::Tensor idc = ids.contiguous();
  const int64_t* idp = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < idc.numel(); ++i) {
    TORCH_CHECK(idp[i] >= 0 && idp[i] < E, "qwenkit decode_layer: expert ", idp[i], " outside 0..", E - 1);
    picked[idp[i]] = 1;
  }
  std::vector<Expert> experts;
  for (int64_t e = 0; e < E; ++e)
    if (picked[e]) experts.push_back(read_expert(e, tensors, 8 * e, ints.data() + 10 * e));
  return experts;
}

// The op: tensors and ints list the experts some row picks, 8 tensors and 11 ints each (its id, then as
// layer_experts reads them).
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, at::TensorList tensors,
                       at::IntArrayRef ints) {
  const int64_t E = static_cast<int64_t>(tensors.size()) / 8;
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == 8 * E && static_cast<int64_t>(ints.size()) == 11 * E,
              "qwenkit moe_experts: expected 8 tensors and 11 ints per expert, got ", tensors.size(), " and ",
              ints.size());
  std::vector<Expert> experts;
  for (int64_t i = 0; i < E; ++i) experts.push_back(read_expert(ints[11 * i], tensors, 8 * i, ints.data() + 11 * i + 1));
  return run_experts(x, ids, weights, experts);
}
