// The block kernels compiled for avx2,fma,f16c (chosen at run time by ops.cpp).
#include <immintrin.h>
#include "kernels.h"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define LLMSH_NS avx2
#define LLMSH_DOT 0
#define LLMSH_BW 0
#include "impl.h"

namespace llmsh_kernels {
static const KernelTable k_avx2 = {"avx2", avx2::gemv, avx2::dequant};
const KernelTable* table_avx2() { return &k_avx2; }
}  // namespace llmsh_kernels
#if defined(__clang__)
#pragma clang attribute pop
#endif
