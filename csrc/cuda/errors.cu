// The thread-local error message every launcher in csrc/cuda writes on failure.
#include "common.cuh"

extern "C" const char* dp_cuda_last_error(void) { return dp::error_buffer(); }
