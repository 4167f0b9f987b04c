#include "crop.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu.hpp"
#include "parallel.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

// The passes below are plain loops written for the auto-vectoriser. They are force-inlined into two
// entry points: one compiled for the baseline ISA, one (x86-64) with AVX2+FMA enabled by a target
// attribute, chosen at run time. Everything that allocates runs in baseline code before them.
#define RAR_FORCE_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__)
#define RAR_IMG_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace rar {

namespace {

constexpr std::size_t kPad = 4;  // spare floats per row: the 4-lane horizontal resize reads one past a row

struct Coeffs {
  int out = 0;
  int taps = 0;
  std::vector<int> start, count;
  std::vector<float> w;  // out x taps
  int utaps = 0;         // uniform layout: every output has utaps taps from ustart
  std::vector<int> ustart;
  std::vector<float> uw;  // out x utaps
};

// Pillow's antialiased BILINEAR: a triangle filter widened by the downscale factor, pixel centres at +0.5.
void make_resize_coeffs(int in, int out, Coeffs* c) {
  const double scale = static_cast<double>(in) / out;
  const double fs = std::max(scale, 1.0);
  const double support = fs;
  const int taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  c->out = out;
  c->taps = taps;
  c->start.assign(static_cast<std::size_t>(out), 0);
  c->count.assign(static_cast<std::size_t>(out), 0);
  c->w.assign(static_cast<std::size_t>(out) * taps, 0.f);
  std::vector<double> tmp(static_cast<std::size_t>(taps));
  for (int x = 0; x < out; ++x) {
    const double center = (x + 0.5) * scale;
    const int lo = std::max(static_cast<int>(std::floor(center - support + 0.5)), 0);
    const int hi = std::min(std::min(static_cast<int>(std::floor(center + support + 0.5)), in), lo + taps);
    double sum = 0.0;
    int n = 0;
    for (int t = lo; t < hi; ++t, ++n) {
      const double d = (t - center + 0.5) / fs;
      tmp[static_cast<std::size_t>(n)] = std::max(0.0, 1.0 - std::fabs(d));
      sum += tmp[static_cast<std::size_t>(n)];
    }
    float* w = &c->w[static_cast<std::size_t>(x) * taps];
    if (n == 0 || sum <= 0.0) {  // degenerate: nearest pixel
      c->start[static_cast<std::size_t>(x)] = std::min(std::max(static_cast<int>(center), 0), in - 1);
      c->count[static_cast<std::size_t>(x)] = 1;
      w[0] = 1.f;
      continue;
    }
    int first = 0;  // drop zero weights at both ends (bilinear upscaling has 2 taps, not 3)
    while (first < n - 1 && tmp[static_cast<std::size_t>(first)] == 0.0) ++first;
    while (n - 1 > first && tmp[static_cast<std::size_t>(n - 1)] == 0.0) --n;
    c->start[static_cast<std::size_t>(x)] = lo + first;
    c->count[static_cast<std::size_t>(x)] = n - first;
    for (int t = first; t < n; ++t) w[t - first] = static_cast<float>(tmp[static_cast<std::size_t>(t)] / sum);
  }
  // The same filter with one tap count for every output (zero weights fill in; windows shifted left at
  // the right edge so they stay inside the input): the horizontal pass unrolls on it.
  int T = 1;
  for (int x = 0; x < out; ++x) T = std::max(T, c->count[static_cast<std::size_t>(x)]);
  c->utaps = T;
  c->ustart.assign(static_cast<std::size_t>(out), 0);
  c->uw.assign(static_cast<std::size_t>(out) * T, 0.f);
  for (int x = 0; x < out; ++x) {
    const int st = c->start[static_cast<std::size_t>(x)], n = c->count[static_cast<std::size_t>(x)];
    const int us = std::max(std::min(st, in - T), 0);
    c->ustart[static_cast<std::size_t>(x)] = us;
    for (int t = 0; t < n; ++t)
      c->uw[static_cast<std::size_t>(x) * T + (st - us) + t] = c->w[static_cast<std::size_t>(x) * taps + t];
  }
}

// Gaussian blur as Pillow's ImageFilter.GaussianBlur computes it (Gwosdek et al., "Theoretical
// foundations of Gaussian convolution by extended box filtering", 2011): kBlurPasses passes per axis of
// an extended box filter whose variance adds up to sigma^2, each pass replicating the edge pixels. One
// pass is the symmetric kernel k[0..R]: 1 / (2 b + 1) up to distance floor(b), the fraction b - floor(b)
// of that weight at distance floor(b) + 1 (b: the fractional box radius).
constexpr int kBlurPasses = 3;

void make_box_kernel(double sigma, std::vector<float>* k, int* radius) {
  if (!(sigma >= 1e-3)) {
    k->assign(1, 1.f);
    *radius = 0;
    return;
  }
  const double s2 = sigma * sigma / kBlurPasses;
  const double L = std::sqrt(12.0 * s2 + 1.0);
  const double l = std::floor((L - 1.0) / 2.0);
  const double a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) * (l + 1)));
  const double b = l + a;
  const int r = static_cast<int>(b);
  const double ww = 1.0 / (2.0 * b + 1.0);
  const double fw = (b - r) * ww;
  k->assign(static_cast<std::size_t>(r) + 2, static_cast<float>(ww));
  (*k)[static_cast<std::size_t>(r) + 1] = static_cast<float>(fw);
  *radius = r + 1;
}

enum class Mode { resize_only, resize_then_blur, blur_then_resize };

struct Plan {
  Mode mode = Mode::resize_only;
  int x0 = 0, y0 = 0, cw = 0, ch = 0;      // crop in the image
  int sx0 = 0, sy0 = 0, sx1 = 0, sy1 = 0;  // sharp rectangle, in crop (blur first) or resized (resize first) pixels
  int nw = 0, nh = 0, ox = 0, oy = 0;      // resized content size and its offset in the output
  Coeffs cx, cy;
  std::vector<float> kx, ky;
  int rx = 0, ry = 0;
  bool h_first = false;  // resize order
  std::vector<float> mx3, my;  // resize first: the sharp rectangle's resized mask per axis (mx per element)
  int ix0 = 0, ix1 = 0;        // resize first: output columns the mask touches
};

// The resized indicator of [b0, b1) along one axis: mask[x] = sum of the filter weights inside it.
void resized_mask(const Coeffs& c, int b0, int b1, std::vector<float>* mask) {
  mask->assign(static_cast<std::size_t>(c.out), 0.f);
  for (int x = 0; x < c.out; ++x) {
    const int st = c.start[static_cast<std::size_t>(x)], n = c.count[static_cast<std::size_t>(x)];
    double m = 0.0;
    for (int t = 0; t < n; ++t)
      if (st + t >= b0 && st + t < b1) m += c.w[static_cast<std::size_t>(x) * c.taps + t];
    (*mask)[static_cast<std::size_t>(x)] = m > 1.0 - 1e-6 ? 1.f : (m < 1e-6 ? 0.f : static_cast<float>(m));
  }
}

// A float buffer that only grows and is not zero-filled (rows are written before they are read; the
// spare floats after a row that the horizontal resize reads are zeroed where the row is written).
class Buf {
 public:
  float* data() { return p_.get(); }
  std::size_t bytes() const { return n_ * sizeof(float); }
  void ensure(std::size_t n) {
    if (n > n_) {
      p_.reset(new float[n]);
      n_ = n;
    }
  }

 private:
  std::unique_ptr<float[]> p_;
  std::size_t n_ = 0;
};

struct Scratch {
  Buf a, b, c, d, e, pad, tmp, edge;
  std::vector<const float*> ptrs;
  std::size_t bytes() const {
    return a.bytes() + b.bytes() + c.bytes() + d.bytes() + e.bytes() + pad.bytes() + tmp.bytes() + edge.bytes();
  }
};
constexpr std::size_t kScratchKeepBytes = std::size_t{64} << 20;

void ensure(Buf* v, std::size_t n) { v->ensure(n); }

// --------------------------------------------------------------------------------------------- passes
// Rows of floats to uint8: round to nearest, saturate (NaN -> 0).
RAR_FORCE_INLINE void to_u8(const float* __restrict src, uint8_t* __restrict dst, int n) {
  int i = 0;
#if defined(__x86_64__)
  for (; i + 16 <= n; i += 16) {
    const __m128i a = _mm_cvtps_epi32(_mm_loadu_ps(src + i));
    const __m128i b = _mm_cvtps_epi32(_mm_loadu_ps(src + i + 4));
    const __m128i c = _mm_cvtps_epi32(_mm_loadu_ps(src + i + 8));
    const __m128i d = _mm_cvtps_epi32(_mm_loadu_ps(src + i + 12));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_packus_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, d)));
  }
#elif defined(__aarch64__)
  for (; i + 8 <= n; i += 8) {
    const int32x4_t a = vcvtnq_s32_f32(vld1q_f32(src + i));
    const int32x4_t b = vcvtnq_s32_f32(vld1q_f32(src + i + 4));
    vst1_u8(dst + i, vqmovun_s16(vcombine_s16(vqmovn_s32(a), vqmovn_s32(b))));
  }
#endif
  for (; i < n; ++i) {
    float v = src[i] + 0.5f;
    v = v > 0.f ? v : 0.f;
    v = v < 255.f ? v : 255.f;
    dst[i] = static_cast<uint8_t>(static_cast<int>(v));
  }
}
RAR_FORCE_INLINE void from_u8(const uint8_t* __restrict src, float* __restrict dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
RAR_FORCE_INLINE void from_u8(const float* __restrict src, float* __restrict dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = src[i];
}
RAR_FORCE_INLINE void copy_px(const uint8_t* __restrict src, float* __restrict dst, int n) { from_u8(src, dst, n); }

RAR_FORCE_INLINE void store_row(const float* src, float* dst, int n) { std::memcpy(dst, src, sizeof(float) * n); }
RAR_FORCE_INLINE void store_row(const float* src, uint8_t* dst, int n) { to_u8(src, dst, n); }

// One RGB pixel as 4 float lanes (the 4th is scratch): the horizontal resize does one multiply-add per tap.
#if defined(__x86_64__)
struct Px {
  __m128 v;
};
RAR_FORCE_INLINE Px px_zero() { return {_mm_setzero_ps()}; }
RAR_FORCE_INLINE Px px_madd(Px acc, float w, const float* p) {
  return {_mm_add_ps(acc.v, _mm_mul_ps(_mm_set1_ps(w), _mm_loadu_ps(p)))};
}
RAR_FORCE_INLINE void px_store(Px a, float* d) { _mm_storeu_ps(d, a.v); }  // writes one spare float
RAR_FORCE_INLINE void px_store(Px a, uint8_t* d) {
  __m128i i = _mm_cvtps_epi32(a.v);
  i = _mm_packs_epi32(i, i);
  i = _mm_packus_epi16(i, i);
  const uint32_t x = static_cast<uint32_t>(_mm_cvtsi128_si32(i));
  std::memcpy(d, &x, 3);
}
#elif defined(__aarch64__)
struct Px {
  float32x4_t v;
};
RAR_FORCE_INLINE Px px_zero() { return {vdupq_n_f32(0.f)}; }
RAR_FORCE_INLINE Px px_madd(Px acc, float w, const float* p) { return {vfmaq_n_f32(acc.v, vld1q_f32(p), w)}; }
RAR_FORCE_INLINE void px_store(Px a, float* d) { vst1q_f32(d, a.v); }
RAR_FORCE_INLINE void px_store(Px a, uint8_t* d) {
  const uint16x4_t h = vqmovun_s32(vcvtnq_s32_f32(a.v));
  const uint8x8_t b = vqmovn_u16(vcombine_u16(h, h));
  const uint32_t x = vget_lane_u32(vreinterpret_u32_u8(b), 0);
  std::memcpy(d, &x, 3);
}
#else
struct Px {
  float v[4];
};
RAR_FORCE_INLINE Px px_zero() { return {{0.f, 0.f, 0.f, 0.f}}; }
RAR_FORCE_INLINE Px px_madd(Px acc, float w, const float* p) {
  for (int c = 0; c < 4; ++c) acc.v[c] += w * p[c];
  return acc;
}
RAR_FORCE_INLINE void px_store(Px a, float* d) { std::memcpy(d, a.v, 4 * sizeof(float)); }
RAR_FORCE_INLINE void px_store(Px a, uint8_t* d) { to_u8(a.v, d, 3); }
#endif

// Vertical resize of one output row y: d = sum of weighted source rows; len elements, then kPad zeros.
template <class TIn>
RAR_FORCE_INLINE void vresize_row(const TIn* src, std::size_t sstride, int len, const Coeffs& cy, int y,
                                  float* __restrict d) {
  const float* w = &cy.w[static_cast<std::size_t>(y) * cy.taps];
  const int s = cy.start[static_cast<std::size_t>(y)], n = cy.count[static_cast<std::size_t>(y)];
  const TIn* __restrict r0 = src + static_cast<std::size_t>(s) * sstride;
  const float w0 = w[0];
  for (int i = 0; i < len; ++i) d[i] = w0 * static_cast<float>(r0[i]);
  for (int t = 1; t < n; ++t) {
    const TIn* __restrict r = src + static_cast<std::size_t>(s + t) * sstride;
    const float wt = w[t];
    for (int i = 0; i < len; ++i) d[i] += wt * static_cast<float>(r[i]);
  }
  for (std::size_t i = 0; i < kPad; ++i) d[len + i] = 0.f;
}

template <int T, class TOut>
RAR_FORCE_INLINE void hresize_fixed(const float* src, std::size_t sstride, int rows, const Coeffs& cx, TOut* dst,
                                    std::size_t dstride) {
  const int* start = cx.ustart.data();
  const float* wts = cx.uw.data();
  for (int y = 0; y < rows; ++y) {
    const float* r = src + static_cast<std::size_t>(y) * sstride;
    TOut* d = dst + static_cast<std::size_t>(y) * dstride;
    for (int x = 0; x < cx.out; ++x) {
      const float* w = wts + static_cast<std::size_t>(x) * T;
      const float* p = r + static_cast<std::size_t>(start[x]) * 3;
      Px acc = px_zero();
      for (int t = 0; t < T; ++t) acc = px_madd(acc, w[t], p + 3 * t);
      px_store(acc, d + 3 * x);
    }
  }
}

// Horizontal resize of RGB float rows (each with kPad spare floats) into dst. A float dst row needs one
// spare float after its last pixel.
template <class TOut>
RAR_FORCE_INLINE void hresize(const float* src, std::size_t sstride, int rows, const Coeffs& cx, TOut* dst,
                              std::size_t dstride) {
  switch (cx.utaps) {
    case 1: return hresize_fixed<1>(src, sstride, rows, cx, dst, dstride);
    case 2: return hresize_fixed<2>(src, sstride, rows, cx, dst, dstride);
    case 3: return hresize_fixed<3>(src, sstride, rows, cx, dst, dstride);
    case 4: return hresize_fixed<4>(src, sstride, rows, cx, dst, dstride);
    case 5: return hresize_fixed<5>(src, sstride, rows, cx, dst, dstride);
    case 6: return hresize_fixed<6>(src, sstride, rows, cx, dst, dstride);
    case 7: return hresize_fixed<7>(src, sstride, rows, cx, dst, dstride);
    case 8: return hresize_fixed<8>(src, sstride, rows, cx, dst, dstride);
    default: break;
  }
  const int* start = cx.start.data();
  const int* count = cx.count.data();
  const float* wts = cx.w.data();
  const int taps = cx.taps;
  for (int y = 0; y < rows; ++y) {
    const float* r = src + static_cast<std::size_t>(y) * sstride;
    TOut* d = dst + static_cast<std::size_t>(y) * dstride;
    for (int x = 0; x < cx.out; ++x) {
      const float* w = wts + static_cast<std::size_t>(x) * taps;
      const float* p = r + static_cast<std::size_t>(start[x]) * 3;
      const int n = count[x];
      Px acc = px_zero();
      for (int t = 0; t < n; ++t) acc = px_madd(acc, w[t], p + 3 * t);
      px_store(acc, d + 3 * x);
    }
  }
}

// o[i] = k[0] c[i] + sum_t k[t] (lo[t][i] + hi[t][i]) for i in [a, b): a symmetric 1-D kernel, blocked so
// the partial sums of 32 outputs stay in registers across all taps (one pass over the inputs per block).
RAR_FORCE_INLINE void sym_conv(const float* c, const float* const* lo, const float* const* hi, const float* k,
                               int r, int a, int b, float* __restrict o) {
  // GCC/Clang vector extensions: 8 floats, one AVX register or two SSE/NEON registers.
  typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));
  constexpr int B = 32;
  const float k0 = k[0];
  int i = a;
  for (; i + B <= b; i += B) {
    v8 a0 = k0 * *reinterpret_cast<const v8*>(c + i);
    v8 a1 = k0 * *reinterpret_cast<const v8*>(c + i + 8);
    v8 a2 = k0 * *reinterpret_cast<const v8*>(c + i + 16);
    v8 a3 = k0 * *reinterpret_cast<const v8*>(c + i + 24);
    for (int t = 1; t <= r; ++t) {
      const float kt = k[t];
      const float* l = lo[t] + i;
      const float* h = hi[t] + i;
      a0 += kt * (*reinterpret_cast<const v8*>(l) + *reinterpret_cast<const v8*>(h));
      a1 += kt * (*reinterpret_cast<const v8*>(l + 8) + *reinterpret_cast<const v8*>(h + 8));
      a2 += kt * (*reinterpret_cast<const v8*>(l + 16) + *reinterpret_cast<const v8*>(h + 16));
      a3 += kt * (*reinterpret_cast<const v8*>(l + 24) + *reinterpret_cast<const v8*>(h + 24));
    }
    *reinterpret_cast<v8*>(o + i) = a0;
    *reinterpret_cast<v8*>(o + i + 8) = a1;
    *reinterpret_cast<v8*>(o + i + 16) = a2;
    *reinterpret_cast<v8*>(o + i + 24) = a3;
  }
  for (; i + 8 <= b; i += 8) {
    v8 a0 = k0 * *reinterpret_cast<const v8*>(c + i);
    for (int t = 1; t <= r; ++t)
      a0 += k[t] * (*reinterpret_cast<const v8*>(lo[t] + i) + *reinterpret_cast<const v8*>(hi[t] + i));
    *reinterpret_cast<v8*>(o + i) = a0;
  }
  for (; i < b; ++i) {
    float acc = k0 * c[i];
    for (int t = 1; t <= r; ++t) acc += k[t] * (lo[t][i] + hi[t][i]);
    o[i] = acc;
  }
}

// The part of the blurred image that is never needed: the sharp rectangle [x0, x1) x [y0, y1) (pixels).
// A pass may skip it shrunk by the reach of the passes after it.
struct Skip {
  int x0 = 0, y0 = 0, x1 = 0, y1 = 0;
};

// Horizontal blur of RGB rows: kBlurPasses passes of kernel k (radius r), edge pixels replicated before
// each pass. pad: (w + 2 r) * 3 floats; tmp: w * 3 floats; ptrs: 2 (r + 1) pointers. ry: the vertical
// radius still to come (rows that deep inside the skip rectangle need only its outside).
template <class TIn>
RAR_FORCE_INLINE void blur_h(const TIn* src, std::size_t sstride, int rows, int w, const float* k, int r,
                             const Skip& skip, int ry, float* pad, float* tmp, const float** ptrs, float* dst,
                             std::size_t dstride, const float* edge_l = nullptr, const float* edge_r = nullptr) {
  const int len = w * 3;
  float* mid = pad + 3 * r;
  const float** lo = ptrs;
  const float** hi = ptrs + (r + 1);
  for (int t = 1; t <= r; ++t) {
    lo[t] = mid - 3 * t;
    hi[t] = mid + 3 * t;
  }
  const int deep0 = skip.y0 + kBlurPasses * ry, deep1 = skip.y1 - kBlurPasses * ry;
  for (int y = 0; y < rows; ++y) {
    from_u8(src + static_cast<std::size_t>(y) * sstride, mid, len);
    float* d = dst + static_cast<std::size_t>(y) * dstride;
    const bool deep = y >= deep0 && y < deep1;
    for (int pass = 0; pass < kBlurPasses; ++pass) {
      // The first pass may extend the row with given edge pixels instead of its own end pixels.
      const float* el = pass == 0 && edge_l ? edge_l + 3 * y : mid;
      const float* er = pass == 0 && edge_r ? edge_r + 3 * y : mid + 3 * (w - 1);
      for (int p = 0; p < r; ++p)
        for (int c = 0; c < 3; ++c) {
          pad[3 * p + c] = el[c];
          pad[3 * (r + w + p) + c] = er[c];
        }
      const bool last = pass + 1 == kBlurPasses;
      float* o = last ? d : tmp;
      const int reach = (kBlurPasses - 1 - pass) * r;
      const int a = 3 * (skip.x0 + reach), b = 3 * (skip.x1 - reach);
      if (deep && a < b) {
        sym_conv(mid, lo, hi, k, r, 0, a, o);
        sym_conv(mid, lo, hi, k, r, b, len, o);
        if (!last) {
          std::memcpy(mid, tmp, sizeof(float) * static_cast<std::size_t>(a));
          std::memcpy(mid + b, tmp + b, sizeof(float) * static_cast<std::size_t>(len - b));
        }
      } else {
        sym_conv(mid, lo, hi, k, r, 0, len, o);
        if (!last) std::memcpy(mid, tmp, sizeof(float) * static_cast<std::size_t>(len));
      }
    }
  }
}

// One vertical pass of kernel k over rows [0, rows), edge rows replicated (or the rows top / bottom when
// given); skips the columns [3 skip.x0, 3 skip.x1) in rows [skip.y0 + reach, skip.y1 - reach).
RAR_FORCE_INLINE void vblur_rows(const float* src, std::size_t stride, int rows, int len, const float* k, int r,
                                 const Skip& skip, int reach, const float** ptrs, float* dst,
                                 const float* top = nullptr, const float* bottom = nullptr) {
  const float** lo = ptrs;
  const float** hi = ptrs + (r + 1);
  for (int y = 0; y < rows; ++y) {
    for (int t = 1; t <= r; ++t) {
      lo[t] = y - t < 0 && top ? top : src + static_cast<std::size_t>(std::max(y - t, 0)) * stride;
      hi[t] = y + t >= rows && bottom ? bottom : src + static_cast<std::size_t>(std::min(y + t, rows - 1)) * stride;
    }
    const float* c = src + static_cast<std::size_t>(y) * stride;
    float* d = dst + static_cast<std::size_t>(y) * stride;
    if (y >= skip.y0 + reach && y < skip.y1 - reach && skip.x1 > skip.x0) {
      sym_conv(c, lo, hi, k, r, 0, 3 * skip.x0, d);
      sym_conv(c, lo, hi, k, r, 3 * skip.x1, len, d);
    } else {
      sym_conv(c, lo, hi, k, r, 0, len, d);
    }
  }
}

// Vertical blur of the horizontally blurred rows hb (kBlurPasses passes, the last one skipping the sharp
// rectangle, which is copied from `sharp`); writes dst (float or uint8). v1, v2: two scratch images shaped
// like hb; ptrs: 2 (r + 1) pointers; tmp: w * 3 floats.
template <class TSharp, class TOut>
RAR_FORCE_INLINE void blur_v(const float* hb, std::size_t hstride, int rows, int w, const float* k, int r,
                             const TSharp* sharp, std::size_t sstride, int bx0, int by0, int bx1, int by1,
                             const float** ptrs, float* v1, float* v2, float* tmp, TOut* dst, std::size_t dstride) {
  const int len = w * 3;
  const float* src = hb;
  float* bufs[2] = {v1, v2};
  const Skip skip{bx0, by0, bx1, by1};
  for (int pass = 0; pass + 1 < kBlurPasses; ++pass) {
    vblur_rows(src, hstride, rows, len, k, r, skip, (kBlurPasses - 1 - pass) * r, ptrs, bufs[pass & 1]);
    src = bufs[pass & 1];
  }
  const float** lo = ptrs;
  const float** hi = ptrs + (r + 1);
  for (int y = 0; y < rows; ++y) {
    TOut* d = dst + static_cast<std::size_t>(y) * dstride;
    int seg[2][2] = {{0, len}, {len, len}};
    if (y >= by0 && y < by1) {
      seg[0][1] = 3 * bx0;
      seg[1][0] = 3 * bx1;
      const TSharp* s = sharp + static_cast<std::size_t>(y) * sstride;
      copy_px(s + 3 * bx0, d + 3 * bx0, 3 * (bx1 - bx0));
    }
    for (int t = 1; t <= r; ++t) {
      lo[t] = src + static_cast<std::size_t>(std::max(y - t, 0)) * hstride;
      hi[t] = src + static_cast<std::size_t>(std::min(y + t, rows - 1)) * hstride;
    }
    const float* c0 = src + static_cast<std::size_t>(y) * hstride;
    for (auto& sg : seg) {
      if (sg[1] <= sg[0]) continue;
      sym_conv(c0, lo, hi, k, r, sg[0], sg[1], tmp);
      store_row(tmp + sg[0], d + sg[0], sg[1] - sg[0]);
    }
    if constexpr (std::is_same<TOut, float>::value)
      for (std::size_t i = 0; i < kPad; ++i) reinterpret_cast<float*>(d)[len + i] = 0.f;
  }
}

// The resize-first variant of blur_v: the sharp rectangle was resized with the image, so output pixels on
// its border are partly sharp. m = mx[x] * my[y] is the resized rectangle mask (the rectangle's indicator
// passed through the same resize filter, separable); the output is blurred + m * (sharp - blurred), which is
// what resizing the blurred-and-pasted crop gives up to the order of the two linear steps.
// [sx0, sx1) x [sy0, sy1): where m == 1 (no blur needed); [ix0, ix1): columns where mx > 0.
struct MaskPlan {
  const float* mx3;  // 3 * w: mx per element
  const float* my;   // rows
  int sx0, sx1, sy0, sy1, ix0, ix1;
};

RAR_FORCE_INLINE void blur_v_blend(const float* hb, std::size_t hstride, int rows, int w, const float* k, int r,
                                   const float* sharp, const MaskPlan& m, const float** ptrs, float* v1, float* v2,
                                   float* tmp, uint8_t* dst, std::size_t dstride, const float* top,
                                   const float* bottom) {
  const int len = w * 3;
  const float* src = hb;
  float* bufs[2] = {v1, v2};
  const Skip skip{m.sx0, m.sy0, m.sx1, m.sy1};
  for (int pass = 0; pass + 1 < kBlurPasses; ++pass) {
    vblur_rows(src, hstride, rows, len, k, r, skip, (kBlurPasses - 1 - pass) * r, ptrs, bufs[pass & 1],
               pass == 0 ? top : nullptr, pass == 0 ? bottom : nullptr);
    src = bufs[pass & 1];
  }
  const float** lo = ptrs;
  const float** hi = ptrs + (r + 1);
  for (int y = 0; y < rows; ++y) {
    uint8_t* d = dst + static_cast<std::size_t>(y) * dstride;
    const float* sh = sharp + static_cast<std::size_t>(y) * hstride;
    int seg[2][2] = {{0, len}, {len, len}};
    if (y >= m.sy0 && y < m.sy1 && m.sx1 > m.sx0) {
      seg[0][1] = 3 * m.sx0;
      seg[1][0] = 3 * m.sx1;
      to_u8(sh + 3 * m.sx0, d + 3 * m.sx0, 3 * (m.sx1 - m.sx0));
    }
    for (int t = 1; t <= r; ++t) {
      lo[t] = src + static_cast<std::size_t>(std::max(y - t, 0)) * hstride;
      hi[t] = src + static_cast<std::size_t>(std::min(y + t, rows - 1)) * hstride;
    }
    const float* c0 = src + static_cast<std::size_t>(y) * hstride;
    const float my = m.my[y];
    for (auto& sg : seg) {
      if (sg[1] <= sg[0]) continue;
      sym_conv(c0, lo, hi, k, r, sg[0], sg[1], tmp);
      if (my > 0.f) {
        const int a = std::max(sg[0], 3 * m.ix0), b = std::min(sg[1], 3 * m.ix1);
        for (int i = a; i < b; ++i) tmp[i] += (m.mx3[i] * my) * (sh[i] - tmp[i]);
      }
      to_u8(tmp + sg[0], d + sg[0], sg[1] - sg[0]);
    }
  }
}

// ------------------------------------------------------------------------------------- one box, run

// Resizes a cw x ch RGB image (uint8 or float rows) to nw x nh into dst (uint8 or float rows). Vertical
// first when that needs fewer per-pixel horizontal taps (downscaling), horizontal first when upscaling.
template <class TIn, class TOut>
RAR_FORCE_INLINE void resize(const Plan& p, const TIn* src, std::size_t sstride, TOut* dst, std::size_t dstride,
                             float* r1, float* r2, float* tmp) {
  const std::size_t cstride = static_cast<std::size_t>(p.cw) * 3 + kPad;
  const std::size_t nstride = static_cast<std::size_t>(p.nw) * 3 + kPad;
  if (!p.h_first) {  // row by row: each vertically resized row is resized horizontally while in L1
    (void)r1;
    for (int y = 0; y < p.nh; ++y) {
      vresize_row(src, sstride, p.cw * 3, p.cy, y, tmp);
      hresize(tmp, cstride, 1, p.cx, dst + static_cast<std::size_t>(y) * dstride, dstride);
    }
    return;
  }
  const float* fsrc;
  std::size_t fstride;
  if constexpr (std::is_same<TIn, float>::value) {
    fsrc = reinterpret_cast<const float*>(src);
    fstride = sstride;
  } else {
    for (int y = 0; y < p.ch; ++y) {
      float* row = r1 + y * cstride;
      from_u8(src + y * sstride, row, p.cw * 3);
      for (std::size_t i = 0; i < kPad; ++i) row[p.cw * 3 + i] = 0.f;
    }
    fsrc = r1;
    fstride = cstride;
  }
  hresize(fsrc, fstride, p.ch, p.cx, r2, nstride);
  const int len = p.nw * 3;
  for (int y = 0; y < p.nh; ++y) {
    const float* w = &p.cy.w[static_cast<std::size_t>(y) * p.cy.taps];
    const int s0 = p.cy.start[static_cast<std::size_t>(y)], n = p.cy.count[static_cast<std::size_t>(y)];
    float* __restrict d = tmp;
    const float* __restrict q0 = r2 + static_cast<std::size_t>(s0) * nstride;
    const float w0 = w[0];
    for (int i = 0; i < len; ++i) d[i] = w0 * q0[i];
    for (int t = 1; t < n; ++t) {
      const float* __restrict q = r2 + static_cast<std::size_t>(s0 + t) * nstride;
      const float wt = w[t];
      for (int i = 0; i < len; ++i) d[i] += wt * q[i];
    }
    store_row(tmp, dst + static_cast<std::size_t>(y) * dstride, len);
  }
}

RAR_FORCE_INLINE void run_plan_body(const Plan& p, Scratch& s, const uint8_t* image, int w, uint8_t* out,
                                    int out_size) {
  const std::size_t istride = static_cast<std::size_t>(w) * 3;
  const uint8_t* crop = image + (static_cast<std::size_t>(p.y0) * w + p.x0) * 3;
  const std::size_t ostride = static_cast<std::size_t>(out_size) * 3;
  uint8_t* content = out + static_cast<std::size_t>(p.oy) * ostride + static_cast<std::size_t>(p.ox) * 3;
  const std::size_t cstride = static_cast<std::size_t>(p.cw) * 3 + kPad;
  const std::size_t nstride = static_cast<std::size_t>(p.nw) * 3 + kPad;
  float* a = s.a.data();
  float* b = s.b.data();
  float* c = s.c.data();
  switch (p.mode) {
    case Mode::resize_only:
      resize(p, crop, istride, content, ostride, a, b, s.tmp.data());
      break;
    case Mode::resize_then_blur: {
      resize(p, crop, istride, c, nstride, a, b, s.tmp.data());
      // Blurring the crop replicates its own edge pixels; blurring the resized crop would replicate resized
      // (averaged) edges instead. The first pass of each axis extends the resized image with the crop's
      // edge rows / columns resized along the edge, which keeps edge rows that differ from their neighbours
      // as heavy as in the crop.
      float* e = s.edge.data();
      float* vl = e;
      float* vr = vl + 3 * p.nh;
      float* corners = vr + 3 * p.nh;  // TL, TR, BL, BR raw pixels
      float* row_t = corners + 12;
      float* row_b = row_t + nstride;
      float* row_tb = row_b + nstride;
      float* row_bb = row_tb + nstride;
      float* crow = row_bb + nstride;
      for (int y = 0; y < p.nh; ++y) {
        const float* wy = &p.cy.w[static_cast<std::size_t>(y) * p.cy.taps];
        const int st = p.cy.start[static_cast<std::size_t>(y)], n = p.cy.count[static_cast<std::size_t>(y)];
        for (int ch = 0; ch < 3; ++ch) {
          float l = 0.f, r = 0.f;
          for (int t = 0; t < n; ++t) {
            const uint8_t* row = crop + static_cast<std::size_t>(st + t) * istride;
            l += wy[t] * row[ch];
            r += wy[t] * row[3 * (p.cw - 1) + ch];
          }
          vl[3 * y + ch] = l;
          vr[3 * y + ch] = r;
        }
      }
      const uint8_t* last_row = crop + static_cast<std::size_t>(p.ch - 1) * istride;
      for (int ch = 0; ch < 3; ++ch) {
        corners[ch] = crop[ch];
        corners[3 + ch] = crop[3 * (p.cw - 1) + ch];
        corners[6 + ch] = last_row[ch];
        corners[9 + ch] = last_row[3 * (p.cw - 1) + ch];
      }
      const std::size_t cs = static_cast<std::size_t>(p.cw) * 3 + kPad;
      for (int side = 0; side < 2; ++side) {
        from_u8(side ? last_row : crop, crow, p.cw * 3);
        for (std::size_t i = 0; i < kPad; ++i) crow[static_cast<std::size_t>(p.cw) * 3 + i] = 0.f;
        float* raw = side ? row_b : row_t;
        hresize(crow, cs, 1, p.cx, raw, nstride);
        blur_h(raw, nstride, 1, p.nw, p.kx.data(), p.rx, Skip{}, 0, s.pad.data(), s.tmp.data(), s.ptrs.data(),
               side ? row_bb : row_tb, nstride, corners + 6 * side, corners + 6 * side + 3);
      }
      blur_h(c, nstride, p.nh, p.nw, p.kx.data(), p.rx, Skip{p.sx0, p.sy0, p.sx1, p.sy1}, p.ry, s.pad.data(),
             s.tmp.data(), s.ptrs.data(), b, nstride, vl, vr);
      blur_v_blend(b, nstride, p.nh, p.nw, p.ky.data(), p.ry, c,
                   MaskPlan{p.mx3.data(), p.my.data(), p.sx0, p.sx1, p.sy0, p.sy1, p.ix0, p.ix1}, s.ptrs.data(),
                   s.d.data(), s.e.data(), s.tmp.data(), content, ostride, row_tb, row_bb);
      break;
    }
    case Mode::blur_then_resize:
      blur_h(crop, istride, p.ch, p.cw, p.kx.data(), p.rx, Skip{p.sx0, p.sy0, p.sx1, p.sy1}, p.ry, s.pad.data(),
             s.tmp.data(), s.ptrs.data(), a, cstride);
      blur_v(a, cstride, p.ch, p.cw, p.ky.data(), p.ry, crop, istride, p.sx0, p.sy0, p.sx1, p.sy1, s.ptrs.data(),
             s.d.data(), s.e.data(), s.tmp.data(), b, cstride);
      resize(p, b, cstride, content, ostride, a, c, s.tmp.data());
      break;
  }
}

using RunFn = void (*)(const Plan&, Scratch&, const uint8_t*, int, uint8_t*, int);

void run_plan_baseline(const Plan& p, Scratch& s, const uint8_t* image, int w, uint8_t* out, int out_size) {
  run_plan_body(p, s, image, w, out, out_size);
}
#if defined(__x86_64__)
RAR_IMG_AVX2 void run_plan_avx2(const Plan& p, Scratch& s, const uint8_t* image, int w, uint8_t* out,
                                int out_size) {
  run_plan_body(p, s, image, w, out, out_size);
}
#endif

RunFn pick_run() {
#if defined(__x86_64__)
  const Simd s = selected_simd();
  if (s == Simd::avx2 || s == Simd::avx512) return &run_plan_avx2;
#endif
  return &run_plan_baseline;
}

// ------------------------------------------------------------------------------------ geometry, plan
void plan_box(const double* box, int h, int w, const CropParams& prm, Plan* p, Scratch* s) {
  const double x1 = std::max(box[0], 0.0), y1 = std::max(box[1], 0.0);
  const double x2 = std::min(box[2], static_cast<double>(w)), y2 = std::min(box[3], static_cast<double>(h));
  const int ix0 = static_cast<int>(std::floor(x1)), iy0 = static_cast<int>(std::floor(y1));
  const int ix1 = std::max(static_cast<int>(std::ceil(x2)), ix0 + 1);
  const int iy1 = std::max(static_cast<int>(std::ceil(y2)), iy0 + 1);
  double scale = prm.crop_scale;
  if (prm.adaptive) {
    const double rel = (x2 - x1) * (y2 - y1) / (static_cast<double>(w) * h);
    scale = std::sqrt(kAdaptiveTargetArea / std::max(rel, 1e-12));
    scale = std::min(std::max(scale, kAdaptiveMinScale), kAdaptiveMaxScale);
  }
  const double cx = 0.5 * (x1 + x2), cy = 0.5 * (y1 + y2);
  const double hw = 0.5 * (x2 - x1) * scale, hh = 0.5 * (y2 - y1) * scale;
  int X0 = static_cast<int>(std::floor(std::max(cx - hw, 0.0)));
  int Y0 = static_cast<int>(std::floor(std::max(cy - hh, 0.0)));
  int X1 = static_cast<int>(std::ceil(std::min(cx + hw, static_cast<double>(w))));
  int Y1 = static_cast<int>(std::ceil(std::min(cy + hh, static_cast<double>(h))));
  X0 = std::min(X0, ix0);
  Y0 = std::min(Y0, iy0);
  X1 = std::min(std::max(X1, ix1), w);
  Y1 = std::min(std::max(Y1, iy1), h);
  p->x0 = X0;
  p->y0 = Y0;
  p->cw = X1 - X0;
  p->ch = Y1 - Y0;

  const int S = prm.out_size;
  if (prm.letterbox) {
    const double f = static_cast<double>(S) / std::max(p->cw, p->ch);
    p->nw = std::min(std::max(static_cast<int>(std::lround(p->cw * f)), 1), S);
    p->nh = std::min(std::max(static_cast<int>(std::lround(p->ch * f)), 1), S);
  } else {
    p->nw = p->nh = S;
  }
  p->ox = (S - p->nw) / 2;
  p->oy = (S - p->nh) / 2;
  make_resize_coeffs(p->cw, p->nw, &p->cx);
  make_resize_coeffs(p->ch, p->nh, &p->cy);

  // Resize order: count per-pixel horizontal taps (4-lane work) and vectorised vertical taps (8 lanes).
  {
    const double th = p->cx.utaps, tv = p->cy.utaps;
    const double v_first = double(p->nh) * p->nw * th + double(p->nh) * p->cw * 3 * tv / 8;
    const double h_first = double(p->ch) * p->nw * th + double(p->nh) * p->nw * 3 * tv / 8 + double(p->ch) * p->cw * 3 / 8;
    p->h_first = h_first < v_first;
  }
  // Scratch, sized per mode (a huge crop that is resized first never needs a full-size float copy).
  const std::size_t cstride = static_cast<std::size_t>(p->cw) * 3 + kPad;
  const std::size_t nstride = static_cast<std::size_t>(p->nw) * 3 + kPad;
  const std::size_t crop_f = static_cast<std::size_t>(p->ch) * cstride;   // the crop as floats
  const std::size_t out_f = static_cast<std::size_t>(p->nh) * nstride;    // the resized content
  const std::size_t r1 = p->h_first ? crop_f : 0;  // resize pass 1 (vertical first goes row by row in tmp)
  const std::size_t r2 = p->h_first ? static_cast<std::size_t>(p->ch) * nstride : 0;       // resize pass 2
  const bool blur = prm.sigma > 0.0;
  const bool first = static_cast<long long>(p->cw) * p->ch > static_cast<long long>(p->nw) * p->nh;
  if (!blur) {
    ensure(&s->a, r1);
    ensure(&s->b, r2);
  } else if (first) {  // resize then blur
    ensure(&s->edge, 6 * static_cast<std::size_t>(p->nh) + 12 + 4 * nstride + cstride);
    ensure(&s->a, r1);
    ensure(&s->b, std::max(r2, out_f));
    ensure(&s->c, out_f);
    ensure(&s->d, out_f);
    ensure(&s->e, out_f);
  } else {  // blur then resize
    ensure(&s->a, crop_f);
    ensure(&s->b, crop_f);
    ensure(&s->c, r2);
    ensure(&s->d, crop_f);
    ensure(&s->e, crop_f);
  }
  ensure(&s->tmp, std::max(cstride, nstride));

  // Sharp rectangle in crop pixels.
  const int bx0 = ix0 - X0, by0 = iy0 - Y0, bx1 = std::min(ix1, X1) - X0, by1 = std::min(iy1, Y1) - Y0;
  if (!(prm.sigma > 0.0)) {
    p->mode = Mode::resize_only;
    return;
  }
  if (static_cast<long long>(p->cw) * p->ch > static_cast<long long>(p->nw) * p->nh) {
    p->mode = Mode::resize_then_blur;
    const double fx = static_cast<double>(p->nw) / p->cw, fy = static_cast<double>(p->nh) / p->ch;
    std::vector<float> mx;
    resized_mask(p->cx, bx0, bx1, &mx);
    resized_mask(p->cy, by0, by1, &p->my);
    auto ones = [](const std::vector<float>& m, int* a, int* b) {  // the run of 1s (empty when none)
      *a = *b = 0;
      for (int i = 0; i < static_cast<int>(m.size()); ++i)
        if (m[static_cast<std::size_t>(i)] == 1.f) {
          if (*b == *a) *a = i;
          *b = i + 1;
        }
    };
    ones(mx, &p->sx0, &p->sx1);
    ones(p->my, &p->sy0, &p->sy1);
    p->ix0 = p->nw;
    p->ix1 = 0;
    for (int i = 0; i < p->nw; ++i)
      if (mx[static_cast<std::size_t>(i)] > 0.f) {
        p->ix0 = std::min(p->ix0, i);
        p->ix1 = i + 1;
      }
    p->mx3.resize(3 * mx.size());
    for (std::size_t i = 0; i < mx.size(); ++i) p->mx3[3 * i] = p->mx3[3 * i + 1] = p->mx3[3 * i + 2] = mx[i];
    make_box_kernel(prm.sigma * fx, &p->kx, &p->rx);
    make_box_kernel(prm.sigma * fy, &p->ky, &p->ry);
    s->ptrs.resize(2 * static_cast<std::size_t>(std::max(p->rx, p->ry) + 1));
    ensure(&s->pad, static_cast<std::size_t>(p->nw + 2 * p->rx) * 3 + kPad);
  } else {
    p->mode = Mode::blur_then_resize;
    p->sx0 = bx0;
    p->sx1 = bx1;
    p->sy0 = by0;
    p->sy1 = by1;
    make_box_kernel(prm.sigma, &p->kx, &p->rx);
    make_box_kernel(prm.sigma, &p->ky, &p->ry);
    s->ptrs.resize(2 * static_cast<std::size_t>(std::max(p->rx, p->ry) + 1));
    ensure(&s->pad, static_cast<std::size_t>(p->cw + 2 * p->rx) * 3 + kPad);
  }
}

}  // namespace

bool check_box(const double* b, int h, int w, std::string* reason) {
  for (int j = 0; j < 4; ++j)
    if (!std::isfinite(b[j])) {
      *reason = "has a NaN or infinite coordinate";
      return false;
    }
  if (!(b[2] > b[0]) || !(b[3] > b[1])) {
    *reason = "has zero or negative area (need x2 > x1 and y2 > y1)";
    return false;
  }
  if (!(std::min(b[2], static_cast<double>(w)) > std::max(b[0], 0.0)) ||
      !(std::min(b[3], static_cast<double>(h)) > std::max(b[1], 0.0))) {
    *reason = "lies outside the image";
    return false;
  }
  return true;
}

void crop_blur(const uint8_t* image, int h, int w, const double* boxes, std::size_t n, const CropParams& params,
               int threads, uint8_t* out) {
  const std::size_t per_box = static_cast<std::size_t>(params.out_size) * params.out_size * 3;
  const RunFn run = pick_run();
  parallel_chunks(n, threads, [&](int, std::size_t b, std::size_t e) {
    // Scratch stays with the thread between calls (a fresh multi-MB allocation per call costs page faults
    // that dominate a small batch), up to a cap so one huge image does not pin its buffers.
    thread_local Scratch scratch;
    Plan plan;
    for (std::size_t i = b; i < e; ++i) {
      uint8_t* o = out + i * per_box;
      plan_box(boxes + 4 * i, h, w, params, &plan, &scratch);
      if (plan.nw != params.out_size || plan.nh != params.out_size) std::memset(o, params.pad_value, per_box);
      run(plan, scratch, image, w, o, params.out_size);
    }
    if (scratch.bytes() > kScratchKeepBytes) scratch = Scratch();
  });
}

}  // namespace rar
