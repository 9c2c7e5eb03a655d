// Framework-free C API of the dualpipe-overlap CUDA kernels.
//
// Everything here takes raw pointers, element counts and an opaque stream handle
// (a cudaStream_t passed as void*), so this header is usable from plain C++ code that
// does not include CUDA or torch headers (csrc/bindings.cpp includes it).
//
// Conventions:
//   * every function returns 0 on success, non-zero on failure; on failure
//     dp_cuda_last_error() returns a message naming the failing call (thread-local);
//   * "num_blocks" is the SM budget: kernels launch exactly that many blocks (one per SM
//     at most by construction) and walk their work with a grid-stride loop;
//   * nothing here synchronizes the stream except dp_green_ctx_destroy.
#ifndef DUALPIPE_CSRC_CUDA_DP_API_H_
#define DUALPIPE_CSRC_CUDA_DP_API_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types understood by the arithmetic kernels (scatter_add_rows).
enum dp_dtype {
  DP_FLOAT32 = 0,
  DP_FLOAT64 = 1,
  DP_BFLOAT16 = 2,
  DP_FLOAT16 = 3,
};

// Threads per block used by every data-moving kernel.
enum { DP_THREADS_PER_BLOCK = 512 };

const char* dp_cuda_last_error(void);

// Copy nbytes from src to dst (device pointers, non-overlapping). 16-byte vector
// accesses when dst and src are co-aligned modulo 16, byte accesses for head/tail.
int dp_sm_copy(void* dst, const void* src, int64_t nbytes, int num_blocks, void* stream);

// out[i, :] = src[index[i], :] for i in [0, num_rows); rows are row_bytes long.
// index is int64 when index_is_int64 != 0, else int32. Indices must be in range.
int dp_gather_rows(void* out, const void* src, const void* index, int index_is_int64,
                   int64_t num_rows, int64_t row_bytes, int num_blocks, void* stream);

// Deterministic row scatter-add in CSR form:
//   out[r, c] = round(out[r, c] + sum_{j in [offsets[r], offsets[r+1])} src[order[j], c])
// with the sum taken in order of j, accumulated in float (double for DP_FLOAT64) and
// rounded once to the element type. order/offsets are int64; offsets has out_rows + 1
// entries. The CPU implementation (csrc/cpu) does the same arithmetic, bit for bit.
int dp_scatter_add_rows_csr(void* out, const void* src, const int64_t* order,
                            const int64_t* offsets, int64_t out_rows, int64_t cols,
                            int dtype, int num_blocks, void* stream);

// Each of num_blocks blocks spins for spin_cycles clock cycles, then writes the id of
// the SM it ran on (%smid) to out[blockIdx.x]. out is an int32 device array.
int dp_smid_probe(int32_t* out, int num_blocks, int64_t spin_cycles, void* stream);

// out[0] = %nsmid: SM ids (%smid) lie in [0, %nsmid), which need not be contiguous nor
// equal the device's SM count. out is an int32 device array of at least one entry.
int dp_nsmid(int32_t* out, void* stream);

// ---- Green contexts (CUDA driver API, resolved at run time) ----------------------

// SM resource of a device: total SMs, minimum partition size, partition alignment.
// min_partition/alignment come from the driver on CUDA >= 13 headers and from the
// documented per-architecture table before that.
int dp_green_ctx_query(int device, int* sm_count, int* min_partition, int* alignment);

// Split the device's SMs into a communication group of at least comm_sms SMs and the
// rest (compute), create one green context and one non-blocking stream on each.
// comm_sms must already respect the granularity (Python rounds it). Outputs the opaque
// handle, the two streams (CUstream as void*) and the SM counts read back from the
// created contexts.
int dp_green_ctx_create(int device, int comm_sms, int comm_priority, int compute_priority,
                        void** handle, void** comm_stream, void** compute_stream,
                        int* comm_sms_out, int* compute_sms_out);

// Synchronize and destroy the two streams, then the two green contexts. NULL is a no-op.
int dp_green_ctx_destroy(void* handle);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // DUALPIPE_CSRC_CUDA_DP_API_H_
