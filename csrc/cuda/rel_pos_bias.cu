// CUDA implementation of the relative position bias op (see ../rel_pos_bias.h for the contract).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../cuda_runtime_probe.h"
#include "../rel_pos_bias.h"

namespace vdm_fast {
namespace {

constexpr int kThreads = 256;

// One thread per output element; the element's bits are copied, whatever the float format.
template <typename Word>
__global__ void forward_kernel(RelPosBiasProblem p, const Word* __restrict__ table, int64_t sk, int64_t sh,
                               Word* __restrict__ out) {
  const int64_t T = p.frames, H = p.heads, total = p.batch * H * T * T;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = e % T, i = (e / T) % T, h = (e / (T * T)) % H, b = e / (H * T * T);
    out[e] = table[rel_pos_bucket(p, b, i, j) * sk + h * sh];
  }
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// One block per (bucket, head): each thread sums the matching entries of its fixed slice of (b, i, j), then a
// fixed-shape tree in shared memory adds the partial sums. No atomics: bitwise reproducible.
template <typename T_in>
__global__ void backward_kernel(RelPosBiasProblem p, const T_in* __restrict__ grad, int64_t g0, int64_t g1,
                                int64_t g2, int64_t g3, float* __restrict__ grad_table) {
  const int64_t k = blockIdx.x, h = blockIdx.y, T = p.frames, n = p.batch * T * T;
  float acc = 0.f;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    const int64_t j = e % T, i = (e / T) % T, b = e / (T * T);
    if (rel_pos_bucket(p, b, i, j) == k) acc += to_float(grad[b * g0 + h * g1 + i * g2 + j * g3]);
  }
  __shared__ float partial[kThreads];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_table[k * p.heads + h] = partial[0];
}

}  // namespace

int rel_pos_bias_forward_cuda(const RelPosBiasProblem& p, const void* table, int64_t sk, int64_t sh, DType dtype,
                              void* out, uintptr_t stream) {
  const int64_t total = p.batch * p.heads * p.frames * p.frames;
  if (total == 0) return 0;
  const int64_t want = (total + kThreads - 1) / kThreads;
  const unsigned blocks = (unsigned)(want < 65535 * 8 ? want : 65535 * 8);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (const int pending = take_pending_cuda_error()) return -pending;
  if (dtype == DType::kFloat32)
    forward_kernel<<<blocks, kThreads, 0, s>>>(p, static_cast<const uint32_t*>(table), sk, sh,
                                                 static_cast<uint32_t*>(out));
  else
    forward_kernel<<<blocks, kThreads, 0, s>>>(p, static_cast<const uint16_t*>(table), sk, sh,
                                                 static_cast<uint16_t*>(out));
  return (int)cudaGetLastError();
}

int rel_pos_bias_backward_cuda(const RelPosBiasProblem& p, const void* grad, const int64_t gs[4], DType dtype,
                               float* grad_table, uintptr_t stream) {
  if (p.num_buckets == 0 || p.heads == 0) return 0;
  const dim3 grid((unsigned)p.num_buckets, (unsigned)p.heads);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (const int pending = take_pending_cuda_error()) return -pending;
  switch (dtype) {
    case DType::kFloat32:
      backward_kernel<<<grid, kThreads, 0, s>>>(p, static_cast<const float*>(grad), gs[0], gs[1], gs[2], gs[3],
                                                 grad_table);
      break;
    case DType::kFloat16:
      backward_kernel<<<grid, kThreads, 0, s>>>(p, static_cast<const __half*>(grad), gs[0], gs[1], gs[2], gs[3],
                                                 grad_table);
      break;
    default:
      backward_kernel<<<grid, kThreads, 0, s>>>(p, static_cast<const __nv_bfloat16*>(grad), gs[0], gs[1], gs[2],
                                                 gs[3], grad_table);
  }
  return (int)cudaGetLastError();
}

int cuda_runtime_version() { return cuda_probe().runtime_version; }

}  // namespace vdm_fast
