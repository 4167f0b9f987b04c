// Runs the C++ core's kernels on fixed pseudo-random inputs with every kernel family this build and CPU have,
// printing the results as text. tests/test_native_aarch64.py builds it for x86-64 and for aarch64 (run under
// qemu-aarch64) and compares the two: the NEON kernels against the x86 ones and against plain C++.
//
// Lines:  <family> search <storage> <threads> <query> <k classes> <k scores>
//         <family> crop <case> <threads> <hex bytes>
//         <family> lse <n> <value>
//         <family> unit <row> <values>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cpu.hpp"
#include "crop.hpp"
#include "logits.hpp"
#include "search.hpp"

namespace {

struct Lcg {
  uint64_t s;
  explicit Lcg(uint64_t seed) : s(seed * 6364136223846793005ULL + 1442695040888963407ULL) {}
  uint32_t next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<uint32_t>(s >> 33);
  }
  float uniform() { return static_cast<float>(next() & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f; }  // [-1, 1)
};

uint16_t to_half(float f) {  // round to nearest even; the inputs here are normal and small
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int32_t exp = static_cast<int32_t>((x >> 23) & 0xFF) - 127 + 15;
  uint32_t mant = x & 0x7FFFFFu;
  if (exp <= 0) return static_cast<uint16_t>(sign);  // flush the few tiny values
  uint32_t h = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(h);
}

void search_case(const char* fam, rar::Storage storage, bool rerank, std::size_t dim, int threads) {
  const std::size_t n = 2000;
  const int32_t n_classes = 37;
  const std::size_t nq = 5;  // one group of 4 (the multi-query kernels) and one single query
  const int k = 5;
  Lcg g(dim * 7 + 1);
  std::vector<float> rows(n * dim), queries(nq * dim);
  for (auto& v : rows) v = g.uniform();
  for (auto& v : queries) v = g.uniform();
  for (std::size_t i = 0; i < n; ++i) {  // unit rows, as a memory holds
    double s = 0;
    for (std::size_t j = 0; j < dim; ++j) s += double(rows[i * dim + j]) * rows[i * dim + j];
    for (std::size_t j = 0; j < dim; ++j) rows[i * dim + j] = static_cast<float>(rows[i * dim + j] / std::sqrt(s));
  }
  std::vector<int32_t> labels(n);
  for (std::size_t i = 0; i < n; ++i) labels[i] = static_cast<int32_t>(g.next() % n_classes);
  std::vector<uint16_t> half;
  std::vector<int8_t> q8;
  std::vector<float> scales;
  rar::VectorView v;
  v.n = n;
  v.dim = dim;
  v.storage = storage;
  if (storage == rar::Storage::f32) {
    v.data = rows.data();
  } else if (storage == rar::Storage::f16) {
    half.resize(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) half[i] = to_half(rows[i]);
    v.data = half.data();
  } else {
    q8.resize(rows.size());
    scales.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      float m = 0;
      for (std::size_t j = 0; j < dim; ++j) m = std::fmax(m, std::fabs(rows[i * dim + j]));
      scales[i] = m / 127.0f;
      for (std::size_t j = 0; j < dim; ++j)
        q8[i * dim + j] = static_cast<int8_t>(std::lrint(rows[i * dim + j] / scales[i]));
    }
    v.data = q8.data();
    v.scales = scales.data();
    if (rerank) v.rerank = rows.data();
  }
  std::vector<int32_t> cls(nq * k);
  std::vector<float> sc(nq * k);
  rar::topk_classes(v, labels.data(), n_classes, queries.data(), nq, k, threads, cls.data(), sc.data());
  const char* name = storage == rar::Storage::f32 ? "f32" : storage == rar::Storage::f16 ? "f16" : rerank ? "i8r" : "i8";
  for (std::size_t q = 0; q < nq; ++q) {
    std::printf("%s search %s/%zu %d %zu", fam, name, dim, threads, q);
    for (int j = 0; j < k; ++j) std::printf(" %d", cls[q * k + j]);
    for (int j = 0; j < k; ++j) std::printf(" %.9g", sc[q * k + j]);
    std::printf("\n");
  }
}

void crop_case(const char* fam, int which, int threads) {
  const int h = 97, w = 131;
  Lcg g(42);
  std::vector<uint8_t> img(static_cast<std::size_t>(h) * w * 3);
  for (int y = 0; y < h; ++y)  // a smooth picture with noise: blur and resize both show
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c)
        img[(static_cast<std::size_t>(y) * w + x) * 3 + c] =
            static_cast<uint8_t>((x * 2 + y * (c + 1) + (g.next() & 31)) & 255);
  const double boxes[] = {10, 12, 60, 70, 0.5, 0.25, 130.5, 96.75, 40, 30, 47.5, 33.2, 100, 5, 131, 40};
  rar::CropParams p;
  p.out_size = which == 2 ? 200 : 48;  // 2: enlarging
  p.sigma = which == 1 ? 0.0 : 3.0;
  p.letterbox = which == 3;
  p.adaptive = which == 4;
  p.pad_value = 7;
  const std::size_t nb = 4, per = static_cast<std::size_t>(p.out_size) * p.out_size * 3;
  std::vector<uint8_t> out(nb * per);
  rar::crop_blur(img.data(), h, w, boxes, nb, p, threads, out.data());
  std::printf("%s crop %d %d ", fam, which, threads);
  for (uint8_t b : out) std::printf("%02x", b);
  std::printf("\n");
}

}  // namespace

int main() {
  for (rar::Simd s : rar::compiled_simd()) {
    if (!rar::set_simd(s)) continue;  // compiled but not supported by this CPU
    const char* fam = rar::simd_name(s);
    for (std::size_t dim : {512u, 77u}) {
      for (int threads : {1, 3}) {
        search_case(fam, rar::Storage::f32, false, dim, threads);
        search_case(fam, rar::Storage::f16, false, dim, threads);
        search_case(fam, rar::Storage::i8, false, dim, threads);
        search_case(fam, rar::Storage::i8, true, dim, threads);
      }
    }
    for (int which = 0; which < 5; ++which)
      for (int threads : {1, 2}) crop_case(fam, which, threads);
    for (std::size_t n : {1u, 5u, 33u, 50299u}) {
      Lcg g(n);
      std::vector<float> x(n);
      for (auto& v : x) v = g.uniform() * 20.0f;
      std::printf("%s lse %zu %.17g\n", fam, n, rar::logsumexp(x.data(), n));
    }
    Lcg g(5);
    std::vector<uint8_t> u(3 * 37);
    for (auto& b : u) b = static_cast<uint8_t>(g.next());
    std::vector<float> out(u.size());
    rar::unit_rows(u.data(), 3, 37, 3.0f, out.data());
    for (int r = 0; r < 3; ++r) {
      std::printf("%s unit %d", fam, r);
      for (int j = 0; j < 37; ++j) std::printf(" %.9g", out[r * 37 + j]);
      std::printf("\n");
    }
  }
  return 0;
}
