#include "logits.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu.hpp"

// Written with GCC/Clang vector extensions of W floats and force-inlined into the entry points chosen at
// run time: the baseline ISA and AVX2+FMA with W = 8 (one AVX register, or two SSE/NEON registers), and
// AVX-512 with W = 16.
#define RAR_FORCE_INLINE inline __attribute__((always_inline))
// The helpers return vectors, which GCC warns about (-Wpsabi: the ABI of a call would depend on the ISA);
// they are always inlined into entry points compiled for one ISA, so no such call exists.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#if defined(__x86_64__)
#define RAR_LOGITS_AVX2 __attribute__((target("avx2,fma")))
#define RAR_LOGITS_AVX512 __attribute__((target("avx512f,avx2,fma")))
#endif

namespace rar {

namespace {

template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(4 * W), aligned(4), may_alias));
  typedef std::int32_t I __attribute__((vector_size(4 * W), aligned(4), may_alias));
};

constexpr std::size_t kBlock = 1024;  // floats summed in float lanes before the block goes into a double

template <int W>
RAR_FORCE_INLINE typename Vec<W>::F splat(float v) {
  typename Vec<W>::F r;
  for (int i = 0; i < W; ++i) r[i] = v;
  return r;
}

// exp(x) for x <= 0 (x - max): Cephes' expf reduction and polynomial, 2^n put into the exponent bits.
// Below -87 the result is clamped to about 1.6e-38, nothing next to the maximum's own term of 1.
template <int W>
RAR_FORCE_INLINE typename Vec<W>::F exp_nonpos(typename Vec<W>::F x) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  const F lo = splat<W>(-87.0f);
  x = x < lo ? lo : x;
  const F magic = splat<W>(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  F n = (x * splat<W>(1.44269504088896341f) + magic) - magic;
  F r = x - n * splat<W>(0.693359375f);
  r = r - n * splat<W>(-2.12194440e-4f);
  F p = splat<W>(1.9875691500e-4f);
  p = p * r + splat<W>(1.3981999507e-3f);
  p = p * r + splat<W>(8.3334519073e-3f);
  p = p * r + splat<W>(4.1665795894e-2f);
  p = p * r + splat<W>(1.6666665459e-1f);
  p = p * r + splat<W>(5.0000001201e-1f);
  p = p * r * r + r + splat<W>(1.0f);
  I e = (__builtin_convertvector(n, I) + 127) << 23;
  F scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

template <int W>
RAR_FORCE_INLINE double logsumexp_impl(const float* x, std::size_t n) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  // The maximum, and whether any NaN is present (NaN compares false, so it never becomes the maximum).
  const float ninf = -std::numeric_limits<float>::infinity();
  F vmax = splat<W>(ninf);
  I nan = I{};
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    const F v = *reinterpret_cast<const F*>(x + i);
    vmax = v > vmax ? v : vmax;
    nan |= v != v;
  }
  float m = ninf;
  bool has_nan = false;
  for (int l = 0; l < W; ++l) {
    m = vmax[l] > m ? vmax[l] : m;
    has_nan |= nan[l] != 0;
  }
  for (; i < n; ++i) {
    has_nan |= std::isnan(x[i]);
    m = x[i] > m ? x[i] : m;
  }
  if (has_nan) return std::numeric_limits<double>::quiet_NaN();
  if (std::isinf(m)) return m;  // +inf dominates; all -inf: every exp is 0
  // sum exp(x - m): float lanes within a block, double across blocks
  const F vm = splat<W>(m);
  const std::size_t full = n / W * W;
  double total = 0.0;
  for (i = 0; i < full;) {
    const std::size_t end = full - i < kBlock ? full : i + kBlock;
    F acc = splat<W>(0.0f);
    for (; i < end; i += W) acc += exp_nonpos<W>(*reinterpret_cast<const F*>(x + i) - vm);
    for (int l = 0; l < W; ++l) total += acc[l];
  }
  if (i < n) {
    F tail = splat<W>(ninf);  // pad lanes: -inf - m clamps to -87; they are left out of the sum
    for (std::size_t l = 0; i + l < n; ++l) tail[l] = x[i + l];
    const F e = exp_nonpos<W>(tail - vm);
    for (std::size_t l = 0; i + l < n; ++l) total += e[l];
  }
  return static_cast<double>(m) + std::log(total);
}

double logsumexp_base(const float* x, std::size_t n) { return logsumexp_impl<4>(x, n); }

#if defined(__x86_64__)
RAR_LOGITS_AVX2 double logsumexp_avx2(const float* x, std::size_t n) { return logsumexp_impl<8>(x, n); }
RAR_LOGITS_AVX512 double logsumexp_avx512(const float* x, std::size_t n) { return logsumexp_impl<16>(x, n); }
#endif

}  // namespace

double logsumexp(const float* x, std::size_t n) {
#if defined(__x86_64__)
  const Simd s = selected_simd();
  if (s == Simd::avx512) return logsumexp_avx512(x, n);
  if (s == Simd::avx2) return logsumexp_avx2(x, n);
#endif
  return logsumexp_base(x, n);
}

}  // namespace rar
