#include "search.hpp"

#include <algorithm>
#include <limits>
#include <vector>

namespace rar {

void topk_classes_f32(const float* vectors, const int32_t* labels, std::size_t n, std::size_t dim,
                      int32_t n_classes, const float* queries, std::size_t n_queries, int k,
                      int32_t* out_classes, float* out_scores) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> best(static_cast<std::size_t>(n_classes));
  std::vector<int32_t> order(static_cast<std::size_t>(n_classes));
  for (std::size_t q = 0; q < n_queries; ++q) {
    const float* qv = queries + q * dim;
    std::fill(best.begin(), best.end(), neg_inf);
    for (std::size_t i = 0; i < n; ++i) {
      const float* v = vectors + i * dim;
      float s = 0.f;
      for (std::size_t j = 0; j < dim; ++j) s += v[j] * qv[j];
      float& b = best[static_cast<std::size_t>(labels[i])];
      if (s > b) b = s;
    }
    int32_t m = 0;
    for (int32_t c = 0; c < n_classes; ++c)
      if (best[c] != neg_inf) order[m++] = c;
    const int32_t kk = std::min<int32_t>(k, m);
    std::partial_sort(order.begin(), order.begin() + kk, order.begin() + m, [&](int32_t a, int32_t b) {
      return best[a] > best[b] || (best[a] == best[b] && a < b);
    });
    for (int j = 0; j < k; ++j) {
      out_classes[q * k + j] = j < kk ? order[j] : -1;
      out_scores[q * k + j] = j < kk ? best[order[j]] : neg_inf;
    }
  }
}

}  // namespace rar
