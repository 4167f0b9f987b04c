// The one pybind11 file: argument checks with the GIL held, C++ work with it released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "search.hpp"

namespace py = pybind11;

namespace {

py::tuple topk_classes(py::array vectors, py::array labels, int n_classes, py::array queries, int k) {
  if (!py::isinstance<py::array_t<float>>(vectors) || !py::isinstance<py::array_t<float>>(queries))
    throw py::type_error("vectors and queries must be float32 arrays (use np.asarray(x, dtype=np.float32))");
  if (!py::isinstance<py::array_t<int32_t>>(labels))
    throw py::type_error("labels must be an int32 array");
  if (!(vectors.flags() & py::array::c_style) || !(queries.flags() & py::array::c_style) ||
      !(labels.flags() & py::array::c_style))
    throw py::value_error("arrays must be C-contiguous (use np.ascontiguousarray)");
  if (vectors.ndim() != 2 || queries.ndim() != 2 || labels.ndim() != 1)
    throw py::value_error("expected vectors (N, d), labels (N,), queries (Q, d)");
  const auto n = static_cast<std::size_t>(vectors.shape(0));
  const auto dim = static_cast<std::size_t>(vectors.shape(1));
  if (static_cast<std::size_t>(labels.shape(0)) != n) throw py::value_error("labels must have one entry per vector");
  if (static_cast<std::size_t>(queries.shape(1)) != dim)
    throw py::value_error("query dim " + std::to_string(queries.shape(1)) + " != memory dim " + std::to_string(dim));
  if (k < 1) throw py::value_error("k must be >= 1");
  if (n_classes < 0) throw py::value_error("n_classes must be >= 0");
  auto lab = labels.unchecked<int32_t, 1>();
  for (std::size_t i = 0; i < n; ++i)
    if (lab(i) < 0 || lab(i) >= n_classes) throw py::value_error("label out of range [0, n_classes)");
  const auto nq = static_cast<std::size_t>(queries.shape(0));
  py::array_t<int32_t> out_c({nq, static_cast<std::size_t>(k)});
  py::array_t<float> out_s({nq, static_cast<std::size_t>(k)});
  const float* v = static_cast<const float*>(vectors.data());
  const float* q = static_cast<const float*>(queries.data());
  const int32_t* l = static_cast<const int32_t*>(labels.data());
  int32_t* oc = out_c.mutable_data();
  float* os = out_s.mutable_data();
  {
    py::gil_scoped_release release;
    rar::topk_classes_f32(v, l, n, dim, n_classes, q, nq, k, oc, os);
  }
  return py::make_tuple(out_c, out_s);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "rar_edge native core (private; use rar_edge.memory / rar_edge.preprocess)";
  m.def("topk_classes", &topk_classes, py::arg("vectors"), py::arg("labels"), py::arg("n_classes"),
        py::arg("queries"), py::arg("k"));
  m.def("build_info", []() {
    py::dict d;
    d["compiler"] = __VERSION__;
    return d;
  });
}
