// Framework-free CPU twins of the csrc/cuda data-moving kernels.
//
// Same semantics and, for scatter_add_rows_csr, the same arithmetic (accumulate in float,
// or double for float64, in order of the CSR entries, round once to nearest-even), so
// CPU and CUDA results are bit-identical. Row ranges let the caller parallelize.
#ifndef DUALPIPE_CSRC_CPU_DP_CPU_H_
#define DUALPIPE_CSRC_CPU_DP_CPU_H_

#include <cstdint>

namespace dp_cpu {

// Same codes as enum dp_dtype in csrc/cuda/dp_api.h.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

void copy(void* dst, const void* src, int64_t nbytes);

// out[i, :] = src[index[i], :] for i in [row_begin, row_end).
void gather_rows(void* out, const void* src, const void* index, bool index_is_int64,
                 int64_t row_begin, int64_t row_end, int64_t row_bytes);

// For r in [row_begin, row_end):
//   out[r, :] = round(out[r, :] + sum_{j=offsets[r]}^{offsets[r+1]-1} src[order[j], :])
// Returns false for an unknown dtype code.
bool scatter_add_rows_csr(void* out, const void* src, const int64_t* order,
                          const int64_t* offsets, int64_t row_begin, int64_t row_end,
                          int64_t cols, int dtype);

// Bit conversions used above (exposed for tests of the rounding).
float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float value);
float half_to_float(uint16_t bits);
uint16_t float_to_half(float value);

}  // namespace dp_cpu

#endif  // DUALPIPE_CSRC_CPU_DP_CPU_H_
