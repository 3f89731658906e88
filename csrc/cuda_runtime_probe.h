// What the CUDA side of vdm_fast._C can do on this machine, asked once of the statically linked CUDA runtime.
//
// The runtime is linked statically (the module imports with no driver), so the driver is the only thing that can be
// missing or too old: a CUDA 13 runtime needs a driver that supports CUDA 13.0 (R580 or newer). The probe asks
// cudaDriverGetVersion (0 without a loadable driver) before any call that would initialize the runtime, and counts
// devices only when the driver is new enough. Python (vdm_fast/_ext.py) turns the result into the reason CUDA code
// cannot run, and `vdm-fast info` prints it.
#pragma once
#include <string>

#ifdef VDM_FAST_WITH_CUDA
namespace vdm_fast {

struct CudaProbe {
  int runtime_version;  // CUDA runtime linked in, e.g. 13000
  int driver_version;   // the newest CUDA version the installed driver supports, 0 without a driver
  int device_count;     // devices visible (0 when not asked: driver missing or too old)
  int error;            // cudaError_t of the device count (0 = success)
};

// Probed on first use, then cached for the life of the process (the driver cannot change under it).
const CudaProbe& cuda_probe();
// Why CUDA code cannot run with this probe result, in words a user can act on; "" when it can. Pure: the tests
// call it with made-up results (an old driver, no device) on machines without a GPU.
std::string cuda_unavailable_reason(const CudaProbe& p);
const char* cuda_error_string(int code);

// Reads and clears an error that an earlier CUDA call left pending (PyTorch's own kernels, another library), so
// that the error checked after a launch is the launch's own. Returns 0 or the pending cudaError_t.
int take_pending_cuda_error();

}  // namespace vdm_fast
#endif
