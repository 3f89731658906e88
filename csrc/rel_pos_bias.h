// Relative position bias (T5 buckets) for temporal attention: shared declarations of the CPU and CUDA code.
//
// The extension links no libtorch. Tensors cross the boundary as raw pointers, sizes and strides (in elements);
// the Python side (vdm_fast/ops/rel_pos_bias.py) validates arguments, allocates outputs and passes the stream.
//
// Buckets come from a lookup table `lut` of 2 * max_distance + 1 int32 entries, lut[d + max_distance] = bucket(d),
// computed by the reference bucket function in Python. Past |d| = max_distance a T5 bucket no longer changes, so
// bucket(d) = lut[clamp(d, -max_distance, max_distance) + max_distance] exactly, with no float log in the kernels
// whose rounding could differ from torch's by an ulp.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define VDM_HOST_DEVICE __host__ __device__
#else
#define VDM_HOST_DEVICE
#endif

namespace vdm_fast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct RelPosBiasProblem {
  int64_t batch;          // B (1 for shared positions)
  int64_t frames;         // T
  int64_t heads;          // H
  int64_t num_buckets;    // rows of the table
  const int64_t* positions;  // (B, T) int64
  int64_t pos_stride_b, pos_stride_t;
  const int32_t* lut;     // (2 * max_distance + 1,) int32
  int64_t max_distance;
};

// bias[b, h, i, j] = table[bucket(pos[b, j] - pos[b, i]), h]; `out` is contiguous (B, H, T, T), dtype of `table`.
void rel_pos_bias_forward_cpu(const RelPosBiasProblem& p, const void* table, int64_t table_stride_k,
                              int64_t table_stride_h, DType dtype, void* out);
// grad_table[k, h] = sum over (b, i, j) with bucket == k of grad[b, h, i, j], in fp32, in a fixed order.
void rel_pos_bias_backward_cpu(const RelPosBiasProblem& p, const void* grad, const int64_t grad_strides[4],
                               DType dtype, float* grad_table);

#ifdef VDM_FAST_WITH_CUDA
// Same contracts on device pointers, launched on `stream` (a cudaStream_t as an integer). Return 0 on success, the
// launch's cudaError_t if it failed, or minus the cudaError_t an earlier CUDA call had left pending (read and cleared
// before the launch), so the binding can say whose error it is.
int rel_pos_bias_forward_cuda(const RelPosBiasProblem& p, const void* table, int64_t table_stride_k,
                              int64_t table_stride_h, DType dtype, void* out, uintptr_t stream);
int rel_pos_bias_backward_cuda(const RelPosBiasProblem& p, const void* grad, const int64_t grad_strides[4],
                               DType dtype, float* grad_table, uintptr_t stream);
int cuda_runtime_version();
#endif

VDM_HOST_DEVICE inline int64_t rel_pos_bucket(const RelPosBiasProblem& p, int64_t b, int64_t i, int64_t j) {
  int64_t d = p.positions[b * p.pos_stride_b + j * p.pos_stride_t] - p.positions[b * p.pos_stride_b + i * p.pos_stride_t];
  d = d < -p.max_distance ? -p.max_distance : (d > p.max_distance ? p.max_distance : d);
  return p.lut[d + p.max_distance];
}

}  // namespace vdm_fast
