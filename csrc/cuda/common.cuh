// Shared helpers of the framework-free CUDA sources: error recording, launch checks.
#ifndef DUALPIPE_CSRC_CUDA_COMMON_CUH_
#define DUALPIPE_CSRC_CUDA_COMMON_CUH_

#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>

#include "dp_api.h"

namespace dp {

// One message per host thread; an inline function's static local is shared by every
// translation unit of the library (ODR), so all launchers write the same buffer.
inline char* error_buffer() {
  static thread_local char buffer[1024] = {0};
  return buffer;
}

// Record a formatted message and return code (or -1 when code is 0).
inline int fail(int code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(error_buffer(), 1024, fmt, args);
  va_end(args);
  return code != 0 ? code : -1;
}

inline int check_runtime(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return 0;
  return fail(static_cast<int>(err), "%s failed: %s (%s)", what, cudaGetErrorName(err),
              cudaGetErrorString(err));
}

// Call after a <<<>>> launch: reports configuration errors (not asynchronous faults).
inline int check_launch(const char* kernel) { return check_runtime(cudaGetLastError(), kernel); }

inline int check_budget(int num_blocks, const char* what) {
  if (num_blocks <= 0) {
    return fail(-1, "%s: num_blocks (the SM budget) must be >= 1, got %d", what, num_blocks);
  }
  return 0;
}

inline bool aligned(const void* p, uintptr_t alignment) {
  return (reinterpret_cast<uintptr_t>(p) & (alignment - 1)) == 0;
}

}  // namespace dp

#endif  // DUALPIPE_CSRC_CUDA_COMMON_CUH_
