// SM-budgeted data movement: flat copy, row gather, deterministic row scatter-add.
//
// Every kernel is launched with exactly `num_blocks` blocks (the SM budget the caller
// grants) and covers its work with a grid-stride loop, so the number of SMs it can
// occupy is bounded by the budget whatever the problem size. Accesses are 16 bytes
// wide where both sides are aligned, narrower (8/4/2/1 bytes) otherwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

namespace {

template <int W> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<2> { using type = uint16_t; };
template <> struct VecOf<1> { using type = uint8_t; };

// dst/src co-aligned: bytes [0, head) and [head + nvec * 16, nbytes) move one byte at a
// time, the middle in 16-byte vectors.
__global__ void copy_kernel(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src,
                            int64_t nbytes, int64_t head, int64_t nvec) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint4* __restrict__ vdst = reinterpret_cast<uint4*>(dst + head);
  const uint4* __restrict__ vsrc = reinterpret_cast<const uint4*>(src + head);
  for (int64_t i = tid; i < nvec; i += stride) vdst[i] = vsrc[i];
  const int64_t tail_start = head + nvec * 16;
  const int64_t scalar = head + (nbytes - tail_start);
  for (int64_t i = tid; i < scalar; i += stride) {
    const int64_t at = i < head ? i : tail_start + (i - head);
    dst[at] = src[at];
  }
}

// One row per block iteration; the block's threads stride over the row's vectors.
template <int W, typename Index>
__global__ void gather_rows_kernel(uint8_t* __restrict__ out, const uint8_t* __restrict__ src,
                                   const Index* __restrict__ index, int64_t num_rows,
                                   int64_t row_bytes) {
  using Vec = typename VecOf<W>::type;
  const int64_t vecs = row_bytes / W;
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const int64_t from = static_cast<int64_t>(index[row]);
    const Vec* __restrict__ s = reinterpret_cast<const Vec*>(src + from * row_bytes);
    Vec* __restrict__ d = reinterpret_cast<Vec*>(out + row * row_bytes);
    for (int64_t c = threadIdx.x; c < vecs; c += blockDim.x) d[c] = s[c];
  }
}

// Element conversions shared with the CPU twin's arithmetic: accumulate in Acc, round
// once with round-to-nearest-even.
template <typename T> struct Elem;
template <> struct Elem<float> {
  using Acc = float;
  __device__ static Acc load(float v) { return v; }
  __device__ static float store(Acc v) { return v; }
};
template <> struct Elem<double> {
  using Acc = double;
  __device__ static Acc load(double v) { return v; }
  __device__ static double store(Acc v) { return v; }
};
template <> struct Elem<__nv_bfloat16> {
  using Acc = float;
  __device__ static Acc load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(Acc v) { return __float2bfloat16_rn(v); }
};
template <> struct Elem<__half> {
  using Acc = float;
  __device__ static Acc load(__half v) { return __half2float(v); }
  __device__ static __half store(Acc v) { return __float2half_rn(v); }
};

template <typename T>
__global__ void scatter_add_rows_csr_kernel(T* __restrict__ out, const T* __restrict__ src,
                                            const int64_t* __restrict__ order,
                                            const int64_t* __restrict__ offsets,
                                            int64_t out_rows, int64_t cols) {
  using E = Elem<T>;
  for (int64_t row = blockIdx.x; row < out_rows; row += gridDim.x) {
    const int64_t lo = offsets[row];
    const int64_t hi = offsets[row + 1];
    if (lo == hi) continue;
    T* __restrict__ o = out + row * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      typename E::Acc acc = E::load(o[c]);
      for (int64_t j = lo; j < hi; ++j) {
        // Separate statement: no contraction can fuse this add with anything.
        const typename E::Acc term = E::load(src[order[j] * cols + c]);
        acc = acc + term;
      }
      o[c] = E::store(acc);
    }
  }
}

int widest_vector(const void* a, const void* b, int64_t row_bytes) {
  for (int w = 16; w > 1; w /= 2) {
    if (row_bytes % w == 0 && dp::aligned(a, w) && dp::aligned(b, w)) return w;
  }
  return 1;
}

template <typename Index>
int launch_gather(void* out, const void* src, const void* index, int64_t num_rows,
                  int64_t row_bytes, int num_blocks, cudaStream_t stream) {
  auto* o = static_cast<uint8_t*>(out);
  auto* s = static_cast<const uint8_t*>(src);
  auto* idx = static_cast<const Index*>(index);
  const dim3 grid(num_blocks), block(DP_THREADS_PER_BLOCK);
  switch (widest_vector(out, src, row_bytes)) {
    case 16: gather_rows_kernel<16, Index><<<grid, block, 0, stream>>>(o, s, idx, num_rows, row_bytes); break;
    case 8: gather_rows_kernel<8, Index><<<grid, block, 0, stream>>>(o, s, idx, num_rows, row_bytes); break;
    case 4: gather_rows_kernel<4, Index><<<grid, block, 0, stream>>>(o, s, idx, num_rows, row_bytes); break;
    case 2: gather_rows_kernel<2, Index><<<grid, block, 0, stream>>>(o, s, idx, num_rows, row_bytes); break;
    default: gather_rows_kernel<1, Index><<<grid, block, 0, stream>>>(o, s, idx, num_rows, row_bytes); break;
  }
  return dp::check_launch("gather_rows_kernel");
}

template <typename T>
int launch_scatter_add(void* out, const void* src, const int64_t* order, const int64_t* offsets,
                       int64_t out_rows, int64_t cols, int num_blocks, cudaStream_t stream) {
  scatter_add_rows_csr_kernel<T><<<num_blocks, DP_THREADS_PER_BLOCK, 0, stream>>>(
      static_cast<T*>(out), static_cast<const T*>(src), order, offsets, out_rows, cols);
  return dp::check_launch("scatter_add_rows_csr_kernel");
}

}  // namespace

extern "C" int dp_sm_copy(void* dst, const void* src, int64_t nbytes, int num_blocks,
                          void* stream) {
  if (int err = dp::check_budget(num_blocks, "dp_sm_copy")) return err;
  if (nbytes <= 0) return 0;
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  int64_t head = nbytes, nvec = 0;
  if ((d & 15) == (s & 15)) {  // co-aligned: peel to a 16-byte boundary, then vectors
    head = static_cast<int64_t>((16 - (d & 15)) & 15);
    if (head > nbytes) head = nbytes;
    nvec = (nbytes - head) / 16;
  }
  copy_kernel<<<num_blocks, DP_THREADS_PER_BLOCK, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), nbytes, head, nvec);
  return dp::check_launch("copy_kernel");
}

extern "C" int dp_gather_rows(void* out, const void* src, const void* index, int index_is_int64,
                              int64_t num_rows, int64_t row_bytes, int num_blocks, void* stream) {
  if (int err = dp::check_budget(num_blocks, "dp_gather_rows")) return err;
  if (num_rows <= 0 || row_bytes <= 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  return index_is_int64
             ? launch_gather<int64_t>(out, src, index, num_rows, row_bytes, num_blocks, st)
             : launch_gather<int32_t>(out, src, index, num_rows, row_bytes, num_blocks, st);
}

extern "C" int dp_scatter_add_rows_csr(void* out, const void* src, const int64_t* order,
                                       const int64_t* offsets, int64_t out_rows, int64_t cols,
                                       int dtype, int num_blocks, void* stream) {
  if (int err = dp::check_budget(num_blocks, "dp_scatter_add_rows_csr")) return err;
  if (out_rows <= 0 || cols <= 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DP_FLOAT32: return launch_scatter_add<float>(out, src, order, offsets, out_rows, cols, num_blocks, st);
    case DP_FLOAT64: return launch_scatter_add<double>(out, src, order, offsets, out_rows, cols, num_blocks, st);
    case DP_BFLOAT16: return launch_scatter_add<__nv_bfloat16>(out, src, order, offsets, out_rows, cols, num_blocks, st);
    case DP_FLOAT16: return launch_scatter_add<__half>(out, src, order, offsets, out_rows, cols, num_blocks, st);
    default: return dp::fail(-1, "dp_scatter_add_rows_csr: unsupported dtype code %d", dtype);
  }
}
