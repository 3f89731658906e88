// CPU implementation of the relative position bias op (see ../rel_pos_bias.h for the contract).
#include "../rel_pos_bias.h"

#include <cstring>
#include <vector>

namespace vdm_fast {
namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float load_as_float(const void* base, int64_t offset, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[offset];
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(base)[offset]);
    default: {
      const uint32_t bits = (uint32_t)static_cast<const uint16_t*>(base)[offset] << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
  }
}

// The forward is a gather: copy the element's bits, whatever the float format.
template <typename Word>
void gather(const RelPosBiasProblem& p, const Word* table, int64_t sk, int64_t sh, Word* out) {
  const int64_t T = p.frames, H = p.heads;
  std::vector<int64_t> bucket(T * T);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j) bucket[i * T + j] = rel_pos_bucket(p, b, i, j);
    for (int64_t h = 0; h < H; ++h) {
      Word* o = out + (b * H + h) * T * T;
      for (int64_t e = 0; e < T * T; ++e) o[e] = table[bucket[e] * sk + h * sh];
    }
  }
}

}  // namespace

void rel_pos_bias_forward_cpu(const RelPosBiasProblem& p, const void* table, int64_t sk, int64_t sh, DType dtype,
                              void* out) {
  if (dtype == DType::kFloat32)
    gather(p, static_cast<const uint32_t*>(table), sk, sh, static_cast<uint32_t*>(out));
  else
    gather(p, static_cast<const uint16_t*>(table), sk, sh, static_cast<uint16_t*>(out));
}

void rel_pos_bias_backward_cpu(const RelPosBiasProblem& p, const void* grad, const int64_t gs[4], DType dtype,
                               float* grad_table) {
  const int64_t T = p.frames, H = p.heads;
  std::memset(grad_table, 0, sizeof(float) * p.num_buckets * H);
  // Sequential sums in a fixed (b, i, j) order: bitwise reproducible.
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j) {
        float* row = grad_table + rel_pos_bucket(p, b, i, j) * H;
        const int64_t base = b * gs[0] + i * gs[2] + j * gs[3];
        for (int64_t h = 0; h < H; ++h) row[h] += load_as_float(grad, base + h * gs[1], dtype);
      }
}

}  // namespace vdm_fast
