// The one pybind11 file: argument checks with the GIL held, C++ work with it released.
// Arrays are taken as they are (no forcecast, no silent copies): a wrong dtype is a TypeError, a wrong
// shape or layout a ValueError, each with a hint.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <string>
#include <vector>

#include "cpu.hpp"
#include "crop.hpp"
#include "logits.hpp"
#include "search.hpp"

namespace py = pybind11;

namespace {

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

void require_c_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous (np.ascontiguousarray(" + name +
                          ") makes a copy you can keep)");
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))  // np.frombuffer at an odd offset, say
    throw py::value_error(std::string(name) + " must be aligned to its element size (np.require(" + name +
                          ", requirements='CA') makes an aligned copy)");
}

// Threads beyond the native pool's helpers are started per call: a bound keeps a typo (threads=10**6) from
// spawning a million of them and keeps the per-worker buffers (workers x queries x classes floats) in range.
constexpr int kMaxThreads = 1024;
// Largest k topk_classes takes: its (Q, k) outputs are allocated before the search.
constexpr int kMaxK = 1 << 16;
void check_threads(int threads) {
  if (threads < 1 || threads > kMaxThreads)
    throw py::value_error("threads must be in [1, " + std::to_string(kMaxThreads) + "], got " +
                          std::to_string(threads));
}

template <class T>
bool is_dtype(const py::array& a) {
  return a.dtype().equal(py::dtype::of<T>());
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

using TopK = std::tuple<py::array_t<int32_t>, py::array_t<float>>;

// Allocates the (Q, k) outputs first, then runs `search` on them with the GIL released.
template <class Search>
TopK run_topk(const py::array& queries, int k, Search&& search) {
  const auto nq = static_cast<std::size_t>(queries.shape(0));
  py::array_t<int32_t> out_c({nq, static_cast<std::size_t>(k)});
  py::array_t<float> out_s({nq, static_cast<std::size_t>(k)});
  const auto* q = static_cast<const float*>(queries.data());
  int32_t* oc = out_c.mutable_data();
  float* os = out_s.mutable_data();
  {
    py::gil_scoped_release release;
    search(q, nq, oc, os);
  }
  return {out_c, out_s};
}

std::tuple<py::array_t<int32_t>, py::array_t<float>> topk_classes(py::array vectors, py::array labels, int n_classes,
                                                                  py::array queries, int k,
                                                                  std::optional<py::array> scales,
                                                                  std::optional<py::array> rerank, int threads) {
  rar::VectorView v;
  if (is_dtype<float>(vectors)) {
    v.storage = rar::Storage::f32;
  } else if (vectors.dtype().equal(py::dtype("float16"))) {
    v.storage = rar::Storage::f16;
  } else if (is_dtype<int8_t>(vectors)) {
    v.storage = rar::Storage::i8;
  } else {
    throw py::type_error("vectors must be float32, float16 or int8 (with scales), not " + dtype_str(vectors));
  }
  if (!is_dtype<float>(queries))
    throw py::type_error("queries must be float32, not " + dtype_str(queries) +
                         " (use np.asarray(q, dtype=np.float32))");
  if (!is_dtype<int32_t>(labels)) throw py::type_error("labels must be int32, not " + dtype_str(labels));
  if (vectors.ndim() != 2) throw py::value_error("vectors must be (N, d), got shape " + shape_str(vectors));
  if (queries.ndim() != 2) throw py::value_error("queries must be (Q, d), got shape " + shape_str(queries));
  if (labels.ndim() != 1) throw py::value_error("labels must be (N,), got shape " + shape_str(labels));
  require_c_contiguous(vectors, "vectors");
  require_c_contiguous(queries, "queries");
  require_c_contiguous(labels, "labels");
  v.n = static_cast<std::size_t>(vectors.shape(0));
  v.dim = static_cast<std::size_t>(vectors.shape(1));
  if (static_cast<std::size_t>(labels.shape(0)) != v.n)
    throw py::value_error("labels has " + std::to_string(labels.shape(0)) + " entries for " +
                          std::to_string(v.n) + " vectors");
  if (static_cast<std::size_t>(queries.shape(1)) != v.dim)
    throw py::value_error("query dim " + std::to_string(queries.shape(1)) + " != memory dim " +
                          std::to_string(v.dim));
  if (k < 1) throw py::value_error("k must be >= 1, got " + std::to_string(k));
  // The output is (Q, k): bound k before allocating it (a class search never needs more than this)
  if (k > kMaxK) throw py::value_error("k must be <= " + std::to_string(kMaxK) + ", got " + std::to_string(k));
  if (n_classes < 0) throw py::value_error("n_classes must be >= 0, got " + std::to_string(n_classes));
  check_threads(threads);
  py::array scales_arr;
  if (v.storage == rar::Storage::i8) {
    if (!scales) throw py::type_error("int8 vectors need scales: float32 (N,), one per row");
    scales_arr = *scales;
    if (!is_dtype<float>(scales_arr)) throw py::type_error("scales must be float32, not " + dtype_str(scales_arr));
    if (scales_arr.ndim() != 1 || static_cast<std::size_t>(scales_arr.shape(0)) != v.n)
      throw py::value_error("scales must be (N,) = (" + std::to_string(v.n) + ",), got " + shape_str(scales_arr));
    require_c_contiguous(scales_arr, "scales");
    v.scales = static_cast<const float*>(scales_arr.data());
  } else if (scales) {
    throw py::value_error("scales are only for int8 vectors");
  }
  py::array rerank_arr;
  if (rerank) {
    if (v.storage != rar::Storage::i8) throw py::value_error("rerank vectors are only for int8 vectors");
    rerank_arr = *rerank;
    if (!is_dtype<float>(rerank_arr)) throw py::type_error("rerank must be float32, not " + dtype_str(rerank_arr));
    if (rerank_arr.ndim() != 2 || static_cast<std::size_t>(rerank_arr.shape(0)) != v.n ||
        static_cast<std::size_t>(rerank_arr.shape(1)) != v.dim)
      throw py::value_error("rerank must have the vectors' shape " + shape_str(vectors) + ", got " +
                            shape_str(rerank_arr));
    require_c_contiguous(rerank_arr, "rerank");
    v.rerank = static_cast<const float*>(rerank_arr.data());
  }
  const auto* lab = static_cast<const int32_t*>(labels.data());
  {
    // min/max first (vectorises), then the exact offender for the message
    int32_t lo = 0, hi = 0;
    if (v.n) lo = hi = lab[0];
    for (std::size_t i = 0; i < v.n; ++i) {
      lo = lab[i] < lo ? lab[i] : lo;
      hi = lab[i] > hi ? lab[i] : hi;
    }
    if (v.n && (lo < 0 || hi >= n_classes))
      for (std::size_t i = 0; i < v.n; ++i)
        if (lab[i] < 0 || lab[i] >= n_classes)
          throw py::value_error("label " + std::to_string(lab[i]) + " at row " + std::to_string(i) +
                                " is outside [0, n_classes=" + std::to_string(n_classes) + ")");
  }
  v.data = vectors.data();
  // Scratch is per class: only classes that have rows can be returned, so size it by the largest label
  // present, not by n_classes (which a caller may pass huge).
  int32_t present = 0;
  for (std::size_t i = 0; i < v.n; ++i) present = lab[i] >= present ? lab[i] + 1 : present;
  return run_topk(queries, k, [&](const float* q, std::size_t nq, int32_t* oc, float* os) {
    rar::topk_classes(v, lab, present, q, nq, k, threads, oc, os);
  });
}

void require_float_array(const py::array& a, const char* name, py::ssize_t rows, py::ssize_t cols) {
  if (!is_dtype<float>(a)) throw py::type_error(std::string(name) + " must be float32, not " + dtype_str(a));
  const bool ok = cols < 0 ? (a.ndim() == 1 && a.shape(0) == rows) : (a.ndim() == 2 && a.shape(0) == rows && a.shape(1) == cols);
  if (!ok)
    throw py::value_error(std::string(name) + " must be (" + std::to_string(rows) + (cols < 0 ? ",)" : ", " + std::to_string(cols) + ")") +
                          ", got " + shape_str(a));
  require_c_contiguous(a, name);
}

std::tuple<py::array_t<int32_t>, py::array_t<float>> topk_classes_int4(py::array codes, py::array scales, py::array resid,
                                                                       py::array rerank, py::array labels, int n_classes,
                                                                       py::array queries, int k, double margin_sigmas,
                                                                       int threads) {
  if (!is_dtype<float>(rerank)) throw py::type_error("rerank must be float32, not " + dtype_str(rerank));
  if (rerank.ndim() != 2) throw py::value_error("rerank must be (N, d), got shape " + shape_str(rerank));
  const py::ssize_t n = rerank.shape(0), dim = rerank.shape(1);
  require_c_contiguous(rerank, "rerank");
  if (!is_dtype<uint8_t>(codes)) throw py::type_error("codes must be uint8, not " + dtype_str(codes));
  if (codes.ndim() != 2 || codes.shape(0) != n || codes.shape(1) != (dim + 31) / 32 * 16)
    throw py::value_error("codes must be (N, ceil(d / 32) * 16) = (" + std::to_string(n) + ", " +
                          std::to_string((dim + 31) / 32 * 16) + "), got " + shape_str(codes));
  require_c_contiguous(codes, "codes");
  require_float_array(scales, "scales", n, -1);
  require_float_array(resid, "resid", n, -1);
  if (!is_dtype<float>(queries))
    throw py::type_error("queries must be float32, not " + dtype_str(queries) + " (use np.asarray(q, dtype=np.float32))");
  if (queries.ndim() != 2 || queries.shape(1) != dim)
    throw py::value_error("queries must be (Q, " + std::to_string(dim) + "), got " + shape_str(queries));
  require_c_contiguous(queries, "queries");
  if (!is_dtype<int32_t>(labels)) throw py::type_error("labels must be int32, not " + dtype_str(labels));
  if (labels.ndim() != 1 || labels.shape(0) != n)
    throw py::value_error("labels must be (" + std::to_string(n) + ",), got " + shape_str(labels));
  require_c_contiguous(labels, "labels");
  if (k < 1 || k > kMaxK) throw py::value_error("k must be in [1, " + std::to_string(kMaxK) + "], got " + std::to_string(k));
  if (n_classes < 0) throw py::value_error("n_classes must be >= 0, got " + std::to_string(n_classes));
  if (!(margin_sigmas >= 0.0 && margin_sigmas <= 1e6))
    throw py::value_error("margin_sigmas must be in [0, 1e6], got " + std::to_string(margin_sigmas));
  check_threads(threads);
  const auto* lab = static_cast<const int32_t*>(labels.data());
  int32_t present = 0;
  for (py::ssize_t i = 0; i < n; ++i) {
    if (lab[i] < 0 || lab[i] >= n_classes)
      throw py::value_error("label " + std::to_string(lab[i]) + " at row " + std::to_string(i) +
                            " is outside [0, n_classes=" + std::to_string(n_classes) + ")");
    present = lab[i] >= present ? lab[i] + 1 : present;
  }
  rar::Int4View v;
  v.codes = static_cast<const uint8_t*>(codes.data());
  v.scales = static_cast<const float*>(scales.data());
  v.resid = static_cast<const float*>(resid.data());
  v.rerank = static_cast<const float*>(rerank.data());
  v.n = static_cast<std::size_t>(n);
  v.dim = static_cast<std::size_t>(dim);
  return run_topk(queries, k, [&](const float* q, std::size_t nq, int32_t* oc, float* os) {
    rar::topk_classes_int4(v, lab, present, q, nq, k, static_cast<float>(margin_sigmas), threads, oc, os);
  });
}

template <class T>
std::tuple<py::array_t<float>, bool> unit_rows_as(const py::array& x, float zero_point) {
  const auto n = static_cast<std::size_t>(x.shape(0)), d = static_cast<std::size_t>(x.shape(1));
  py::array_t<float> out({x.shape(0), x.shape(1)});
  const T* src = static_cast<const T*>(x.data());
  float* dst = out.mutable_data();
  bool finite;
  {
    py::gil_scoped_release release;
    finite = rar::unit_rows(src, n, d, zero_point, dst);
  }
  return {out, finite};
}

std::tuple<py::array_t<float>, bool> unit_rows(py::array x, double zero_point) {
  if (x.ndim() != 2) throw py::value_error("x must be (N, d), got shape " + shape_str(x));
  require_c_contiguous(x, "x");
  if (!std::isfinite(zero_point)) throw py::value_error("zero_point must be finite");
  const auto zp = static_cast<float>(zero_point);
  if (is_dtype<float>(x)) return unit_rows_as<float>(x, zp);
  if (is_dtype<uint8_t>(x)) return unit_rows_as<uint8_t>(x, zp);
  if (is_dtype<int8_t>(x)) return unit_rows_as<int8_t>(x, zp);
  throw py::type_error("x must be float32, uint8 or int8, not " + dtype_str(x));
}

double logsumexp(py::array x) {
  if (!is_dtype<float>(x)) throw py::type_error("x must be float32, not " + dtype_str(x));
  if (x.ndim() != 1 || x.shape(0) < 1) throw py::value_error("x must be a non-empty 1-D row, got shape " + shape_str(x));
  require_c_contiguous(x, "x");
  const float* p = static_cast<const float*>(x.data());
  const auto n = static_cast<std::size_t>(x.shape(0));
  py::gil_scoped_release release;
  return rar::logsumexp(p, n);
}

py::array_t<uint8_t> crop_blur(py::array image, py::array boxes, int out_size, double crop_scale, bool adaptive, double sigma,
                    bool letterbox, int pad_value, int threads) {
  if (!is_dtype<uint8_t>(image)) throw py::type_error("image must be uint8, not " + dtype_str(image));
  if (image.ndim() != 3 || image.shape(2) != 3)
    throw py::value_error("image must be (H, W, 3) RGB, got shape " + shape_str(image));
  require_c_contiguous(image, "image");
  if (image.shape(0) < 1 || image.shape(1) < 1) throw py::value_error("image is empty: shape " + shape_str(image));
  if (image.shape(0) > (1 << 30) || image.shape(1) > (1 << 30) / 3)
    throw py::value_error("image too large: shape " + shape_str(image));
  if (!is_dtype<double>(boxes)) throw py::type_error("boxes must be float64, not " + dtype_str(boxes));
  if (boxes.ndim() != 2 || boxes.shape(1) != 4)
    throw py::value_error("boxes must be (N, 4) x1, y1, x2, y2, got shape " + shape_str(boxes));
  require_c_contiguous(boxes, "boxes");
  if (out_size < 1 || out_size > rar::kMaxOutSize)
    throw py::value_error("out_size must be in [1, " + std::to_string(rar::kMaxOutSize) + "], got " +
                          std::to_string(out_size));
  if (!adaptive && !(crop_scale >= 1.0 && crop_scale <= rar::kMaxCropScale))
    throw py::value_error("crop_scale must be in [1, " + std::to_string(rar::kMaxCropScale) + "]");
  if (!(sigma >= 0.0 && sigma <= rar::kMaxSigma))
    throw py::value_error("sigma must be in [0, " + std::to_string(rar::kMaxSigma) + "] pixels");
  if (pad_value < 0 || pad_value > 255) throw py::value_error("pad_value must be in [0, 255]");
  check_threads(threads);
  const int h = static_cast<int>(image.shape(0)), w = static_cast<int>(image.shape(1));
  const auto n = static_cast<std::size_t>(boxes.shape(0));
  const auto* b = static_cast<const double*>(boxes.data());
  std::string reason;
  for (std::size_t i = 0; i < n; ++i)
    if (!rar::check_box(b + 4 * i, h, w, &reason)) throw py::value_error("box " + std::to_string(i) + " " + reason);
  rar::CropParams p;
  p.out_size = out_size;
  p.crop_scale = crop_scale;
  p.adaptive = adaptive;
  p.sigma = sigma;
  p.letterbox = letterbox;
  p.pad_value = static_cast<uint8_t>(pad_value);
  const auto s = static_cast<std::size_t>(out_size);
  py::array_t<uint8_t> out({n, s, s, std::size_t{3}});
  const auto* img = static_cast<const uint8_t*>(image.data());
  uint8_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    rar::crop_blur(img, h, w, b, n, p, threads, o);
  }
  return out;
}

py::dict build_info() {
  py::dict d;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
#if defined(__x86_64__)
  d["arch"] = "x86_64";
#elif defined(__aarch64__)
  d["arch"] = "aarch64";
#else
  d["arch"] = "other";
#endif
  std::vector<std::string> compiled;
  for (rar::Simd s : rar::compiled_simd()) compiled.emplace_back(rar::simd_name(s));
  d["compiled"] = compiled;
  d["simd"] = rar::cpu_feature_names();
  d["selected"] = rar::simd_name(rar::selected_simd());
  d["best"] = rar::simd_name(rar::best_simd());
  d["storages"] = std::vector<std::string>{"float32", "float16", "int8"};
  return d;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "rar_edge native core (private; use rar_edge.index.lookup / rar_edge.image.boxes)";
  m.def("topk_classes", &topk_classes, py::arg("vectors"), py::arg("labels"), py::arg("n_classes"),
        py::arg("queries"), py::arg("k"), py::kw_only(), py::arg("scales") = std::nullopt,
        py::arg("rerank") = std::nullopt, py::arg("threads") = 1,
        "Exact top-k distinct classes per query.\n\n"
        "vectors: (N, d) float32, float16 or int8 (then scales (N,) float32: row i = scales[i] * vectors[i],\n"
        "and optionally rerank (N, d) float32: the rows whose int8 score could reach the top k are rescored\n"
        "in float32, giving the float32 result);\n"
        "labels: (N,) int32 in [0, n_classes); queries: (Q, d) float32. Returns (classes int32 (Q, k),\n"
        "scores float32 (Q, k)); class score = best inner product among its rows; -1 / -inf pad.");
  m.def("topk_classes_int4", &topk_classes_int4, py::arg("codes"), py::arg("scales"), py::arg("resid"),
        py::arg("rerank"), py::arg("labels"), py::arg("n_classes"), py::arg("queries"), py::arg("k"), py::kw_only(),
        py::arg("margin_sigmas") = 6.0, py::arg("threads") = 1,
        "Top-k distinct classes from a 4-bit first pass and float32 rescoring (no recall guarantee).\n\n"
        "codes: (N, ceil(d / 32) * 16) uint8 as rar_edge.index.lookup.quantize_int4 packs them; scales, resid:\n"
        "(N,) float32; rerank: (N, d) float32 rows; labels (N,) int32 in [0, n_classes); queries (Q, d) float32.\n"
        "Rows whose 4-bit score is within margin_sigmas standard deviations of the error (were the residual's\n"
        "direction random) of the k-th class are rescored. Queries are split over threads.");
  m.def("crop_blur", &crop_blur, py::arg("image"), py::arg("boxes"), py::kw_only(), py::arg("out_size"),
        py::arg("crop_scale") = 1.0, py::arg("adaptive") = false, py::arg("sigma") = 0.0, py::arg("letterbox") = false,
        py::arg("pad_value") = 0, py::arg("threads") = 1,
        "Crop (enlarged), blur around and resize every box of one image: (N, S, S, 3) uint8.\n\n"
        "image: (H, W, 3) uint8 C-contiguous; boxes: (N, 4) float64 x1, y1, x2, y2 in pixels.");
  m.def("unit_rows", &unit_rows, py::arg("x"), py::arg("zero_point") = 0.0,
        "Rows minus zero_point, scaled to unit L2 length (zero rows stay zero): ((N, d) float32, all_finite).\n\n"
        "x: (N, d) float32, uint8 or int8, C-contiguous. A row holding NaN or inf comes back all NaN, and "
        "all_finite is then False.");
  m.def("logsumexp", &logsumexp, py::arg("x"),
        "log(sum(exp(x))) of a float32 row (a vocabulary's logits), as max + log(sum(exp(x - max))) with a "
        "vectorised exp; NaN anywhere gives NaN.");
  m.def("build_info", &build_info, "What was compiled and which kernel family the CPU dispatch picked.");
  m.def(
      "_set_simd",
      [](const std::string& name) {
        rar::Simd s;
        if (!rar::simd_from_name(name, &s) || !rar::set_simd(s))
          throw py::value_error("kernel family '" + name + "' is not available on this build/CPU");
        return std::string(rar::simd_name(rar::selected_simd()));
      },
      py::arg("name"), "Testing hook: force a kernel family ('scalar', 'avx2', 'avx512', 'neon', 'neon_dot').");
  m.attr("ADAPTIVE_TARGET_AREA") = rar::kAdaptiveTargetArea;
  m.attr("ADAPTIVE_MIN_SCALE") = rar::kAdaptiveMinScale;
  m.attr("ADAPTIVE_MAX_SCALE") = rar::kAdaptiveMaxScale;
  m.attr("MAX_SIGMA") = rar::kMaxSigma;
  m.attr("MAX_OUT_SIZE") = rar::kMaxOutSize;
  m.attr("MAX_CROP_SCALE") = rar::kMaxCropScale;
}
