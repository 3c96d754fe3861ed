// The block kernels, included once per ISA by isa_*.cpp after that file's target options.
// Configuration macros: LLMSH_NS (namespace), LLMSH_DOT (0: AVX2 maddubs+madd, 1: AVX-VNNI
// dpbusd, 2: AVX-512 VL VNNI dpbusd), LLMSH_BW (1: AVX-512 BW/VL mask moves).
//
// Arithmetic (llama.cpp's ggml-cpu vec_dot_*_q8_* in its structure): the weights' quants are
// taken as unsigned bytes u, the activations as int8 blocks q with one float scale d per block
// of 32 (Q8_0-like) or 256 (Q8_K-like) and sums over each 16. Integer dot products per block or
// sub-block are exact in int32; offsets (Q4_0's -8, Q5_0's -16, Q6_K's -32) are folded into the
// integer sum with the activation block sums; each block's integer sum is converted to float
// and scaled by d_w * d_x, and min terms (Q4_1/Q5_1's m, Q4_K/Q5_K's dmin * m_j) are added with
// the activation sums as float. Layouts: ggml-common.h (block_q4_0 ... block_q6_K).
#include <cstring>

namespace llmsh_kernels {
namespace LLMSH_NS {

static inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

static inline uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc + the sums over each 4 bytes of u (unsigned) * s (signed), as 8 int32 lanes.
static inline __m256i dot_us(__m256i acc, __m256i u, __m256i s) {
#if LLMSH_DOT == 2
  return _mm256_dpbusd_epi32(acc, u, s);
#elif LLMSH_DOT == 1
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  // maddubs saturates int16 only past |u| * |s| * 2 > 32767: u <= 128, |s| <= 127 never does.
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// u (<= 63) . s with every 16-lane half-group weighted by an int16 scale: madd does the
// weighting for free where maddubs leaves int16 pair sums (the K-quants' sub-block scales).
static inline __m256i dot_scaled(__m256i acc, __m256i u, __m256i s, __m256i sc16) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), sc16));
}

static inline __m256i lane0(int32_t c) { return _mm256_setr_epi32(c, 0, 0, 0, 0, 0, 0, 0); }

static inline __m256i loadx(const int8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

// 16 bytes of packed nibbles -> 32 bytes: low nibbles first, then high nibbles.
static inline __m256i nibbles32(const uint8_t* q) {
  const __m128i t = _mm_loadu_si128((const __m128i*)q);
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

// Bit j of 4 little-endian bytes -> byte j = 0x10 or 0 (the fifth bit of Q5_0/Q5_1 quants).
static inline __m256i fifth_bits(const uint8_t* qh) {
  const uint32_t h = u32(qh);
#if LLMSH_BW
  return _mm256_maskz_mov_epi8((__mmask32)h, _mm256_set1_epi8(0x10));
#else
  const __m256i rep = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)h),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(rep, bit), bit), _mm256_set1_epi8(0x10));
#endif
}

static inline int32_t s32(const XQ& x, int64_t b) { return x.s16[2 * b] + x.s16[2 * b + 1]; }

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K block (12 packed bytes).
static inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Each type: bytes and elements of a block, step(block, x, b, acc, accs) adding block b's dot.
struct TQ4_0 {
  static constexpr int bytes = 18, block = 32;
  static inline void step(const uint8_t* p, const XQ& x, int64_t b, __m256& acc, float&) {
    const __m256i iv = dot_us(lane0(-8 * s32(x, b)), nibbles32(p + 2), loadx(x.q + 32 * b));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iv), _mm256_set1_ps(f16(p) * x.d[b]), acc);
  }
};

struct TQ4_1 {
  static constexpr int bytes = 20, block = 32;
  static inline void step(const uint8_t* p, const XQ& x, int64_t b, __m256& acc, float& accs) {
    const __m256i iv = dot_us(_mm256_setzero_si256(), nibbles32(p + 4), loadx(x.q + 32 * b));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iv), _mm256_set1_ps(f16(p) * x.d[b]), acc);
    accs += f16(p + 2) * (x.d[b] * (float)s32(x, b));
  }
};

struct TQ5_0 {
  static constexpr int bytes = 22, block = 32;
  static inline void step(const uint8_t* p, const XQ& x, int64_t b, __m256& acc, float&) {
    const __m256i u = _mm256_or_si256(nibbles32(p + 6), fifth_bits(p + 2));
    const __m256i iv = dot_us(lane0(-16 * s32(x, b)), u, loadx(x.q + 32 * b));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iv), _mm256_set1_ps(f16(p) * x.d[b]), acc);
  }
};

struct TQ5_1 {
  static constexpr int bytes = 24, block = 32;
  static inline void step(const uint8_t* p, const XQ& x, int64_t b, __m256& acc, float& accs) {
    const __m256i u = _mm256_or_si256(nibbles32(p + 8), fifth_bits(p + 4));
    const __m256i iv = dot_us(_mm256_setzero_si256(), u, loadx(x.q + 32 * b));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iv), _mm256_set1_ps(f16(p) * x.d[b]), acc);
    accs += f16(p + 2) * (x.d[b] * (float)s32(x, b));
  }
};

struct TQ8_0 {
  static constexpr int bytes = 34, block = 32;
  static inline void step(const uint8_t* p, const XQ& x, int64_t b, __m256& acc, float&) {
    // Signed weights: |w| . sign(x, w), llama.cpp's trick for an unsigned-by-signed product.
    const __m256i w = _mm256_loadu_si256((const __m256i*)(p + 2));
    const __m256i iv = dot_us(_mm256_setzero_si256(), _mm256_abs_epi8(w),
                              _mm256_sign_epi8(loadx(x.q + 32 * b), w));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iv), _mm256_set1_ps(f16(p) * x.d[b]), acc);
  }
};

// Q4_K (Five = false) and Q5_K: d, dmin, 12 bytes of 6-bit scales/mins, [qh[32]], qs[128].
template <bool Five>
struct TK45 {
  static constexpr int bytes = Five ? 176 : 144, block = 256;
  static inline void step(const uint8_t* p, const XQ& x, int64_t b, __m256& acc, float& accs) {
    const uint8_t* qs = p + (Five ? 48 : 16);
    const int8_t* xq = x.q + 256 * b;
    const int32_t* s16 = x.s16 + 16 * b;
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    __m256i hb = Five ? _mm256_loadu_si256((const __m256i*)(p + 16)) : _mm256_setzero_si256();
    __m256i iv = _mm256_setzero_si256();
    int32_t msum = 0;
    for (int c = 0; c < 4; ++c) {
      int sc0, m0, sc1, m1;
      scale_min_k4(2 * c, p + 4, sc0, m0);
      scale_min_k4(2 * c + 1, p + 4, sc1, m1);
      const __m256i q = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
      __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
      if (Five) {   // bit 2c of each qh byte is the fifth bit of the low-nibble sub-block, 2c+1 of the high
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hb, one), 4));
        hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), one), 4));
        hb = _mm256_srli_epi16(hb, 2);
      }
      iv = dot_scaled(iv, lo, loadx(xq + 64 * c), _mm256_set1_epi16((short)sc0));
      iv = dot_scaled(iv, hi, loadx(xq + 64 * c + 32), _mm256_set1_epi16((short)sc1));
      msum += m0 * (s16[4 * c] + s16[4 * c + 1]) + m1 * (s16[4 * c + 2] + s16[4 * c + 3]);
    }
    const float dx = x.d[b];
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iv), _mm256_set1_ps(f16(p) * dx), acc);
    accs -= (f16(p + 2) * dx) * (float)msum;
  }
};

struct TQ6_K {
  static constexpr int bytes = 210, block = 256;
  static inline void step(const uint8_t* p, const XQ& x, int64_t b, __m256& acc, float&) {
    const uint8_t* ql = p;
    const uint8_t* qh = p + 128;
    const int8_t* sc = (const int8_t*)(p + 192);
    const int8_t* xq = x.q + 256 * b;
    const int32_t* s16 = x.s16 + 16 * b;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    __m256i iv = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(ql + 64 * h));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(ql + 64 * h + 32));
      const __m256i hv = _mm256_loadu_si256((const __m256i*)(qh + 32 * h));
      __m256i g[4];
      g[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(hv, 4), m2));
      g[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(hv, 2), m2));
      g[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hv, m2));
      g[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                             _mm256_and_si256(_mm256_srli_epi16(hv, 2), m2));
      for (int k = 0; k < 4; ++k) {
        const int j = 8 * h + 2 * k;   // sub-blocks of 16: j for lanes 0-15, j + 1 for 16-31
        const __m256i scv = _mm256_set_m128i(_mm_set1_epi16(sc[j + 1]), _mm_set1_epi16(sc[j]));
        iv = dot_scaled(iv, g[k], loadx(xq + 128 * h + 32 * k), scv);
      }
    }
    int32_t csum = 0;   // the -32 offset of every quant, through the activation sums
    for (int j = 0; j < 16; ++j) csum += sc[j] * s16[j];
    iv = _mm256_add_epi32(iv, lane0(-32 * csum));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iv), _mm256_set1_ps(f16(p + 208) * x.d[b]), acc);
  }
};

template <class T>
static inline float row_dot(const uint8_t* row, const XQ& x, int64_t nb) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  float s0 = 0.f, s1 = 0.f;
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {   // two chains: the float FMA latency, not the loads, would bound it
    T::step(row + b * T::bytes, x, b, a0, s0);
    T::step(row + (b + 1) * T::bytes, x, b + 1, a1, s1);
  }
  if (b < nb) T::step(row + b * T::bytes, x, b, a0, s0);
  return hsum(_mm256_add_ps(a0, a1)) + (s0 + s1);
}

template <class T>
static void gemv_t(const uint8_t* W, int64_t rb, int64_t n0, int64_t n1, const XQ* xs, int64_t M,
                   float* y, int64_t N, int64_t K) {
  const int64_t nb = K / T::block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = W + n * rb;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = row_dot<T>(row, xs[m], nb);
  }
}

static void gemv(int type, const uint8_t* W, int64_t rb, int64_t n0, int64_t n1, const XQ* xs,
                 int64_t M, float* y, int64_t N, int64_t K) {
  switch (type) {
    case Q4_0: return gemv_t<TQ4_0>(W, rb, n0, n1, xs, M, y, N, K);
    case Q4_1: return gemv_t<TQ4_1>(W, rb, n0, n1, xs, M, y, N, K);
    case Q5_0: return gemv_t<TQ5_0>(W, rb, n0, n1, xs, M, y, N, K);
    case Q5_1: return gemv_t<TQ5_1>(W, rb, n0, n1, xs, M, y, N, K);
    case Q8_0: return gemv_t<TQ8_0>(W, rb, n0, n1, xs, M, y, N, K);
    case Q4_K: return gemv_t<TK45<false>>(W, rb, n0, n1, xs, M, y, N, K);
    case Q5_K: return gemv_t<TK45<true>>(W, rb, n0, n1, xs, M, y, N, K);
    case Q6_K: return gemv_t<TQ6_K>(W, rb, n0, n1, xs, M, y, N, K);
  }
}

// Scalar dequantization of one row (prefill's float GEMM path); same values as gguf.quants.
static void dequant_row(int type, const uint8_t* p, float* o, int64_t K) {
  switch (type) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1:
      for (int64_t b = 0; b < K / 32; ++b, o += 32) {
        const bool has_m = type == Q4_1 || type == Q5_1, five = type == Q5_0 || type == Q5_1;
        const float d = f16(p), m = has_m ? f16(p + 2) : 0.f;
        const uint8_t* hp = p + (has_m ? 4 : 2);
        const uint32_t h = five ? u32(hp) : 0;
        const uint8_t* q = hp + (five ? 4 : 0);
        const int off = has_m ? 0 : (five ? 16 : 8);
        for (int j = 0; j < 16; ++j) {
          const int lo = (q[j] & 0xF) | (((h >> j) & 1) << 4), hi = (q[j] >> 4) | (((h >> (j + 16)) & 1) << 4);
          o[j] = d * (float)(lo - off) + m;
          o[j + 16] = d * (float)(hi - off) + m;
        }
        p += type == Q4_0 ? 18 : type == Q4_1 ? 20 : type == Q5_0 ? 22 : 24;
      }
      return;
    case Q8_0:
      for (int64_t b = 0; b < K / 32; ++b, p += 34, o += 32)
        for (int j = 0; j < 32; ++j) o[j] = f16(p) * (float)(int8_t)p[2 + j];
      return;
    case Q4_K: case Q5_K:
      for (int64_t b = 0; b < K / 256; ++b, o += 256) {
        const bool five = type == Q5_K;
        const float d = f16(p), dmin = f16(p + 2);
        const uint8_t* qh = p + 16;
        const uint8_t* qs = p + (five ? 48 : 16);
        for (int c = 0; c < 4; ++c) {
          int sc0, m0, sc1, m1;
          scale_min_k4(2 * c, p + 4, sc0, m0);
          scale_min_k4(2 * c + 1, p + 4, sc1, m1);
          for (int l = 0; l < 32; ++l) {
            const int h0 = five ? ((qh[l] >> (2 * c)) & 1) << 4 : 0;
            const int h1 = five ? ((qh[l] >> (2 * c + 1)) & 1) << 4 : 0;
            o[64 * c + l] = (d * sc0) * (float)((qs[32 * c + l] & 0xF) | h0) - dmin * m0;
            o[64 * c + 32 + l] = (d * sc1) * (float)((qs[32 * c + l] >> 4) | h1) - dmin * m1;
          }
        }
        p += five ? 176 : 144;
      }
      return;
    case Q6_K:
      for (int64_t b = 0; b < K / 256; ++b, p += 210, o += 256) {
        const float d = f16(p + 208);
        const int8_t* sc = (const int8_t*)(p + 192);
        for (int h = 0; h < 2; ++h) {
          const uint8_t* ql = p + 64 * h;
          const uint8_t* qh = p + 128 + 32 * h;
          for (int l = 0; l < 32; ++l) {
            const int is = 8 * h + l / 16;
            const int v[4] = {(ql[l] & 0xF) | ((qh[l] & 3) << 4), (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                              (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4), (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)};
            for (int k = 0; k < 4; ++k) o[128 * h + 32 * k + l] = (d * sc[is + 2 * k]) * (float)(v[k] - 32);
          }
        }
      }
      return;
  }
}

static void dequant(int type, const uint8_t* W, int64_t rb, int64_t n0, int64_t n1, float* out, int64_t K) {
  for (int64_t n = n0; n < n1; ++n) dequant_row(type, W + n * rb, out + (n - n0) * K, K);
}

}  // namespace LLMSH_NS
}  // namespace llmsh_kernels
