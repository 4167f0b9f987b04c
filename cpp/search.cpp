#include "search.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu.hpp"
#include "parallel.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#define RAR_AVX2 __attribute__((target("avx2,fma,f16c")))
#define RAR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define RAR_INLINE inline __attribute__((always_inline))
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace rar {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {
    int e = -1;  // subnormal: normalise the mantissa
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace {

// out[i * NQ + j] = dot(row i, query j) for `count` rows (unscaled for int8).
// Queries are float for f32/f16 rows and int16 (quantised per query) for int8 rows.
using DotsFn = void (*)(const void* rows, std::size_t count, std::size_t dim, const void* const* q, float* out);

// int8 x int16 products are summed exactly in int32 over chunks this long, then in float. The bound is the
// whole chunk's sum, not one lane's: the lanes are added together in int32 before the float conversion, and
// 1024 * 127 * 16383 = 2,130,576,384 < 2^31 (docs/design-notes.md#int8-chunk).
constexpr std::size_t kIntChunk = 1024;
constexpr float kQ16Max = 16383.f;

// ----------------------------------------------------------------------------------------- scalar
const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) t[i] = half_to_float(static_cast<uint16_t>(i));
    return t;
  }();
  return table.data();
}

struct ScalarF32 {
  using T = float;
  static float get(const T* p, std::size_t j, const float*) { return p[j]; }
};
struct ScalarF16 {
  using T = uint16_t;
  static float get(const T* p, std::size_t j, const float* table) { return table[p[j]]; }
};

template <class L, int NQ>
void dots_scalar(const void* rows_v, std::size_t count, std::size_t dim, const void* const* qv, float* out) {
  const float* q[NQ];
  for (int a = 0; a < NQ; ++a) q[a] = static_cast<const float*>(qv[a]);
  const auto* rows = static_cast<const typename L::T*>(rows_v);
  const float* table = std::is_same<typename L::T, uint16_t>::value ? half_table() : nullptr;
  constexpr std::size_t W = 8;  // independent partial sums: lets the compiler vectorise without -ffast-math
  for (std::size_t i = 0; i < count; ++i) {
    const typename L::T* v = rows + i * dim;
    float acc[NQ][W] = {};
    std::size_t j = 0;
    for (; j + W <= dim; j += W)
      for (std::size_t w = 0; w < W; ++w) {
        const float x = L::get(v, j + w, table);
        for (int a = 0; a < NQ; ++a) acc[a][w] += x * q[a][j + w];
      }
    for (; j < dim; ++j) {
      const float x = L::get(v, j, table);
      for (int a = 0; a < NQ; ++a) acc[a][0] += x * q[a][j];
    }
    for (int a = 0; a < NQ; ++a) {
      float s = 0.f;
      for (std::size_t w = 0; w < W; ++w) s += acc[a][w];
      out[i * NQ + a] = s;
    }
  }
}

template <int NQ>
void dots_scalar_i8(const void* rows_v, std::size_t count, std::size_t dim, const void* const* qv, float* out) {
  const auto* rows = static_cast<const int8_t*>(rows_v);
  const int16_t* q[NQ];
  for (int a = 0; a < NQ; ++a) q[a] = static_cast<const int16_t*>(qv[a]);
  for (std::size_t i = 0; i < count; ++i) {
    const int8_t* v = rows + i * dim;
    float tot[NQ] = {};
    for (std::size_t c0 = 0; c0 < dim; c0 += kIntChunk) {
      const std::size_t ce = std::min(dim, c0 + kIntChunk);
      int32_t acc[NQ] = {};
      for (std::size_t j = c0; j < ce; ++j)
        for (int a = 0; a < NQ; ++a) acc[a] += static_cast<int32_t>(v[j]) * q[a][j];
      for (int a = 0; a < NQ; ++a) tot[a] += static_cast<float>(acc[a]);
    }
    for (int a = 0; a < NQ; ++a) out[i * NQ + a] = tot[a];
  }
}

#if defined(__x86_64__)
// ------------------------------------------------------------------------------------------- AVX2
RAR_AVX2 RAR_INLINE float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Avx2F32 {
  using T = float;
  static RAR_AVX2 RAR_INLINE __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static RAR_AVX2 RAR_INLINE float get(const T* p) { return *p; }
};
struct Avx2F16 {
  using T = uint16_t;
  static RAR_AVX2 RAR_INLINE __m256 load8(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static RAR_AVX2 RAR_INLINE float get(const T* p) { return _cvtsh_ss(*p); }
};

template <class L, int NQ>
RAR_AVX2 void dots_avx2(const void* rows_v, std::size_t count, std::size_t dim, const void* const* qv, float* out) {
  const float* q[NQ];
  for (int a = 0; a < NQ; ++a) q[a] = static_cast<const float*>(qv[a]);
  // The same accumulators for every NQ: a query's score does not depend on the batch it came in.
  constexpr int U = 4;
  const auto* rows = static_cast<const typename L::T*>(rows_v);
  for (std::size_t i = 0; i < count; ++i) {
    const typename L::T* v = rows + i * dim;
    __m256 acc[NQ][U];
    for (int a = 0; a < NQ; ++a)
      for (int u = 0; u < U; ++u) acc[a][u] = _mm256_setzero_ps();
    std::size_t j = 0;
    for (; j + 8 * U <= dim; j += 8 * U)
      for (int u = 0; u < U; ++u) {
        const __m256 x = L::load8(v + j + 8 * u);
        for (int a = 0; a < NQ; ++a) acc[a][u] = _mm256_fmadd_ps(x, _mm256_loadu_ps(q[a] + j + 8 * u), acc[a][u]);
      }
    for (; j + 8 <= dim; j += 8) {
      const __m256 x = L::load8(v + j);
      for (int a = 0; a < NQ; ++a) acc[a][0] = _mm256_fmadd_ps(x, _mm256_loadu_ps(q[a] + j), acc[a][0]);
    }
    for (int a = 0; a < NQ; ++a) {
      __m256 s = acc[a][0];
      for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[a][u]);
      float r = hsum256(s);
      for (std::size_t t = j; t < dim; ++t) r += L::get(v + t) * q[a][t];
      out[i * NQ + a] = r;
    }
  }
}

RAR_AVX2 RAR_INLINE int32_t hsum256_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// int8 rows x int16 queries: sign-extend 16 bytes to int16, vpmaddwd, add in int32.
template <int NQ>
RAR_AVX2 void dots_avx2_i8(const void* rows_v, std::size_t count, std::size_t dim, const void* const* qv,
                           float* out) {
  constexpr int U = NQ == 1 ? 2 : 1;
  const auto* rows = static_cast<const int8_t*>(rows_v);
  const int16_t* q[NQ];
  for (int a = 0; a < NQ; ++a) q[a] = static_cast<const int16_t*>(qv[a]);
  for (std::size_t i = 0; i < count; ++i) {
    const int8_t* v = rows + i * dim;
    float tot[NQ] = {};
    for (std::size_t c0 = 0; c0 < dim; c0 += kIntChunk) {
      const std::size_t ce = std::min(dim, c0 + kIntChunk);
      __m256i acc[NQ][U];
      for (int a = 0; a < NQ; ++a)
        for (int u = 0; u < U; ++u) acc[a][u] = _mm256_setzero_si256();
      std::size_t j = c0;
      for (; j + 16 * U <= ce; j += 16 * U)
        for (int u = 0; u < U; ++u) {
          const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + j + 16 * u)));
          for (int a = 0; a < NQ; ++a)
            acc[a][u] = _mm256_add_epi32(
                acc[a][u],
                _mm256_madd_epi16(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[a] + j + 16 * u))));
        }
      for (int a = 0; a < NQ; ++a) {
        __m256i sacc = acc[a][0];
        for (int u = 1; u < U; ++u) sacc = _mm256_add_epi32(sacc, acc[a][u]);
        int32_t r = hsum256_epi32(sacc);
        for (std::size_t t = j; t < ce; ++t) r += static_cast<int32_t>(v[t]) * q[a][t];
        tot[a] += static_cast<float>(r);
      }
    }
    for (int a = 0; a < NQ; ++a) out[i * NQ + a] = tot[a];
  }
}

// ----------------------------------------------------------------------------------------- AVX-512
struct Avx512F32 {
  using T = float;
  static RAR_AVX512 RAR_INLINE __m512 load16(const T* p) { return _mm512_loadu_ps(p); }
  static RAR_AVX512 RAR_INLINE __m512 load16(const T* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};
struct Avx512F16 {
  using T = uint16_t;
  static RAR_AVX512 RAR_INLINE __m512 load16(const T* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static RAR_AVX512 RAR_INLINE __m512 load16(const T* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
};

template <class L, int NQ>
RAR_AVX512 void dots_avx512(const void* rows_v, std::size_t count, std::size_t dim, const void* const* qv,
                            float* out) {
  const float* q[NQ];
  for (int a = 0; a < NQ; ++a) q[a] = static_cast<const float*>(qv[a]);
  constexpr int U = 4;  // as dots_avx2: NQ x 4 accumulators (16 of the 32 zmm registers for NQ = 4)
  const auto* rows = static_cast<const typename L::T*>(rows_v);
  for (std::size_t i = 0; i < count; ++i) {
    const typename L::T* v = rows + i * dim;
    __m512 acc[NQ][U];
    for (int a = 0; a < NQ; ++a)
      for (int u = 0; u < U; ++u) acc[a][u] = _mm512_setzero_ps();
    std::size_t j = 0;
    for (; j + 16 * U <= dim; j += 16 * U)
      for (int u = 0; u < U; ++u) {
        const __m512 x = L::load16(v + j + 16 * u);
        for (int a = 0; a < NQ; ++a)
          acc[a][u] = _mm512_fmadd_ps(x, _mm512_loadu_ps(q[a] + j + 16 * u), acc[a][u]);
      }
    for (; j + 16 <= dim; j += 16) {
      const __m512 x = L::load16(v + j);
      for (int a = 0; a < NQ; ++a) acc[a][0] = _mm512_fmadd_ps(x, _mm512_loadu_ps(q[a] + j), acc[a][0]);
    }
    if (j < dim) {
      const auto m = static_cast<__mmask16>((1u << (dim - j)) - 1u);
      const __m512 x = L::load16(v + j, m);
      for (int a = 0; a < NQ; ++a)
        acc[a][0] = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m, q[a] + j), acc[a][0]);
    }
    for (int a = 0; a < NQ; ++a) {
      __m512 s = acc[a][0];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[a][u]);
      out[i * NQ + a] = _mm512_reduce_add_ps(s);
    }
  }
}

template <int NQ>
RAR_AVX512 void dots_avx512_i8(const void* rows_v, std::size_t count, std::size_t dim, const void* const* qv,
                               float* out) {
  constexpr int U = NQ == 1 ? 2 : 1;
  const auto* rows = static_cast<const int8_t*>(rows_v);
  const int16_t* q[NQ];
  for (int a = 0; a < NQ; ++a) q[a] = static_cast<const int16_t*>(qv[a]);
  for (std::size_t i = 0; i < count; ++i) {
    const int8_t* v = rows + i * dim;
    float tot[NQ] = {};
    for (std::size_t c0 = 0; c0 < dim; c0 += kIntChunk) {
      const std::size_t ce = std::min(dim, c0 + kIntChunk);
      __m512i acc[NQ][U];
      for (int a = 0; a < NQ; ++a)
        for (int u = 0; u < U; ++u) acc[a][u] = _mm512_setzero_si512();
      std::size_t j = c0;
      for (; j + 32 * U <= ce; j += 32 * U)
        for (int u = 0; u < U; ++u) {
          const __m512i x =
              _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j + 32 * u)));
          for (int a = 0; a < NQ; ++a)
            acc[a][u] = _mm512_add_epi32(acc[a][u], _mm512_madd_epi16(x, _mm512_loadu_si512(q[a] + j + 32 * u)));
        }
      for (; j + 32 <= ce; j += 32) {
        const __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j)));
        for (int a = 0; a < NQ; ++a)
          acc[a][0] = _mm512_add_epi32(acc[a][0], _mm512_madd_epi16(x, _mm512_loadu_si512(q[a] + j)));
      }
      if (j < ce) {
        const auto m = static_cast<__mmask32>((1ull << (ce - j)) - 1u);
        const __m512i x = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, v + j));
        for (int a = 0; a < NQ; ++a)
          acc[a][0] = _mm512_add_epi32(acc[a][0], _mm512_madd_epi16(x, _mm512_maskz_loadu_epi16(m, q[a] + j)));
      }
      for (int a = 0; a < NQ; ++a) {
        __m512i sacc = acc[a][0];
        for (int u = 1; u < U; ++u) sacc = _mm512_add_epi32(sacc, acc[a][u]);
        tot[a] += static_cast<float>(_mm512_reduce_add_epi32(sacc));
      }
    }
    for (int a = 0; a < NQ; ++a) out[i * NQ + a] = tot[a];
  }
}
#endif  // __x86_64__

#if defined(__aarch64__)
// ------------------------------------------------------------------------------------------- NEON
struct NeonF32 {
  using T = float;
  static inline void load8(const T* p, float32x4_t* lo, float32x4_t* hi) {
    *lo = vld1q_f32(p);
    *hi = vld1q_f32(p + 4);
  }
  static inline float get(const T* p) { return *p; }
};
struct NeonF16 {
  using T = uint16_t;
  static inline void load8(const T* p, float32x4_t* lo, float32x4_t* hi) {
    const uint16x8_t h = vld1q_u16(p);
    *lo = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h)));
    *hi = vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h)));
  }
  static inline float get(const T* p) { return half_to_float(*p); }
};

template <class L, int NQ>
void dots_neon(const void* rows_v, std::size_t count, std::size_t dim, const void* const* qv, float* out) {
  const float* q[NQ];
  for (int a = 0; a < NQ; ++a) q[a] = static_cast<const float*>(qv[a]);
  const auto* rows = static_cast<const typename L::T*>(rows_v);
  for (std::size_t i = 0; i < count; ++i) {
    const typename L::T* v = rows + i * dim;
    float32x4_t acc[NQ][2];
    for (int a = 0; a < NQ; ++a) acc[a][0] = acc[a][1] = vdupq_n_f32(0.f);
    std::size_t j = 0;
    for (; j + 8 <= dim; j += 8) {
      float32x4_t lo, hi;
      L::load8(v + j, &lo, &hi);
      for (int a = 0; a < NQ; ++a) {
        acc[a][0] = vfmaq_f32(acc[a][0], lo, vld1q_f32(q[a] + j));
        acc[a][1] = vfmaq_f32(acc[a][1], hi, vld1q_f32(q[a] + j + 4));
      }
    }
    for (int a = 0; a < NQ; ++a) {
      float r = vaddvq_f32(vaddq_f32(acc[a][0], acc[a][1]));
      for (std::size_t t = j; t < dim; ++t) r += L::get(v + t) * q[a][t];
      out[i * NQ + a] = r;
    }
  }
}

template <int NQ>
void dots_neon_i8(const void* rows_v, std::size_t count, std::size_t dim, const void* const* qv, float* out) {
  const auto* rows = static_cast<const int8_t*>(rows_v);
  const int16_t* q[NQ];
  for (int a = 0; a < NQ; ++a) q[a] = static_cast<const int16_t*>(qv[a]);
  for (std::size_t i = 0; i < count; ++i) {
    const int8_t* v = rows + i * dim;
    float tot[NQ] = {};
    for (std::size_t c0 = 0; c0 < dim; c0 += kIntChunk) {
      const std::size_t ce = std::min(dim, c0 + kIntChunk);
      int32x4_t acc[NQ];
      for (int a = 0; a < NQ; ++a) acc[a] = vdupq_n_s32(0);
      std::size_t j = c0;
      for (; j + 8 <= ce; j += 8) {
        const int16x8_t x = vmovl_s8(vld1_s8(v + j));
        for (int a = 0; a < NQ; ++a) {
          const int16x8_t y = vld1q_s16(q[a] + j);
          acc[a] = vmlal_s16(acc[a], vget_low_s16(x), vget_low_s16(y));
          acc[a] = vmlal_s16(acc[a], vget_high_s16(x), vget_high_s16(y));
        }
      }
      for (int a = 0; a < NQ; ++a) {
        int32_t r = vaddvq_s32(acc[a]);
        for (std::size_t t = j; t < ce; ++t) r += static_cast<int32_t>(v[t]) * q[a][t];
        tot[a] += static_cast<float>(r);
      }
    }
    for (int a = 0; a < NQ; ++a) out[i * NQ + a] = tot[a];
  }
}

// int8 rows x int16 queries with the Armv8.2 dot-product instruction (`sdot`: four int8 products summed into
// each int32 lane). Each query value is split as q = 256 * hi + lo with hi = (q + 128) >> 8 in [-64, 64] and
// lo in [-128, 127] (|q| <= kQ16Max = 16383), both int8, so row . q = 256 * (row . hi) + (row . lo): the same
// integer per chunk as dots_neon_i8 (|256 * row . hi| <= 256 * 1024 * 127 * 64 < 2^31), hence the same
// float scores bit for bit, from 2 instructions per 16 values instead of 3 per 8.
#if defined(__clang__)
#define RAR_TARGET_DOTPROD __attribute__((target("dotprod")))
#else
#define RAR_TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))  // what arm_neon.h asks of vdotq_s32
#endif

template <int NQ>
RAR_TARGET_DOTPROD void dots_neon_dot_i8(const void* rows_v, std::size_t count, std::size_t dim,
                                         const void* const* qv, float* out) {
  const auto* rows = static_cast<const int8_t*>(rows_v);
  const int16_t* q[NQ];
  for (int a = 0; a < NQ; ++a) q[a] = static_cast<const int16_t*>(qv[a]);
  // The split queries, made once per call (a call scores kBlock rows: the split costs < 1 % of it).
  thread_local std::vector<int8_t> split;
  split.resize(static_cast<std::size_t>(NQ) * 2 * dim);
  const int8_t* hi[NQ];
  const int8_t* lo[NQ];
  for (int a = 0; a < NQ; ++a) {
    int8_t* h = split.data() + static_cast<std::size_t>(2 * a) * dim;
    int8_t* l = h + dim;
    for (std::size_t j = 0; j < dim; ++j) {
      const int v = q[a][j];
      const int hv = (v + 128) >> 8;  // arithmetic shift: floor((v + 128) / 256)
      h[j] = static_cast<int8_t>(hv);
      l[j] = static_cast<int8_t>(v - 256 * hv);
    }
    hi[a] = h;
    lo[a] = l;
  }
  for (std::size_t i = 0; i < count; ++i) {
    const int8_t* v = rows + i * dim;
    float tot[NQ] = {};
    for (std::size_t c0 = 0; c0 < dim; c0 += kIntChunk) {
      const std::size_t ce = std::min(dim, c0 + kIntChunk);
      int32x4_t ah[NQ], al[NQ];
      for (int a = 0; a < NQ; ++a) ah[a] = al[a] = vdupq_n_s32(0);
      std::size_t j = c0;
      for (; j + 16 <= ce; j += 16) {
        const int8x16_t x = vld1q_s8(v + j);
        for (int a = 0; a < NQ; ++a) {
          ah[a] = vdotq_s32(ah[a], x, vld1q_s8(hi[a] + j));
          al[a] = vdotq_s32(al[a], x, vld1q_s8(lo[a] + j));
        }
      }
      for (int a = 0; a < NQ; ++a) {
        int32_t r = 256 * vaddvq_s32(ah[a]) + vaddvq_s32(al[a]);
        for (std::size_t t = j; t < ce; ++t) r += static_cast<int32_t>(v[t]) * q[a][t];
        tot[a] += static_cast<float>(r);
      }
    }
    for (int a = 0; a < NQ; ++a) out[i * NQ + a] = tot[a];
  }
}
#endif  // __aarch64__

// Kernel table: [storage][0: one query, 1: `group` queries at a time].
struct Kernels {
  DotsFn fn[3][2];
  int group;
};

#define RAR_KERNELS(F32, F16, I8, G) \
  Kernels { {{&F32<1>, &F32<G>}, {&F16<1>, &F16<G>}, {&I8<1>, &I8<G>}}, G }

template <int NQ> void scalar_f32(const void* r, std::size_t c, std::size_t d, const void* const* q, float* o) { dots_scalar<ScalarF32, NQ>(r, c, d, q, o); }
template <int NQ> void scalar_f16(const void* r, std::size_t c, std::size_t d, const void* const* q, float* o) { dots_scalar<ScalarF16, NQ>(r, c, d, q, o); }
#if defined(__x86_64__)
template <int NQ> void avx2_f32(const void* r, std::size_t c, std::size_t d, const void* const* q, float* o) { dots_avx2<Avx2F32, NQ>(r, c, d, q, o); }
template <int NQ> void avx2_f16(const void* r, std::size_t c, std::size_t d, const void* const* q, float* o) { dots_avx2<Avx2F16, NQ>(r, c, d, q, o); }
template <int NQ> void avx512_f32(const void* r, std::size_t c, std::size_t d, const void* const* q, float* o) { dots_avx512<Avx512F32, NQ>(r, c, d, q, o); }
template <int NQ> void avx512_f16(const void* r, std::size_t c, std::size_t d, const void* const* q, float* o) { dots_avx512<Avx512F16, NQ>(r, c, d, q, o); }
#endif
#if defined(__aarch64__)
template <int NQ> void neon_f32(const void* r, std::size_t c, std::size_t d, const void* const* q, float* o) { dots_neon<NeonF32, NQ>(r, c, d, q, o); }
template <int NQ> void neon_f16(const void* r, std::size_t c, std::size_t d, const void* const* q, float* o) { dots_neon<NeonF16, NQ>(r, c, d, q, o); }
#endif

const Kernels& kernels_for(Simd s) {
  static const Kernels scalar = RAR_KERNELS(scalar_f32, scalar_f16, dots_scalar_i8, 4);
#if defined(__x86_64__)
  static const Kernels avx2 = RAR_KERNELS(avx2_f32, avx2_f16, dots_avx2_i8, 2);  // 2 x 4 of the 16 ymm registers
  static const Kernels avx512 = RAR_KERNELS(avx512_f32, avx512_f16, dots_avx512_i8, 4);
  if (s == Simd::avx512) return avx512;
  if (s == Simd::avx2) return avx2;
#elif defined(__aarch64__)
  static const Kernels neon = RAR_KERNELS(neon_f32, neon_f16, dots_neon_i8, 4);
  static const Kernels neon_dot = RAR_KERNELS(neon_f32, neon_f16, dots_neon_dot_i8, 4);
  if (s == Simd::neon_dot) return neon_dot;
  if (s == Simd::neon) return neon;
#endif
  (void)s;
  return scalar;
}

std::size_t element_size(Storage s) {
  switch (s) {
    case Storage::f32: return 4;
    case Storage::f16: return 2;
    case Storage::i8: return 1;
  }
  return 4;
}

constexpr std::size_t kBlock = 256;  // rows scored per kernel call before their scores are folded in

// One query as the kernels read it.
struct Query {
  const float* f = nullptr;   // float32 values
  std::vector<int16_t> q16;   // int8 storage: round(f / qscale)
  float qscale = 1.f;         // int8 storage: max|f| / kQ16Max
  float l1 = 0.f;             // sum |f|
  const void* kernel_arg() const { return q16.empty() ? static_cast<const void*>(f) : q16.data(); }
};

void prepare_query(const float* f, std::size_t dim, bool quantize, Query* q) {
  q->f = f;
  float peak = 0.f;
  double l1 = 0.0;  // a finite query's L1 norm can pass FLT_MAX: summed in double, stored as inf then
  bool finite = true;
  for (std::size_t j = 0; j < dim; ++j) {
    const float a = std::fabs(f[j]);
    finite = finite && a <= std::numeric_limits<float>::max();  // false for NaN and inf
    peak = a > peak ? a : peak;
    l1 += a;
  }
  q->l1 = static_cast<float>(l1);  // inf when huge: the rerank bound then rescores every row (exact)
  q->q16.clear();
  q->qscale = 1.f;
  if (!quantize) return;
  if (!finite) {  // NaN / inf in the query: every score NaN, like the float storages
    q->qscale = std::numeric_limits<float>::quiet_NaN();
    q->q16.assign(dim, 0);
    return;
  }
  q->qscale = peak > 0.f ? peak / kQ16Max : 1.f;
  q->q16.resize(dim);
  const float inv = 1.f / q->qscale;
  for (std::size_t j = 0; j < dim; ++j) {
    const float x = std::nearbyint(f[j] * inv);
    q->q16[j] = static_cast<int16_t>(std::isfinite(x) ? std::min(std::max(x, -kQ16Max), kQ16Max) : 0.f);
  }
}

// Folds rows [b, e) into best[a][class] for queries qs[0..nq); when row_scores is given, also stores every
// row's score there (row_scores[a][i]). Returns the largest int8 row scale seen (0 for other storages).
// Row blocks are the outer loop: a block (kBlock rows, <= 512 KiB of float32 at d = 512) is read from memory
// once and then served from cache to every query group, so a batch costs one pass over the memory, not one
// per group (docs/design-notes.md#batch-scan). Each (row, query) score is the same kernel call's either way.
float scan_rows(const Kernels& ks, const VectorView& v, const int32_t* labels, std::size_t b, std::size_t e,
                const Query* const* qs, std::size_t nq, float* const* best, float* const* row_scores) {
  const std::size_t es = element_size(v.storage);
  const auto* base = static_cast<const unsigned char*>(v.data);
  const int si = static_cast<int>(v.storage);
  float buf[kBlock * 4];
  float max_scale = 0.f;
  for (std::size_t i0 = b; i0 < e; i0 += kBlock) {
    const std::size_t cnt = std::min(kBlock, e - i0);
    if (v.scales)
      for (std::size_t i = 0; i < cnt; ++i) max_scale = v.scales[i0 + i] > max_scale ? v.scales[i0 + i] : max_scale;
    std::size_t a0 = 0;
    while (a0 < nq) {
      const std::size_t kg = static_cast<std::size_t>(ks.group);
      const std::size_t group = nq - a0 >= kg ? kg : 1;
      const DotsFn fn = ks.fn[si][group == kg ? 1 : 0];
      const void* qa[4];
      float mul[4];
      for (std::size_t a = 0; a < group; ++a) {
        qa[a] = qs[a0 + a]->kernel_arg();
        mul[a] = qs[a0 + a]->qscale;
      }
      fn(base + i0 * v.dim * es, cnt, v.dim, qa, buf);
      for (std::size_t i = 0; i < cnt; ++i) {
        const std::size_t l = static_cast<std::size_t>(labels[i0 + i]);
        const float sc = v.scales ? v.scales[i0 + i] : 1.f;
        for (std::size_t a = 0; a < group; ++a) {
          const float s = buf[i * group + a] * (sc * mul[a]);
          if (row_scores) row_scores[a0 + a][i0 + i] = s;
          float& slot = best[a0 + a][l];
          if (s > slot) slot = s;
        }
      }
      a0 += group;
    }
  }
  return max_scale;
}

void select_topk(const float* best, int32_t n_classes, int k, std::vector<int32_t>& order, int32_t* oc,
                 float* os) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  order.clear();
  for (int32_t c = 0; c < n_classes; ++c)
    if (best[c] > neg_inf) order.push_back(c);
  const std::size_t kk = std::min(static_cast<std::size_t>(k), order.size());
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(kk), order.end(),
                    [&](int32_t a, int32_t b) { return best[a] > best[b] || (best[a] == best[b] && a < b); });
  for (std::size_t j = 0; j < static_cast<std::size_t>(k); ++j) {
    oc[j] = j < kk ? order[j] : -1;
    os[j] = j < kk ? best[order[j]] : neg_inf;
  }
}

// Rescoring of int8 results in float32. With v = scale * q8 + r (|r| <= scale / 2) and the query
// f = qscale * q16 + t (|t| <= qscale / 2), |exact - approx| <= scale * (l1(f) / 2 + qscale / 2 * 127 * d)
// =: scale * u. If tau is the k-th best approximate class score, the exact k-th class score is at least
// tau - max_scale * u, so only rows with approx + scale * u >= tau - max_scale * u can reach the exact top
// k (or be the maximum of a class that does). Those rows are scored again in float32 and the top k taken
// from the exact maxima: the result is the float32 search's.
void rerank_query(const Kernels& ks, const VectorView& v, const int32_t* labels, int32_t n_classes, int k,
                  const Query& q, const float* approx_best, const float* row_scores, float max_scale,
                  std::vector<float>& exact, std::vector<int32_t>& order, int32_t* oc, float* os) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const std::size_t nc = static_cast<std::size_t>(n_classes);
  // tau: the k-th largest present approximate class score (-inf when fewer than k classes are present).
  order.clear();
  for (std::size_t c = 0; c < nc; ++c)
    if (approx_best[c] > neg_inf) order.push_back(static_cast<int32_t>(c));
  float tau = neg_inf;
  if (order.size() >= static_cast<std::size_t>(k)) {
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(),
                     [&](int32_t a, int32_t b) { return approx_best[a] > approx_best[b]; });
    tau = approx_best[order[static_cast<std::size_t>(k - 1)]];
  }
  // The last term bounds float rounding in both sums: d * 2^-23 * sum|f_j v_j| with |v_j| <= 128 * scale.
  const double d = static_cast<double>(v.dim);
  const double u = 0.5 * q.l1 + 0.5 * q.qscale * 127.0 * d + d * std::ldexp(1.0, -23) * 128.0 * q.l1 + 1e-7;
  float threshold = static_cast<float>(static_cast<double>(tau) - max_scale * u);
  exact.assign(nc, neg_inf);
  const DotsFn dot = ks.fn[static_cast<int>(Storage::f32)][0];
  const void* qa[1] = {q.f};
  // A second lower bound on the exact k-th class score, usually much higher (it has no max_scale * u in it):
  // the float32 scores of the best int8 row of each of the 2k best approximate classes. They are k or more
  // distinct classes' real scores, so k classes reach their k-th largest (docs/design-notes.md#rerank-seeds).
  if (order.size() >= static_cast<std::size_t>(k) && threshold == threshold) {
    const std::size_t seeds = std::min(order.size(), 2 * static_cast<std::size_t>(k));
    std::nth_element(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(seeds - 1), order.end(),
                     [&](int32_t a, int32_t b) { return approx_best[a] > approx_best[b]; });
    const float cutoff = approx_best[order[seeds - 1]];  // the 2k-th best approximate class score
    // One pass, stopping once it has them: the first row of each class whose score is both at least the cutoff
    // and its class's maximum. Every class above the cutoff has such a row, so `seeds` distinct classes exist.
    std::vector<int32_t> seed_class;
    std::vector<float> seed_score;
    seed_class.reserve(seeds);
    seed_score.reserve(seeds);
    for (std::size_t i = 0; i < v.n && seed_score.size() < seeds; ++i) {
      const float s = row_scores[i];
      if (!(s >= cutoff)) continue;
      const int32_t c = labels[i];
      if (s != approx_best[c] || std::find(seed_class.begin(), seed_class.end(), c) != seed_class.end()) continue;
      float e;
      dot(v.rerank + i * v.dim, 1, v.dim, qa, &e);
      seed_class.push_back(c);
      seed_score.push_back(e);
    }
    if (seed_score.size() >= static_cast<std::size_t>(k)) {
      std::nth_element(seed_score.begin(), seed_score.begin() + (k - 1), seed_score.end(), std::greater<float>());
      const float seeded = seed_score[static_cast<std::size_t>(k - 1)];
      // finite only: rows holding inf or NaN (never in a memory) have no valid int8 bound to prune them with
      if (std::isfinite(seeded) && seeded > threshold) threshold = seeded;
    }
  }
  for (std::size_t i = 0; i < v.n; ++i) {
    const float s = row_scores[i];
    if (!(s + static_cast<float>(v.scales[i] * u) >= threshold)) continue;
    float e;
    dot(v.rerank + i * v.dim, 1, v.dim, qa, &e);
    float& slot = exact[static_cast<std::size_t>(labels[i])];
    if (e > slot) slot = e;
  }
  select_topk(exact.data(), n_classes, k, order, oc, os);
}

}  // namespace

void topk_classes(const VectorView& v, const int32_t* labels, int32_t n_classes, const float* queries,
                  std::size_t n_queries, int k, int threads, int32_t* out_classes, float* out_scores) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const Kernels& ks = kernels_for(selected_simd());
  const std::size_t nc = static_cast<std::size_t>(std::max<int32_t>(n_classes, 0));
  const std::size_t kk = static_cast<std::size_t>(k);
  if (n_queries == 0) return;
  threads = std::max(1, threads);
  const bool quantize = v.storage == Storage::i8;
  const bool rerank = quantize && v.rerank != nullptr;

  if (n_queries >= static_cast<std::size_t>(threads) || v.n == 0) {
    // Batches: each worker owns whole queries and scans the memory once per up to kQueryBlock of them
    // (fewer when the per-row int8 scores of the rescoring pass would pass kRowScoreBudget floats).
    constexpr std::size_t kQueryBlock = 32;
    constexpr std::size_t kRowScoreBudget = std::size_t{1} << 23;  // 32 MiB of row scores per worker
    const std::size_t qblock =
        rerank ? std::max<std::size_t>(1, std::min(kQueryBlock, kRowScoreBudget / std::max<std::size_t>(v.n, 1)))
               : kQueryBlock;
    parallel_chunks(n_queries, threads, [&](int, std::size_t qb, std::size_t qe) {
      const std::size_t qmax = std::min(qblock, qe - qb);
      std::vector<float> best(qmax * nc), exact;
      // Per-row int8 scores for the rescoring pass: written before read, so not zero-filled.
      std::unique_ptr<float[]> rows(rerank ? new float[qmax * v.n] : nullptr);
      std::vector<int32_t> order;
      order.reserve(nc);
      std::vector<Query> qbuf(qmax);
      std::vector<const Query*> qs(qmax);
      std::vector<float*> bs(qmax), rs(qmax);
      for (std::size_t a0 = qb; a0 < qe; a0 += qmax) {
        const std::size_t g = std::min(qmax, qe - a0);
        for (std::size_t a = 0; a < g; ++a) {
          prepare_query(queries + (a0 + a) * v.dim, v.dim, quantize, &qbuf[a]);
          qs[a] = &qbuf[a];
          bs[a] = best.data() + a * nc;
          rs[a] = rerank ? rows.get() + a * v.n : nullptr;
        }
        std::fill(best.begin(), best.end(), neg_inf);
        const float max_scale = scan_rows(ks, v, labels, 0, v.n, qs.data(), g, bs.data(), rerank ? rs.data() : nullptr);
        for (std::size_t a = 0; a < g; ++a) {
          int32_t* oc = out_classes + (a0 + a) * kk;
          float* os = out_scores + (a0 + a) * kk;
          if (rerank)
            rerank_query(ks, v, labels, n_classes, k, qbuf[a], bs[a], rs[a], max_scale, exact, order, oc, os);
          else
            select_topk(bs[a], n_classes, k, order, oc, os);
        }
      }
    });
    return;
  }

  // Few queries, several threads: split the rows, then merge the per-worker class maxima.
  const int workers = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(threads), v.n));
  std::vector<float> best(static_cast<std::size_t>(workers) * n_queries * nc, neg_inf);
  std::unique_ptr<float[]> rows(rerank ? new float[n_queries * v.n] : nullptr);
  std::vector<float> worker_max_scale(static_cast<std::size_t>(workers), 0.f);
  std::vector<Query> qbuf(n_queries);
  std::vector<const Query*> qs(n_queries);
  std::vector<float*> rs(n_queries, nullptr);
  for (std::size_t a = 0; a < n_queries; ++a) {
    prepare_query(queries + a * v.dim, v.dim, quantize, &qbuf[a]);
    qs[a] = &qbuf[a];
    if (rerank) rs[a] = rows.get() + a * v.n;
  }
  parallel_chunks(v.n, workers, [&](int w, std::size_t b, std::size_t e) {
    std::vector<float*> bs(n_queries);
    for (std::size_t a = 0; a < n_queries; ++a)
      bs[a] = best.data() + (static_cast<std::size_t>(w) * n_queries + a) * nc;
    worker_max_scale[static_cast<std::size_t>(w)] =
        scan_rows(ks, v, labels, b, e, qs.data(), n_queries, bs.data(), rerank ? rs.data() : nullptr);
  });
  const float max_scale = *std::max_element(worker_max_scale.begin(), worker_max_scale.end());
  std::vector<int32_t> order;
  order.reserve(nc);
  std::vector<float> exact;
  for (std::size_t a = 0; a < n_queries; ++a) {
    float* merged = best.data() + a * nc;  // worker 0's slot
    for (int w = 1; w < workers; ++w) {
      const float* other = best.data() + (static_cast<std::size_t>(w) * n_queries + a) * nc;
      for (std::size_t c = 0; c < nc; ++c)
        if (other[c] > merged[c]) merged[c] = other[c];
    }
    if (rerank)
      rerank_query(ks, v, labels, n_classes, k, qbuf[a], merged, rs[a], max_scale, exact, order,
                   out_classes + a * kk, out_scores + a * kk);
    else
      select_topk(merged, n_classes, k, order, out_classes + a * kk, out_scores + a * kk);
  }
}

namespace {

// Sum over a row's 32-dimension blocks of code (c + 8) x int16 query, exact: per block at most
// 32 * 15 * 16383 < 2^24, summed in int64 per row (int32 lanes hold at most 32 blocks: < 2^29 each).
// Rows are scored a block at a time (one indirect call per kBlock rows): out[i] = the sum for row i.
using Dot4Fn = void (*)(const uint8_t* rows, std::size_t count, const int16_t* q, std::size_t blocks, int64_t* out);

inline int64_t dot4_scalar(const uint8_t* row, const int16_t* q, std::size_t blocks) {
  int64_t total = 0;
  for (std::size_t b = 0; b < blocks; ++b) {
    int32_t acc = 0;
    const uint8_t* p = row + b * 16;
    const int16_t* y = q + b * 32;
    for (int j = 0; j < 16; ++j) acc += static_cast<int32_t>(p[j] & 15) * y[j] + static_cast<int32_t>(p[j] >> 4) * y[j + 16];
    total += acc;
  }
  return total;
}

void dot4_rows_scalar(const uint8_t* rows, std::size_t count, const int16_t* q, std::size_t blocks, int64_t* out) {
  for (std::size_t i = 0; i < count; ++i) out[i] = dot4_scalar(rows + i * blocks * 16, q, blocks);
}

#if defined(__x86_64__)
RAR_AVX2 RAR_INLINE int64_t dot4_avx2(const uint8_t* row, const int16_t* q, std::size_t blocks) {
  const __m256i low = _mm256_set1_epi16(15);
  int64_t total = 0;
  std::size_t b = 0;
  while (b < blocks) {
    const std::size_t end = std::min(blocks, b + 32);  // int32 lanes: at most 32 blocks before the int64 sum
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    for (; b < end; ++b) {
      const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16)));
      const __m256i lo = _mm256_and_si256(x, low);
      const __m256i hi = _mm256_srli_epi16(x, 4);
      acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * 32))));
      acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * 32 + 16))));
    }
    total += hsum256_epi32(_mm256_add_epi32(acc0, acc1));
  }
  return total;
}

// Two blocks per step: their 32 bytes widen to 32 int16 whose low nibbles are dimensions 0-15 of both
// blocks and whose high nibbles are 16-31 of both. The query comes permuted to match (permute_query4):
// per pair of blocks [lo of the 1st, lo of the 2nd, hi of the 1st, hi of the 2nd]; an odd last block keeps
// its natural order.
RAR_AVX2 void dot4_rows_avx2(const uint8_t* rows, std::size_t count, const int16_t* q, std::size_t blocks,
                             int64_t* out) {
  for (std::size_t i = 0; i < count; ++i) out[i] = dot4_avx2(rows + i * blocks * 16, q, blocks);
}

RAR_AVX512 RAR_INLINE int64_t dot4_avx512(const uint8_t* row, const int16_t* q, std::size_t blocks) {
  const __m512i low = _mm512_set1_epi16(15);
  int64_t total = 0;
  const std::size_t pairs = blocks / 2;
  std::size_t p = 0;
  while (p < pairs) {
    const std::size_t end = std::min(pairs, p + 16);  // int32 lanes: at most 16 pairs before the int64 sum
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    for (; p < end; ++p) {
      const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p * 32)));
      acc0 = _mm512_add_epi32(acc0, _mm512_madd_epi16(_mm512_and_si512(x, low), _mm512_loadu_si512(q + p * 64)));
      acc1 = _mm512_add_epi32(acc1, _mm512_madd_epi16(_mm512_srli_epi16(x, 4), _mm512_loadu_si512(q + p * 64 + 32)));
    }
    total += _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1));
  }
  if (blocks % 2) total += dot4_avx2(row + pairs * 32, q + pairs * 64, 1);
  return total;
}

RAR_AVX512 void dot4_rows_avx512(const uint8_t* rows, std::size_t count, const int16_t* q, std::size_t blocks,
                                 int64_t* out) {
  for (std::size_t i = 0; i < count; ++i) out[i] = dot4_avx512(rows + i * blocks * 16, q, blocks);
}
#endif

struct Dot4 {
  Dot4Fn fn;
  bool paired;  // the query in the pairwise order of dot4_avx512
};

Dot4 dot4_for(Simd s) {
#if defined(__x86_64__)
  if (s == Simd::avx512) return {&dot4_rows_avx512, true};
  if (s == Simd::avx2) return {&dot4_rows_avx2, false};
#endif
  (void)s;
  return {&dot4_rows_scalar, false};
}

// q (blocks * 32, natural order) into out in the pairwise order dot4_avx512 reads.
void permute_query4(const int16_t* q, std::size_t blocks, int16_t* out) {
  const std::size_t pairs = blocks / 2;
  for (std::size_t p = 0; p < pairs; ++p) {
    const int16_t* a = q + p * 64;
    int16_t* o = out + p * 64;
    std::copy(a, a + 16, o);            // 1st block, dimensions 0-15
    std::copy(a + 32, a + 48, o + 16);  // 2nd block, 0-15
    std::copy(a + 16, a + 32, o + 32);  // 1st block, 16-31
    std::copy(a + 48, a + 64, o + 48);  // 2nd block, 16-31
  }
  if (blocks % 2) std::copy(q + pairs * 64, q + pairs * 64 + 32, out + pairs * 64);
}

}  // namespace

void topk_classes_int4(const Int4View& v, const int32_t* labels, int32_t n_classes, const float* queries,
                       std::size_t n_queries, int k, float margin_sigmas, int threads, int32_t* out_classes,
                       float* out_scores) {
  if (n_queries == 0) return;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const std::size_t nc = static_cast<std::size_t>(std::max<int32_t>(n_classes, 0));
  const std::size_t kk = static_cast<std::size_t>(k);
  const std::size_t blocks = (v.dim + 31) / 32;
  const Dot4 dot4 = dot4_for(selected_simd());
  const DotsFn dot32 = kernels_for(selected_simd()).fn[static_cast<int>(Storage::f32)][0];
  const double sigma_unit = static_cast<double>(margin_sigmas) / std::sqrt(static_cast<double>(std::max<std::size_t>(v.dim, 1)));
  parallel_chunks(n_queries, std::max(1, threads), [&](int, std::size_t qb, std::size_t qe) {
    std::vector<float> best(nc), exact, approx(v.n), margin(v.n);
    std::vector<std::size_t> best_row(nc);
    std::vector<int16_t> qpad(blocks * 32), qperm(dot4.paired ? blocks * 32 : 0);
    std::vector<int32_t> order;
    order.reserve(nc);
    Query q;
    for (std::size_t a = qb; a < qe; ++a) {
      const float* f = queries + a * v.dim;
      prepare_query(f, v.dim, true, &q);
      std::fill(qpad.begin(), qpad.end(), int16_t{0});
      std::copy(q.q16.begin(), q.q16.end(), qpad.begin());
      int64_t qsum = 0;
      double l2 = 0.0;
      for (std::size_t j = 0; j < v.dim; ++j) {
        qsum += qpad[j];
        l2 += static_cast<double>(f[j]) * f[j];
      }
      // Query rounding: |t| <= qscale / 2 per dimension and |c| <= 8, so |scale * t.c| <= scale * qscale * 4 * dim;
      // float rounding of the products and sums: far below both terms, covered by 1e-6.
      const double q_round = static_cast<double>(q.qscale) * 4.0 * static_cast<double>(v.dim);
      const double sig = sigma_unit * std::sqrt(l2);
      if (dot4.paired) permute_query4(qpad.data(), blocks, qperm.data());
      const int16_t* qk = dot4.paired ? qperm.data() : qpad.data();
      std::fill(best.begin(), best.end(), neg_inf);
      const float sig_f = static_cast<float>(sig), round_f = static_cast<float>(q_round);
      int64_t dots[kBlock];
      for (std::size_t i0 = 0; i0 < v.n; i0 += kBlock) {
        const std::size_t cnt = std::min(kBlock, v.n - i0);
        dot4.fn(v.codes + i0 * blocks * 16, cnt, qk, blocks, dots);
        for (std::size_t t = 0; t < cnt; ++t) {
          const std::size_t i = i0 + t;
          // float products: their relative rounding (~1e-7) is far inside the margin's 1e-6 slack for unit rows
          approx[i] = static_cast<float>(dots[t] - 8 * qsum) * (v.scales[i] * q.qscale);
          margin[i] = sig_f * v.resid[i] + v.scales[i] * round_f + 1e-6f;
        }
        for (std::size_t i = i0; i < i0 + cnt; ++i) {
          const auto l = static_cast<std::size_t>(labels[i]);
          if (approx[i] > best[l]) {
            best[l] = approx[i];
            best_row[l] = i;
          }
        }
      }
      // threshold: the k-th largest float32 score of the best 4-bit rows of the 2k best 4-bit classes, a
      // score k distinct classes reach, so no lower than the exact k-th class score (-inf when fewer than
      // k classes are present).
      order.clear();
      for (std::size_t c = 0; c < nc; ++c)
        if (best[c] > neg_inf) order.push_back(static_cast<int32_t>(c));
      exact.assign(nc, neg_inf);
      const void* qa[1] = {f};
      float threshold = neg_inf;
      if (order.size() >= kk) {
        const std::size_t seeds = std::min(order.size(), 2 * kk);
        std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(seeds), order.end(),
                          [&](int32_t x, int32_t y) { return best[x] > best[y]; });
        std::vector<float> seed_scores(seeds);
        for (std::size_t j = 0; j < seeds; ++j) {
          const std::size_t c = static_cast<std::size_t>(order[j]);
          dot32(v.rerank + best_row[c] * v.dim, 1, v.dim, qa, &seed_scores[j]);
        }
        std::nth_element(seed_scores.begin(), seed_scores.begin() + (k - 1), seed_scores.end(), std::greater<float>());
        threshold = seed_scores[kk - 1];
        if (std::isnan(threshold)) threshold = neg_inf;  // a NaN query: every row is rescored (all NaN)
      }
      for (std::size_t i = 0; i < v.n; ++i) {
        // NaN scores (a NaN query) pass and are rescored: the float32 scores then decide, as for float32
        if (approx[i] + margin[i] < threshold) continue;
        float e;
        dot32(v.rerank + i * v.dim, 1, v.dim, qa, &e);
        float& slot = exact[static_cast<std::size_t>(labels[i])];
        if (e > slot) slot = e;
      }
      select_topk(exact.data(), n_classes, k, order, out_classes + a * kk, out_scores + a * kk);
    }
  });
}

template <class T>
bool unit_rows(const T* x, std::size_t n, std::size_t dim, float zero_point, float* out) {
  bool all_finite = true;
  for (std::size_t i = 0; i < n; ++i) {
    const T* src = x + i * dim;
    float* dst = out + i * dim;
    double ss = 0.0;
    for (std::size_t j = 0; j < dim; ++j) {
      const float v = static_cast<float>(src[j]) - zero_point;
      dst[j] = v;
      ss += static_cast<double>(v) * v;
    }
    if (!std::isfinite(ss)) {  // a NaN or inf value (a float32 sum of squares cannot overflow a double)
      std::fill(dst, dst + dim, std::numeric_limits<float>::quiet_NaN());
      all_finite = false;
    } else if (ss > 0.0) {
      // In double: for subnormal rows 1 / norm exceeds the float range (1e-42 everywhere gives ~4e40)
      const double inv = 1.0 / std::sqrt(ss);
      for (std::size_t j = 0; j < dim; ++j) dst[j] = static_cast<float>(static_cast<double>(dst[j]) * inv);
    }
  }
  return all_finite;
}

template bool unit_rows<uint8_t>(const uint8_t*, std::size_t, std::size_t, float, float*);
template bool unit_rows<int8_t>(const int8_t*, std::size_t, std::size_t, float, float*);
template bool unit_rows<float>(const float*, std::size_t, std::size_t, float, float*);

}  // namespace rar
