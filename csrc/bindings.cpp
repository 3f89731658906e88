// The vdm_fast._C module: one pybind11 registration per op, CPU and CUDA entry points side by side.
// No libtorch: tensors arrive as data pointers, sizes and element strides; Python checks them first
// (vdm_fast/ops/*.py), so the checks here only guard against what would crash.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_runtime_probe.h"
#include "rel_pos_bias.h"

namespace py = pybind11;
using vdm_fast::DType;
using vdm_fast::RelPosBiasProblem;

namespace {

#ifndef VDM_FAST_CUDA_ARCHS
#define VDM_FAST_CUDA_ARCHS ""
#endif

void* as_ptr(uintptr_t p, const char* name) {
  if (p == 0) throw std::invalid_argument(std::string(name) + " is a null pointer");
  return reinterpret_cast<void*>(p);
}

DType as_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  return static_cast<DType>(code);
}

RelPosBiasProblem make_problem(int64_t batch, int64_t frames, int64_t heads, int64_t num_buckets,
                               uintptr_t positions, int64_t pos_stride_b, int64_t pos_stride_t, uintptr_t lut,
                               int64_t max_distance) {
  if (batch < 0 || frames < 0 || heads < 0 || num_buckets <= 0 || max_distance <= 0)
    throw std::invalid_argument("rel_pos_bias: sizes must be non-negative, num_buckets and max_distance positive");
  return RelPosBiasProblem{batch, frames, heads, num_buckets,
                           static_cast<const int64_t*>(as_ptr(positions, "positions")), pos_stride_b, pos_stride_t,
                           static_cast<const int32_t*>(as_ptr(lut, "lut")), max_distance};
}

#ifdef VDM_FAST_WITH_CUDA
// Before any CUDA call of an op: where the driver is missing or too old, say so instead of a runtime error code.
void require_cuda(const char* what) {
  const std::string reason = vdm_fast::cuda_unavailable_reason(vdm_fast::cuda_probe());
  if (!reason.empty()) throw std::runtime_error(std::string(what) + ": CUDA code cannot run here: " + reason);
}

// After a launch: a negative code is an error an earlier CUDA call had left pending (not this op's).
void check_cuda(int code, const char* what) {
  if (code < 0)
    throw std::runtime_error(std::string(what) + ": a CUDA error was already pending before the launch, left by an "
                             "earlier CUDA call (not by this op; the launch did not run): " +
                             vdm_fast::cuda_error_string(-code));
  if (code != 0) throw std::runtime_error(std::string(what) + ": launch failed: " + vdm_fast::cuda_error_string(code));
}

py::dict probe_dict(const vdm_fast::CudaProbe& p) {
  py::dict d;
  d["runtime_version"] = p.runtime_version;
  d["driver_version"] = p.driver_version;
  d["device_count"] = p.device_count;
  d["error"] = p.error;
  d["reason"] = vdm_fast::cuda_unavailable_reason(p);
  return d;
}
#endif

void forward(const std::string& device, uintptr_t table, int64_t table_stride_k, int64_t table_stride_h, int dtype,
             int64_t num_buckets, int64_t heads, uintptr_t positions, int64_t pos_stride_b, int64_t pos_stride_t,
             int64_t batch, int64_t frames, uintptr_t lut, int64_t max_distance, uintptr_t out, uintptr_t stream) {
  const auto p = make_problem(batch, frames, heads, num_buckets, positions, pos_stride_b, pos_stride_t, lut,
                              max_distance);
  const void* t = as_ptr(table, "table");
  void* o = as_ptr(out, "out");
  py::gil_scoped_release nogil;
  if (device == "cpu") {
    vdm_fast::rel_pos_bias_forward_cpu(p, t, table_stride_k, table_stride_h, as_dtype(dtype), o);
  } else if (device == "cuda") {
#ifdef VDM_FAST_WITH_CUDA
    require_cuda("rel_pos_bias forward");
    check_cuda(vdm_fast::rel_pos_bias_forward_cuda(p, t, table_stride_k, table_stride_h, as_dtype(dtype), o, stream),
               "rel_pos_bias forward");
#else
    throw std::runtime_error("vdm_fast._C was built without CUDA");
#endif
  } else {
    throw std::invalid_argument("device must be 'cpu' or 'cuda'");
  }
}

void backward(const std::string& device, uintptr_t grad, std::vector<int64_t> grad_strides, int dtype,
              int64_t num_buckets, int64_t heads, uintptr_t positions, int64_t pos_stride_b, int64_t pos_stride_t,
              int64_t batch, int64_t frames, uintptr_t lut, int64_t max_distance, uintptr_t grad_table,
              uintptr_t stream) {
  if (grad_strides.size() != 4) throw std::invalid_argument("grad_strides must have 4 entries");
  const auto p = make_problem(batch, frames, heads, num_buckets, positions, pos_stride_b, pos_stride_t, lut,
                              max_distance);
  const void* g = as_ptr(grad, "grad");
  float* gt = static_cast<float*>(as_ptr(grad_table, "grad_table"));
  py::gil_scoped_release nogil;
  if (device == "cpu") {
    vdm_fast::rel_pos_bias_backward_cpu(p, g, grad_strides.data(), as_dtype(dtype), gt);
  } else if (device == "cuda") {
#ifdef VDM_FAST_WITH_CUDA
    require_cuda("rel_pos_bias backward");
    check_cuda(vdm_fast::rel_pos_bias_backward_cuda(p, g, grad_strides.data(), as_dtype(dtype), gt, stream),
               "rel_pos_bias backward");
#else
    throw std::runtime_error("vdm_fast._C was built without CUDA");
#endif
  } else {
    throw std::invalid_argument("device must be 'cpu' or 'cuda'");
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vdm_fast compiled ops (CPU always; CUDA when built with nvcc). No libtorch inside.";
#ifdef VDM_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_runtime_version", &vdm_fast::cuda_runtime_version, "CUDA runtime version linked in (e.g. 13000)");
  m.def("cuda_probe", [] { return probe_dict(vdm_fast::cuda_probe()); },
        "The driver probe, once per process: runtime_version, driver_version (0: no driver), device_count, error, "
        "reason ('' when CUDA code can run)");
  m.def("explain_cuda_probe",
        [](int runtime_version, int driver_version, int device_count, int error) {
          return probe_dict(vdm_fast::CudaProbe{runtime_version, driver_version, device_count, error});
        },
        py::arg("runtime_version"), py::arg("driver_version"), py::arg("device_count") = 1, py::arg("error") = 0,
        "cuda_probe's result for made-up values (tests: an old driver, no device)");
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = std::string(VDM_FAST_CUDA_ARCHS);

  m.def("rel_pos_bias_forward", &forward, py::arg("device"), py::arg("table"), py::arg("table_stride_k"),
        py::arg("table_stride_h"), py::arg("dtype"), py::arg("num_buckets"), py::arg("heads"), py::arg("positions"),
        py::arg("pos_stride_b"), py::arg("pos_stride_t"), py::arg("batch"), py::arg("frames"), py::arg("lut"),
        py::arg("max_distance"), py::arg("out"), py::arg("stream") = 0);
  m.def("rel_pos_bias_backward", &backward, py::arg("device"), py::arg("grad"), py::arg("grad_strides"),
        py::arg("dtype"), py::arg("num_buckets"), py::arg("heads"), py::arg("positions"), py::arg("pos_stride_b"),
        py::arg("pos_stride_t"), py::arg("batch"), py::arg("frames"), py::arg("lut"), py::arg("max_distance"),
        py::arg("grad_table"), py::arg("stream") = 0);
}
