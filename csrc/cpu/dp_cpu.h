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


// ---- shared-memory transport primitives (csrc/cpu/shm.cpp, used by overlap/shm.py) ----
// Addresses are raw pointers (as int64) into a MAP_SHARED mapping the caller keeps alive.
// A ring is kRingHeaderBytes of counters followed by `capacity` data bytes.
constexpr int64_t kRingHeaderBytes = 128;
bool shm_supported();
// Copy up to nbytes into / out of the ring; returns the bytes moved (0 when the ring is
// full / empty, or, with all_or_nothing, when not all of nbytes fit).
int64_t ring_write(int64_t ring, int64_t capacity, int64_t src, int64_t nbytes, bool all_or_nothing);
int64_t ring_read(int64_t ring, int64_t capacity, int64_t dst, int64_t nbytes);
int64_t ring_available(int64_t ring);
int64_t load_acquire(int64_t addr);
void store_release(int64_t addr, int64_t value);
int64_t fetch_add(int64_t addr, int64_t value);
// A bell is a 32-bit futex word followed by a 32-bit sleeper count.
int64_t bell_value(int64_t bell);
void bell_ring(int64_t bell);
// Sleep until the bell's value differs from `seen` or timeout_us passes; true if it differs.
bool bell_wait(int64_t bell, int64_t seen, int64_t timeout_us);

}  // namespace dp_cpu

#endif  // DUALPIPE_CSRC_CPU_DP_CPU_H_
