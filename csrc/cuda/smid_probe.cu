// SM-id probe: lets tests prove which SMs a stream's kernels can reach.
//
// Each block busy-waits for spin_cycles (so that many blocks are resident at once and
// the block scheduler has to spread them over every SM it is allowed to use), then
// writes the %smid special register to out[blockIdx.x]. The set of distinct ids seen
// from a green-context stream must fit inside that context's SM count (plus the 2
// shared SMs CUDA allows green-context work once a module with dynamic parallelism is
// loaded, see overlap/partition.py), and the sets seen from two disjoint partitions
// must not intersect beyond those.
//
// %smid need not be contiguous: ids range over [0, %nsmid), and %nsmid may exceed the
// device's SM count. dp_nsmid reads %nsmid so callers size and validate id sets with it.
#include "common.cuh"

namespace {

__device__ __forceinline__ uint32_t sm_id() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

__device__ __forceinline__ uint32_t sm_id_limit() {
  uint32_t n;
  asm volatile("mov.u32 %0, %%nsmid;" : "=r"(n));
  return n;
}

__global__ void nsmid_kernel(int32_t* __restrict__ out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = static_cast<int32_t>(sm_id_limit());
}

__global__ void smid_probe_kernel(int32_t* __restrict__ out, int64_t spin_cycles) {
  if (threadIdx.x != 0) return;
  const long long start = clock64();
  while (clock64() - start < spin_cycles) {
  }
  out[blockIdx.x] = static_cast<int32_t>(sm_id());
}

}  // namespace

extern "C" int dp_smid_probe(int32_t* out, int num_blocks, int64_t spin_cycles, void* stream) {
  if (int err = dp::check_budget(num_blocks, "dp_smid_probe")) return err;
  if (spin_cycles < 0) return dp::fail(-1, "dp_smid_probe: spin_cycles must be >= 0");
  // 32 threads: one warp per block keeps residency limited by blocks, not registers.
  smid_probe_kernel<<<num_blocks, 32, 0, static_cast<cudaStream_t>(stream)>>>(out, spin_cycles);
  return dp::check_launch("smid_probe_kernel");
}

extern "C" int dp_nsmid(int32_t* out, void* stream) {
  nsmid_kernel<<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(out);
  return dp::check_launch("nsmid_kernel");
}
