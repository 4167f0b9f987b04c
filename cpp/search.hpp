#pragma once
#include <cstdint>
#include <cstddef>

namespace rar {

// Exact top-k distinct classes: for every query, the class score is the best inner product among
// the class's entries; the k best classes are written in descending score order. Slots past the
// number of classes present get class -1 and score -inf.
void topk_classes_f32(const float* vectors, const int32_t* labels, std::size_t n, std::size_t dim,
                      int32_t n_classes, const float* queries, std::size_t n_queries, int k,
                      int32_t* out_classes, float* out_scores);

}  // namespace rar
