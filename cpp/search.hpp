#pragma once
// Exact top-k distinct classes over a memory of vectors (no Python headers here).
#include <cstddef>
#include <cstdint>

namespace rar {

enum class Storage { f32, f16, i8 };

// The memory as the search reads it: n rows of dim elements, C-contiguous.
//   f32: float rows.  f16: IEEE binary16 rows (as uint16_t).  i8: int8 rows, row i = scales[i] * q[i].
struct VectorView {
  const void* data = nullptr;
  Storage storage = Storage::f32;
  const float* scales = nullptr;  // i8 only: one per row
  const float* rerank = nullptr;  // i8 only, optional: the same rows in float32, to rescore the candidates
  std::size_t n = 0;
  std::size_t dim = 0;
};

// For every query the class score is the best inner product among the class's entries; the k best
// classes go out in descending score order, ties to the lower class id. Classes with no entry (or no
// finite score) are skipped; slots past them get class -1 and score -inf.
// int8 rows are scored against the query quantised to int16; with `rerank` set, every row whose int8
// score could reach the top k (a rigorous bound on the rounding) is rescored in float32, so the result is
// the float32 search's. Labels must lie in [0, n_classes) (the caller checks). threads >= 1 splits queries (batches) or the
// rows (a single query) over worker threads.
void topk_classes(const VectorView& vectors, const int32_t* labels, int32_t n_classes, const float* queries,
                  std::size_t n_queries, int k, int threads, int32_t* out_classes, float* out_scores);

// 4-bit rows for an opt-in first pass without int8_rerank's guarantee (docs/design-notes.md#lowbit-bound).
// Row i ~= scales[i] * c (c in [-8, 7]); codes hold c + 8, per 32-dimension block 16 bytes: byte j of the
// block carries dimension j in its low nibble and dimension j + 16 in its high one (dimensions past dim
// hold code 8, i.e. 0). resid[i] >= ||row i - scales[i] * c||_2.
struct Int4View {
  const uint8_t* codes = nullptr;  // n x (ceil(dim / 32) * 16)
  const float* scales = nullptr;   // n
  const float* resid = nullptr;    // n
  const float* rerank = nullptr;   // n x dim float32: the candidates are rescored from these
  std::size_t n = 0;
  std::size_t dim = 0;
};

// As topk_classes, scanning the 4-bit codes first: every row whose 4-bit score plus the margin
// margin_sigmas * ||q||_2 * resid[i] / sqrt(dim) (plus the query rounding, bounded exactly) could reach the
// k-th class's score minus the largest such margin is rescored in float32. The scores returned are float32
// scores; a row whose 4-bit error exceeds its margin can be missed (the margin is a number of standard
// deviations of the error were the residual's direction random, not a bound). Queries are split over the
// threads; a single query runs on one.
void topk_classes_int4(const Int4View& vectors, const int32_t* labels, int32_t n_classes, const float* queries,
                       std::size_t n_queries, int k, float margin_sigmas, int threads, int32_t* out_classes,
                       float* out_scores);

// Rows (n x dim, C-contiguous) minus zero_point, scaled to unit L2 length, into out (float32, n x dim);
// the norm is summed in double. Rows of zeros stay zero; rows holding a NaN or inf become all NaN, and
// the return value is then false. T: uint8_t, int8_t or float.
template <class T>
bool unit_rows(const T* x, std::size_t n, std::size_t dim, float zero_point, float* out);

// Exact binary16 -> float (software; used where F16C is absent).
float half_to_float(uint16_t h);

}  // namespace rar
