// torch operators over the block kernels: torch.ops.llmsh_kernels.{mm, dequantize, quantize,
// set_isa}. Activations are quantized here in portable scalar code (the same values on every
// ISA and in the plain-torch reference); the GEMV runs on the ISA chosen at run time, threaded
// with torch's own pool (at::parallel_for).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace llmsh_kernels {
namespace {

const KernelTable* g_table = nullptr;

struct TypeInfo {
  int64_t elems, bytes;
};

TypeInfo type_info(int64_t type) {
  switch (type) {
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
  }
  TORCH_CHECK(false, "llmsh kernels: unsupported ggml type ", type);
}

// 0: none usable, 1: avx2, 2: avx-vnni, 3: avx-512 vnni. want = 0 picks the best supported.
int64_t set_isa(int64_t want) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avxvnni = avx2 && __builtin_cpu_supports("avxvnni");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  const bool ok[4] = {false, avx2, avxvnni, avx512};
  const KernelTable* tables[4] = {nullptr, table_avx2(), table_avxvnni(), table_avx512vnni()};
  int64_t pick = 0;
  if (want > 0 && want < 4) {
    pick = ok[want] ? want : 0;
  } else {
    for (int64_t i = 3; i > 0 && !pick; --i) pick = ok[i] ? i : 0;
  }
  g_table = tables[pick];
  return pick;
}

const KernelTable* table() {
  if (!g_table) set_isa(0);
  TORCH_CHECK(g_table, "llmsh kernels: this CPU lacks AVX2/FMA");
  return g_table;
}

// x (K,) -> q (K,) int8, d (K / block,), s16 (K / 16,): d = max|x| / 127, q = round-half-even(x * 127 / max|x|).
void quantize_row(const float* x, int64_t K, int64_t block, int8_t* q, float* d, int32_t* s16) {
  for (int64_t b = 0; b < K / block; ++b) {
    const float* xb = x + b * block;
    float amax = 0.f;
    for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    d[b] = amax / 127.f;
    for (int64_t i = 0; i < block; ++i) {
      const float r = std::nearbyint(xb[i] * id);
      q[b * block + i] = (int8_t)std::min(127.f, std::max(-127.f, r));
    }
  }
  for (int64_t j = 0; j < K / 16; ++j) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) s += q[16 * j + i];
    s16[j] = s;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x_in, int64_t block) {
  TORCH_CHECK(x_in.dim() == 2 && (block == 32 || block == 256) && x_in.size(1) % block == 0,
              "llmsh kernels: quantize needs x (M, K) with K a multiple of the block (32 or 256)");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({M, K / block}, x.options());
  at::Tensor s = at::empty({M, K / 16}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* dp = d.data_ptr<float>();
  int32_t* sp = s.data_ptr<int32_t>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(xp + m * K, K, block, qp + m * K, dp + m * (K / block), sp + m * (K / 16));
  });
  return {q, d, s};
}

void check_blocks(const at::Tensor& blocks, int64_t type, int64_t N, int64_t K, int64_t& row_bytes) {
  const TypeInfo t = type_info(type);
  TORCH_CHECK(K % t.elems == 0, "llmsh kernels: K=", K, " is not a multiple of the block size ", t.elems);
  row_bytes = K / t.elems * t.bytes;
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.numel() == N * row_bytes,
              "llmsh kernels: blocks must be a contiguous uint8 tensor of ", N * row_bytes, " bytes");
}

// y (M, N) float32 = x (M, K) @ W^T, W (N, K) as GGUF blocks of `type`.
at::Tensor mm(const at::Tensor& x_in, const at::Tensor& blocks, int64_t type, int64_t N, int64_t K) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "llmsh kernels: x must be (M, ", K, ")");
  int64_t rb;
  check_blocks(blocks, type, N, K, rb);
  const KernelTable* tbl = table();
  const int64_t block = type_info(type).elems == 256 ? 256 : 32;
  auto [q, d, s] = quantize(x_in, block);
  const int64_t M = x_in.size(0);
  std::vector<XQ> xs(M);
  for (int64_t m = 0; m < M; ++m)
    xs[m] = {q.data_ptr<int8_t>() + m * K, d.data_ptr<float>() + m * (K / block), s.data_ptr<int32_t>() + m * (K / 16)};
  at::Tensor y = at::empty({M, N}, x_in.options().dtype(at::kFloat));
  const uint8_t* W = blocks.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // Grains of ~64 KiB of weights: small matrices stay on one thread (a fork costs microseconds).
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, rb * M));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    tbl->gemv((int)type, W, rb, n0, n1, xs.data(), M, yp, N, K);
  });
  return y;
}

at::Tensor dequantize(const at::Tensor& blocks, int64_t type, int64_t N, int64_t K) {
  int64_t rb;
  check_blocks(blocks, type, N, K, rb);
  const KernelTable* tbl = table();
  at::Tensor out = at::empty({N, K}, blocks.options().dtype(at::kFloat));
  const uint8_t* W = blocks.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
    tbl->dequant((int)type, W, rb, n0, n1, op + n0 * K, K);
  });
  return out;
}

}  // namespace
}  // namespace llmsh_kernels

TORCH_LIBRARY(llmsh_kernels, m) {
  m.def("mm(Tensor x, Tensor blocks, int ggml_type, int n, int k) -> Tensor");
  m.def("dequantize(Tensor blocks, int ggml_type, int n, int k) -> Tensor");
  m.def("quantize(Tensor x, int block) -> (Tensor, Tensor, Tensor)");
  m.def("set_isa(int want) -> int", &llmsh_kernels::set_isa);
}

TORCH_LIBRARY_IMPL(llmsh_kernels, CPU, m) {
  m.impl("mm", &llmsh_kernels::mm);
  m.impl("dequantize", &llmsh_kernels::dequantize);
  m.impl("quantize", &llmsh_kernels::quantize);
}
