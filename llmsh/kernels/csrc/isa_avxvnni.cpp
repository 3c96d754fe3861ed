// The block kernels compiled for avx2,fma,f16c,avxvnni (chosen at run time by ops.cpp).
#include <immintrin.h>
#include "kernels.h"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avxvnni"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,avxvnni")
#endif
#define LLMSH_NS avxvnni
#define LLMSH_DOT 1
#define LLMSH_BW 0
#include "impl.h"

namespace llmsh_kernels {
static const KernelTable k_avxvnni = {"avxvnni", avxvnni::gemv, avxvnni::dequant};
const KernelTable* table_avxvnni() { return &k_avxvnni; }
}  // namespace llmsh_kernels
#if defined(__clang__)
#pragma clang attribute pop
#endif
