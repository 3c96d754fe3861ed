// Shared declarations of the GGUF block kernels: the quantized activations and the per-ISA
// function table. No torch headers here: the ISA translation units are compiled with their own
// target options and must not instantiate torch's inline code under them.
#pragma once
#include <cstdint>

namespace llmsh_kernels {

// ggml type ids (gguf.GGMLQuantizationType).
enum GgmlType : int {
  Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14,
};

// One activation row quantized to int8 blocks of `block` (32 or 256) elements:
// x[k] ~= d[k / block] * q[k], with d = max|x| / 127 per block, and the sums of q over
// each 16 elements (s16) for the offset and min corrections.
struct XQ {
  const int8_t* q;     // (K,)
  const float* d;      // (K / block,)
  const int32_t* s16;  // (K / 16,)
};

struct KernelTable {
  const char* name;
  // y[m * N + n] = dot(row n of W, activation row m) for n in [n0, n1), m in [0, M).
  void (*gemv)(int type, const uint8_t* W, int64_t row_bytes, int64_t n0, int64_t n1,
               const XQ* xs, int64_t M, float* y, int64_t N, int64_t K);
  // out[(n - n0) * K + k] = the float value of W[n, k] for n in [n0, n1).
  void (*dequant)(int type, const uint8_t* W, int64_t row_bytes, int64_t n0, int64_t n1,
                  float* out, int64_t K);
};

const KernelTable* table_avx2();
const KernelTable* table_avxvnni();
const KernelTable* table_avx512vnni();

}  // namespace llmsh_kernels
