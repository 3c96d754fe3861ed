// The block kernels compiled for avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni (chosen at run time by ops.cpp).
#include <immintrin.h>
#include "kernels.h"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif
#define LLMSH_NS avx512vnni
#define LLMSH_DOT 2
#define LLMSH_BW 1
#include "impl.h"

namespace llmsh_kernels {
static const KernelTable k_avx512vnni = {"avx512vnni", avx512vnni::gemv, avx512vnni::dequant};
const KernelTable* table_avx512vnni() { return &k_avx512vnni; }
}  // namespace llmsh_kernels
#if defined(__clang__)
#pragma clang attribute pop
#endif
