#pragma once
// Language-model logits: the log of the softmax denominator of one vocabulary row, for the ranker's
// score mode (one row per candidate token; 50k-150k floats each).
#include <cstddef>

namespace rar {

// log(sum_i exp(x[i])) computed as max + log(sum exp(x - max)), in one pass for the maximum and one for
// the sum (a vectorised exp, accurate to a few float ulps; the sum is kept in double per block).
// n must be >= 1. NaN anywhere gives NaN; a +inf maximum gives +inf; an all -inf row gives -inf.
double logsumexp(const float* x, std::size_t n);

}  // namespace rar
