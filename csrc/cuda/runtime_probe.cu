// The CUDA runtime probe (see ../cuda_runtime_probe.h).
#include <cuda_runtime.h>

#include <string>

#include "../cuda_runtime_probe.h"

namespace vdm_fast {

const CudaProbe& cuda_probe() {
  static const CudaProbe probe = [] {
    CudaProbe p{0, 0, 0, 0};
    cudaRuntimeGetVersion(&p.runtime_version);
    if (cudaDriverGetVersion(&p.driver_version) != cudaSuccess) p.driver_version = 0;
    // A runtime of major version M runs on any driver that supports M.0 (minor-version compatibility).
    if (p.driver_version > 0 && p.driver_version >= p.runtime_version / 1000 * 1000) {
      const cudaError_t e = cudaGetDeviceCount(&p.device_count);
      if (e != cudaSuccess) {
        p.error = static_cast<int>(e);
        p.device_count = 0;
        cudaGetLastError();  // the failed count leaves its error pending: clear it, it is reported through the probe
      }
    }
    return p;
  }();
  return probe;
}

namespace {

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// The oldest driver branch of each CUDA major version (NVIDIA's CUDA compatibility tables).
std::string driver_branch(int major) {
  switch (major) {
    case 13: return " (driver R580 or newer)";
    case 12: return " (driver R525 or newer)";
    case 11: return " (driver R450 or newer)";
    default: return "";
  }
}

}  // namespace

std::string cuda_unavailable_reason(const CudaProbe& p) {
  const int major = p.runtime_version / 1000;
  if (p.driver_version <= 0)
    return "no CUDA driver found (cudaDriverGetVersion reports none: libcuda.so is not installed or cannot load)";
  if (p.driver_version < major * 1000)
    return "the CUDA driver supports CUDA " + version_string(p.driver_version) + ", but vdm_fast._C links the CUDA " +
           version_string(p.runtime_version) + " runtime statically, which needs a driver for CUDA " +
           std::to_string(major) + ".0 or newer" + driver_branch(major) +
           ": update the driver, or rebuild with an older CUDA toolkit (or VDM_FAST_BUILD_CUDA=0)";
  if (p.error != 0) return std::string("cudaGetDeviceCount failed: ") + cuda_error_string(p.error);
  if (p.device_count <= 0) return "no CUDA device is visible (CUDA_VISIBLE_DEVICES?)";
  return "";
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int take_pending_cuda_error() { return static_cast<int>(cudaGetLastError()); }

}  // namespace vdm_fast
