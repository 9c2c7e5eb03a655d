// Torch glue of the dualpipe-overlap extension: registers the ops of csrc/cpu and
// csrc/cuda under the `dualpipe_ext` namespace (torch.ops.dualpipe_ext.*).
//
// Only argument checks that protect memory safety live here; policy (SM budgets,
// rounding, CSR construction, bounds checks that need a device sync, fallbacks) is in
// Python (overlap/_ext.py, overlap/partition.py). The module object itself carries
// build facts (WITH_CUDA, CUDA_ARCHS, TORCH_VERSION) read by overlap/_build.py.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cpu/dp_cpu.h"

#ifdef DUALPIPE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/dp_api.h"
#endif

// setup.py passes these unquoted (e.g. -DDUALPIPE_CUDA_ARCHS=9.0,10.0); stringify here.
#define DP_STRINGIFY_(...) #__VA_ARGS__
#define DP_STRINGIFY(...) DP_STRINGIFY_(__VA_ARGS__)
#ifdef DUALPIPE_CUDA_ARCHS
#define DP_CUDA_ARCHS DP_STRINGIFY(DUALPIPE_CUDA_ARCHS)
#else
#define DP_CUDA_ARCHS ""
#endif
#ifdef DUALPIPE_TORCH_VERSION
#define DP_TORCH_VERSION DP_STRINGIFY(DUALPIPE_TORCH_VERSION)
#else
#define DP_TORCH_VERSION ""
#endif

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return dp_cpu::kFloat32;
    case at::kDouble: return dp_cpu::kFloat64;
    case at::kBFloat16: return dp_cpu::kBFloat16;
    case at::kHalf: return dp_cpu::kFloat16;
    default:
      TORCH_CHECK(false, "dualpipe_ext: scatter_add_rows supports float32, float64, bfloat16 "
                         "and float16, got ", t.scalar_type());
  }
  return -1;  // unreachable
}

int64_t row_bytes_of(const at::Tensor& t) {
  return t.dim() == 0 ? 0 : (t.size(0) == 0 ? 0 : t.nbytes() / t.size(0));
}

void check_budget(int64_t num_blocks) {
  TORCH_CHECK(num_blocks >= 1 && num_blocks <= INT32_MAX,
              "dualpipe_ext: num_blocks (the SM budget) must be in [1, 2^31), got ", num_blocks);
}

void check_copy(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.device() == src.device(), "sm_copy_: dst on ", dst.device(), ", src on ", src.device());
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous(), "sm_copy_: dst and src must be contiguous");
  TORCH_CHECK(dst.nbytes() == src.nbytes(), "sm_copy_: dst has ", dst.nbytes(), " bytes, src ", src.nbytes());
}

void check_gather(const at::Tensor& src, const at::Tensor& index) {
  TORCH_CHECK(src.dim() >= 1, "gather_rows: src must have at least one dimension");
  TORCH_CHECK(src.is_contiguous(), "gather_rows: src must be contiguous");
  TORCH_CHECK(index.dim() == 1 && index.is_contiguous(), "gather_rows: index must be 1-D contiguous");
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              "gather_rows: index must be int64 or int32, got ", index.scalar_type());
  TORCH_CHECK(index.device() == src.device(), "gather_rows: index on ", index.device(), ", src on ", src.device());
}

at::Tensor gather_output(const at::Tensor& src, const at::Tensor& index) {
  std::vector<int64_t> shape(src.sizes().begin(), src.sizes().end());
  shape[0] = index.size(0);
  return at::empty(shape, src.options());
}

void check_scatter(const at::Tensor& out, const at::Tensor& src, const at::Tensor& order,
                   const at::Tensor& offsets) {
  TORCH_CHECK(out.dim() >= 1 && out.is_contiguous() && src.is_contiguous(),
              "scatter_add_rows_csr_: out and src must be contiguous with at least one dimension");
  TORCH_CHECK(out.scalar_type() == src.scalar_type(), "scatter_add_rows_csr_: out is ",
              out.scalar_type(), ", src is ", src.scalar_type());
  TORCH_CHECK(src.dim() == out.dim() && (src.dim() == 1 || src.sizes().slice(1) == out.sizes().slice(1)),
              "scatter_add_rows_csr_: rows of out ", out.sizes(), " and src ", src.sizes(), " differ");
  TORCH_CHECK(order.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong &&
                  order.dim() == 1 && offsets.dim() == 1 && order.is_contiguous() && offsets.is_contiguous(),
              "scatter_add_rows_csr_: order and offsets must be 1-D contiguous int64");
  TORCH_CHECK(order.size(0) == src.size(0), "scatter_add_rows_csr_: order has ", order.size(0),
              " entries, src ", src.size(0), " rows");
  TORCH_CHECK(offsets.size(0) == out.size(0) + 1, "scatter_add_rows_csr_: offsets needs ",
              out.size(0) + 1, " entries, got ", offsets.size(0));
  for (const at::Tensor* t : {&src, &order, &offsets}) {
    TORCH_CHECK(t->device() == out.device(), "scatter_add_rows_csr_: all tensors must be on ", out.device());
  }
}

int64_t cols_of(const at::Tensor& out) { return out.size(0) == 0 ? 0 : out.numel() / out.size(0); }

// ---- CPU -------------------------------------------------------------------------
// num_blocks is accepted for signature parity; CPU work is split over at::parallel_for.

void sm_copy_cpu(at::Tensor dst, const at::Tensor& src, int64_t num_blocks) {
  check_budget(num_blocks);
  check_copy(dst, src);
  dp_cpu::copy(dst.data_ptr(), src.const_data_ptr(), static_cast<int64_t>(src.nbytes()));
}

at::Tensor gather_rows_cpu(const at::Tensor& src, const at::Tensor& index, int64_t num_blocks) {
  check_budget(num_blocks);
  check_gather(src, index);
  at::Tensor out = gather_output(src, index);
  const int64_t rb = row_bytes_of(src);
  const int64_t rows = src.size(0);
  const bool is64 = index.scalar_type() == at::kLong;
  for (int64_t i = 0; i < index.size(0); ++i) {  // memory safety: validate before copying
    const int64_t r = is64 ? index.const_data_ptr<int64_t>()[i] : index.const_data_ptr<int32_t>()[i];
    TORCH_CHECK(r >= 0 && r < rows, "gather_rows: index[", i, "] = ", r, " is out of range for ", rows, " rows");
  }
  void* o = out.data_ptr();
  const void* s = src.const_data_ptr();
  const void* idx = index.const_data_ptr();
  at::parallel_for(0, index.size(0), 64, [&](int64_t begin, int64_t end) {
    dp_cpu::gather_rows(o, s, idx, is64, begin, end, rb);
  });
  return out;
}

void scatter_add_rows_csr_cpu(at::Tensor out, const at::Tensor& src, const at::Tensor& order,
                              const at::Tensor& offsets, int64_t num_blocks) {
  check_budget(num_blocks);
  check_scatter(out, src, order, offsets);
  const int code = dtype_code(out);
  const int64_t* ord = order.const_data_ptr<int64_t>();
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[out.size(0)] == order.size(0),
              "scatter_add_rows_csr_: offsets must start at 0 and end at len(order)");
  for (int64_t r = 0; r < out.size(0); ++r) {
    TORCH_CHECK(off[r] <= off[r + 1], "scatter_add_rows_csr_: offsets must be non-decreasing");
  }
  for (int64_t j = 0; j < order.size(0); ++j) {
    TORCH_CHECK(ord[j] >= 0 && ord[j] < src.size(0), "scatter_add_rows_csr_: order[", j, "] = ",
                ord[j], " is out of range for ", src.size(0), " rows");
  }
  void* o = out.data_ptr();
  const void* s = src.const_data_ptr();
  const int64_t cols = cols_of(out);
  at::parallel_for(0, out.size(0), 16, [&](int64_t begin, int64_t end) {
    dp_cpu::scatter_add_rows_csr(o, s, ord, off, begin, end, cols, code);
  });
}

// ---- CUDA ------------------------------------------------------------------------
#ifdef DUALPIPE_WITH_CUDA

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "dualpipe_ext.", what, ": ", dp_cuda_last_error());
}

void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

void sm_copy_cuda(at::Tensor dst, const at::Tensor& src, int64_t num_blocks) {
  check_budget(num_blocks);
  check_copy(dst, src);
  const c10::cuda::CUDAGuard guard(dst.device());
  check_cuda(dp_sm_copy(dst.data_ptr(), src.const_data_ptr(), static_cast<int64_t>(src.nbytes()),
                        static_cast<int>(num_blocks), current_stream()),
             "sm_copy_");
}

at::Tensor gather_rows_cuda(const at::Tensor& src, const at::Tensor& index, int64_t num_blocks) {
  check_budget(num_blocks);
  check_gather(src, index);
  const c10::cuda::CUDAGuard guard(src.device());
  at::Tensor out = gather_output(src, index);
  check_cuda(dp_gather_rows(out.data_ptr(), src.const_data_ptr(), index.const_data_ptr(),
                            index.scalar_type() == at::kLong ? 1 : 0, index.size(0),
                            row_bytes_of(src), static_cast<int>(num_blocks), current_stream()),
             "gather_rows");
  return out;
}

void scatter_add_rows_csr_cuda(at::Tensor out, const at::Tensor& src, const at::Tensor& order,
                               const at::Tensor& offsets, int64_t num_blocks) {
  check_budget(num_blocks);
  check_scatter(out, src, order, offsets);
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(dp_scatter_add_rows_csr(out.data_ptr(), src.const_data_ptr(),
                                     order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
                                     out.size(0), cols_of(out), dtype_code(out),
                                     static_cast<int>(num_blocks), current_stream()),
             "scatter_add_rows_csr_");
}

void smid_probe_cuda(at::Tensor out, int64_t spin_cycles) {
  TORCH_CHECK(out.scalar_type() == at::kInt && out.dim() == 1 && out.is_contiguous() && out.numel() >= 1,
              "smid_probe_: out must be a non-empty 1-D contiguous int32 tensor (one entry per block)");
  TORCH_CHECK(out.numel() <= INT32_MAX, "smid_probe_: too many blocks");
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(dp_smid_probe(out.data_ptr<int32_t>(), static_cast<int>(out.numel()), spin_cycles,
                           current_stream()),
             "smid_probe_");
}

void nsmid_cuda(at::Tensor out) {
  TORCH_CHECK(out.scalar_type() == at::kInt && out.is_contiguous() && out.numel() >= 1,
              "nsmid_: out must be a contiguous int32 tensor with at least one entry");
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(dp_nsmid(out.data_ptr<int32_t>(), current_stream()), "nsmid_");
}

// The green-context entry points take a device ordinal: validate it, and make it current
// for the call with torch's guard (which restores the caller's device afterwards and
// keeps torch's view of the current device right; the CUDA side restores it too).
c10::DeviceIndex checked_device(int64_t device, const char* what) {
  const int64_t count = c10::cuda::device_count();
  TORCH_CHECK(device >= 0 && device < count, "dualpipe_ext.", what, ": device ", device,
              " is not a CUDA device ordinal in [0, ", count, ")");
  return static_cast<c10::DeviceIndex>(device);
}

std::vector<int64_t> green_ctx_query(int64_t device) {
  const c10::cuda::CUDAGuard guard(checked_device(device, "green_ctx_query"));
  int sms = 0, min_partition = 0, alignment = 0;
  check_cuda(dp_green_ctx_query(static_cast<int>(device), &sms, &min_partition, &alignment), "green_ctx_query");
  return {sms, min_partition, alignment};
}

std::vector<int64_t> green_ctx_create(int64_t device, int64_t comm_sms, int64_t comm_priority,
                                      int64_t compute_priority) {
  const c10::cuda::CUDAGuard guard(checked_device(device, "green_ctx_create"));
  void* handle = nullptr;
  void* comm_stream = nullptr;
  void* compute_stream = nullptr;
  int comm_out = 0, compute_out = 0;
  check_cuda(dp_green_ctx_create(static_cast<int>(device), static_cast<int>(comm_sms),
                                 static_cast<int>(comm_priority), static_cast<int>(compute_priority),
                                 &handle, &comm_stream, &compute_stream, &comm_out, &compute_out),
             "green_ctx_create");
  return {reinterpret_cast<int64_t>(handle), reinterpret_cast<int64_t>(comm_stream),
          reinterpret_cast<int64_t>(compute_stream), comm_out, compute_out};
}

void green_ctx_destroy(int64_t handle) {
  check_cuda(dp_green_ctx_destroy(reinterpret_cast<void*>(handle)), "green_ctx_destroy");
}

#else  // CPU-only build: the device-only ops exist and say why they cannot run.

[[noreturn]] void no_cuda(const char* what) {
  TORCH_CHECK(false, "dualpipe_ext.", what, ": this build of the extension has no CUDA "
              "(rebuild on a machine with nvcc and a CUDA torch: pip install --no-build-isolation -e .)");
}
std::vector<int64_t> green_ctx_query(int64_t) { no_cuda("green_ctx_query"); }
std::vector<int64_t> green_ctx_create(int64_t, int64_t, int64_t, int64_t) { no_cuda("green_ctx_create"); }
void green_ctx_destroy(int64_t) { no_cuda("green_ctx_destroy"); }

#endif  // DUALPIPE_WITH_CUDA

}  // namespace

TORCH_LIBRARY(dualpipe_ext, m) {
  m.def("sm_copy_(Tensor(a!) dst, Tensor src, int num_blocks) -> ()");
  m.def("gather_rows(Tensor src, Tensor index, int num_blocks) -> Tensor");
  m.def("scatter_add_rows_csr_(Tensor(a!) out, Tensor src, Tensor order, Tensor offsets, "
        "int num_blocks) -> ()");
  m.def("smid_probe_(Tensor(a!) out, int spin_cycles) -> ()");
  m.def("nsmid_(Tensor(a!) out) -> ()");
  // No tensor arguments: catch-all kernels.
  m.def("green_ctx_query(int device) -> int[]", &green_ctx_query);
  m.def("green_ctx_create(int device, int comm_sms, int comm_priority, int compute_priority) -> int[]",
        &green_ctx_create);
  m.def("green_ctx_destroy(int handle) -> ()", &green_ctx_destroy);
}

TORCH_LIBRARY_IMPL(dualpipe_ext, CPU, m) {
  m.impl("sm_copy_", &sm_copy_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_add_rows_csr_", &scatter_add_rows_csr_cpu);
}

#ifdef DUALPIPE_WITH_CUDA
TORCH_LIBRARY_IMPL(dualpipe_ext, CUDA, m) {
  m.impl("sm_copy_", &sm_copy_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_add_rows_csr_", &scatter_add_rows_csr_cuda);
  m.impl("smid_probe_", &smid_probe_cuda);
  m.impl("nsmid_", &nsmid_cuda);
}
#endif

// ---- Python module: importing it loads the library, which registers the ops ----------
// It also carries the shared-memory transport primitives as plain module functions
// (METH_FASTCALL, integer addresses): they run once or more per pipeline message, where
// the dispatcher's per-call cost would matter.  overlap/shm.py owns the mappings.
namespace {

bool int_args(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, const char* name,
              int64_t* out) {
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, want, nargs);
    return false;
  }
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    out[i] = PyLong_AsLongLong(args[i]);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

constexpr int64_t kReleaseGilBytes = 1 << 16;

// Run a copy of nbytes, without the GIL when it is large enough to be worth it.
template <typename Copy>
int64_t copy_maybe_nogil(int64_t nbytes, Copy copy) {
  if (nbytes < kReleaseGilBytes) return copy();
  int64_t n;
  Py_BEGIN_ALLOW_THREADS n = copy();
  Py_END_ALLOW_THREADS
  return n;
}

PyObject* py_shm_supported(PyObject*, PyObject* const*, Py_ssize_t) {
  return PyBool_FromLong(dp_cpu::shm_supported() ? 1 : 0);
}

PyObject* py_ring_write(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[5];
  if (!int_args(args, nargs, 5, "ring_write", a)) return nullptr;
  return PyLong_FromLongLong(
      copy_maybe_nogil(a[3], [&] { return dp_cpu::ring_write(a[0], a[1], a[2], a[3], a[4] != 0); }));
}

PyObject* py_ring_read(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[4];
  if (!int_args(args, nargs, 4, "ring_read", a)) return nullptr;
  return PyLong_FromLongLong(
      copy_maybe_nogil(a[3], [&] { return dp_cpu::ring_read(a[0], a[1], a[2], a[3]); }));
}

PyObject* py_ring_available(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[1];
  if (!int_args(args, nargs, 1, "ring_available", a)) return nullptr;
  return PyLong_FromLongLong(dp_cpu::ring_available(a[0]));
}

PyObject* py_load_acquire(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[1];
  if (!int_args(args, nargs, 1, "load_acquire", a)) return nullptr;
  return PyLong_FromLongLong(dp_cpu::load_acquire(a[0]));
}

PyObject* py_store_release(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[2];
  if (!int_args(args, nargs, 2, "store_release", a)) return nullptr;
  dp_cpu::store_release(a[0], a[1]);
  Py_RETURN_NONE;
}

PyObject* py_fetch_add(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[2];
  if (!int_args(args, nargs, 2, "fetch_add", a)) return nullptr;
  return PyLong_FromLongLong(dp_cpu::fetch_add(a[0], a[1]));
}

PyObject* py_bell_value(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[1];
  if (!int_args(args, nargs, 1, "bell_value", a)) return nullptr;
  return PyLong_FromLongLong(dp_cpu::bell_value(a[0]));
}

PyObject* py_bell_ring(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[1];
  if (!int_args(args, nargs, 1, "bell_ring", a)) return nullptr;
  dp_cpu::bell_ring(a[0]);
  Py_RETURN_NONE;
}

PyObject* py_bell_wait(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[3];
  if (!int_args(args, nargs, 3, "bell_wait", a)) return nullptr;
  bool changed;
  Py_BEGIN_ALLOW_THREADS changed = dp_cpu::bell_wait(a[0], a[1], a[2]);
  Py_END_ALLOW_THREADS
  return PyBool_FromLong(changed ? 1 : 0);
}

#define DP_FAST(name, doc) \
  {#name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_##name)), METH_FASTCALL, doc}

PyMethodDef module_methods[] = {
    DP_FAST(shm_supported, "shm_supported() -> bool: futex-based shared-memory waits work here"),
    DP_FAST(ring_write, "ring_write(ring, capacity, src, nbytes, all_or_nothing) -> bytes written"),
    DP_FAST(ring_read, "ring_read(ring, capacity, dst, nbytes) -> bytes read"),
    DP_FAST(ring_available, "ring_available(ring) -> bytes readable"),
    DP_FAST(load_acquire, "load_acquire(addr) -> int64"),
    DP_FAST(store_release, "store_release(addr, value)"),
    DP_FAST(fetch_add, "fetch_add(addr, value) -> previous int64"),
    DP_FAST(bell_value, "bell_value(bell) -> uint32"),
    DP_FAST(bell_ring, "bell_ring(bell): bump the bell and wake its sleepers"),
    DP_FAST(bell_wait, "bell_wait(bell, seen, timeout_us) -> True if the bell moved off `seen`"),
    {nullptr, nullptr, 0, nullptr}};
#undef DP_FAST

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "dualpipe-overlap extension: ops live in torch.ops.dualpipe_ext", -1,
                          module_methods, nullptr, nullptr, nullptr, nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef DUALPIPE_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_ARCHS", DP_CUDA_ARCHS) < 0 ||
      PyModule_AddStringConstant(m, "TORCH_VERSION", DP_TORCH_VERSION) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
