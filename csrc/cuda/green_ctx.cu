// Green-context SM partition through the CUDA driver API.
//
// The driver entry points are resolved at run time with cudaGetDriverEntryPoint*, so the
// library links only against the CUDA runtime (no -lcuda, no driver stub at build time),
// and an old driver produces an error message instead of a load failure.
//
// ABI: the entry points are requested at the ABI of the headers compiled against
// (CUDA_VERSION), or at the driver's version when that is older, and never below 12.5
// (green-context streams).  The CUDA 13 fields of CUdevSmResource (minSmPartitionSize,
// smCoscheduledAlignment) are read only when both the headers and the requested ABI are
// 13.0 or later; every CUdevResource handed to the driver is zero-initialised, so a field
// a driver does not fill reads as 0 (and the documented table is used).
//
// Current device: every entry point that selects a device restores the caller's current
// device before returning, on every path (DeviceRestore).
//
// Partition recipe (CUDA driver API "Green Contexts"):
//   cuDeviceGetDevResource(SM) -> cuDevSmResourceSplitByCount(1 group of comm_sms, rest)
//   -> cuDevResourceGenerateDesc (one per side) -> cuGreenCtxCreate (one per side)
//   -> cuGreenCtxStreamCreate (one non-blocking stream per side, with a priority)
//   -> cuGreenCtxGetDevResource to read back the SM counts actually granted.
#include <cuda.h>

#include <cstdlib>
#include <cstring>
#include <new>

#include "common.cuh"

#if defined(CUDA_VERSION) && CUDA_VERSION >= 12050
#define DP_HAS_GREEN_CTX 1
#else
#define DP_HAS_GREEN_CTX 0
#endif

namespace {

// Oldest driver ABI with everything used here (cuGreenCtxStreamCreate is 12.5).
constexpr int kMinDriverApiVersion = 12050;
#if defined(CUDA_VERSION)
// The ABI of the headers this file is compiled against.
constexpr int kHeaderApiVersion = CUDA_VERSION;
#else
constexpr int kHeaderApiVersion = 0;
#endif

// Restores the calling thread's current device on scope exit (every return path).
class DeviceRestore {
 public:
  DeviceRestore() { saved_ = cudaGetDevice(&device_) == cudaSuccess; }
  ~DeviceRestore() {
    int now = -1;
    if (saved_ && (cudaGetDevice(&now) != cudaSuccess || now != device_)) cudaSetDevice(device_);
  }
  DeviceRestore(const DeviceRestore&) = delete;
  DeviceRestore& operator=(const DeviceRestore&) = delete;

 private:
  int device_ = 0;
  bool saved_ = false;
};

// A zero-initialised driver struct (unions and padding included).
template <typename T>
T zeroed() {
  T value;
  std::memset(&value, 0, sizeof(value));
  return value;
}

// Minimum partition size and alignment when the headers cannot report them (CUDA 12
// driver documentation of cuDevSmResourceSplitByCount).
void documented_granularity(int major, int* min_partition, int* alignment) {
  if (major >= 9) {
    *min_partition = 8; *alignment = 8;
  } else if (major == 8) {
    *min_partition = 4; *alignment = 2;
  } else if (major == 7) {
    *min_partition = 2; *alignment = 2;
  } else {
    *min_partition = 1; *alignment = 1;
  }
}

// Resolve `name` at the driver ABI `api_version` (see the top of the file).
int resolve(const char* name, void** fn, int api_version) {
  *fn = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12050
  cudaError_t err = cudaGetDriverEntryPointByVersion(name, fn, static_cast<unsigned>(api_version),
                                                     cudaEnableDefault, &status);
#else
  (void)api_version;  // the runtime's own ABI: this runtime predates the versioned query
  cudaError_t err = cudaGetDriverEntryPoint(name, fn, cudaEnableDefault, &status);
#endif
  if (err != cudaSuccess) return dp::check_runtime(err, name);
  if (status != cudaDriverEntryPointSuccess || *fn == nullptr) {
    return dp::fail(-1,
                    "driver entry point %s is unavailable at the CUDA %d.%d ABI (driver too "
                    "old for green contexts? need a CUDA %d.%d+ driver)",
                    name, api_version / 1000, (api_version % 1000) / 10,
                    kMinDriverApiVersion / 1000, (kMinDriverApiVersion % 1000) / 10);
  }
  return 0;
}

#if DP_HAS_GREEN_CTX

struct Driver {
  int api_version = 0;  // the ABI the entry points below were resolved at
  decltype(&::cuGetErrorString) getErrorString = nullptr;
  decltype(&::cuDeviceGet) deviceGet = nullptr;
  decltype(&::cuDeviceGetDevResource) deviceGetDevResource = nullptr;
  decltype(&::cuDevSmResourceSplitByCount) smResourceSplitByCount = nullptr;
  decltype(&::cuDevResourceGenerateDesc) resourceGenerateDesc = nullptr;
  decltype(&::cuGreenCtxCreate) greenCtxCreate = nullptr;
  decltype(&::cuGreenCtxDestroy) greenCtxDestroy = nullptr;
  decltype(&::cuGreenCtxGetDevResource) greenCtxGetDevResource = nullptr;
  decltype(&::cuGreenCtxStreamCreate) greenCtxStreamCreate = nullptr;
  decltype(&::cuStreamSynchronize) streamSynchronize = nullptr;
  decltype(&::cuStreamDestroy) streamDestroy = nullptr;
};

// Resolved once per process; a failure is retried on the next call.
int driver(const Driver** out) {
  static Driver d;
  static bool ready = false;
  if (ready) {
    *out = &d;
    return 0;
  }
  int version = 0;
  if (int err = dp::check_runtime(cudaDriverGetVersion(&version), "cudaDriverGetVersion")) return err;
  if (version < kMinDriverApiVersion) {
    return dp::fail(-1, "green contexts need a CUDA driver >= %d, this driver is %d",
                    kMinDriverApiVersion, version);
  }
  // The headers' ABI, or the driver's if older (asking for a newer one than the driver
  // has is an error); >= 12.5 by the check above and DP_HAS_GREEN_CTX.
  d.api_version = version < kHeaderApiVersion ? version : kHeaderApiVersion;
#define DP_RESOLVE(field, symbol) \
  if (int err = resolve(symbol, reinterpret_cast<void**>(&d.field), d.api_version)) return err
  DP_RESOLVE(getErrorString, "cuGetErrorString");
  DP_RESOLVE(deviceGet, "cuDeviceGet");
  DP_RESOLVE(deviceGetDevResource, "cuDeviceGetDevResource");
  DP_RESOLVE(smResourceSplitByCount, "cuDevSmResourceSplitByCount");
  DP_RESOLVE(resourceGenerateDesc, "cuDevResourceGenerateDesc");
  DP_RESOLVE(greenCtxCreate, "cuGreenCtxCreate");
  DP_RESOLVE(greenCtxDestroy, "cuGreenCtxDestroy");
  DP_RESOLVE(greenCtxGetDevResource, "cuGreenCtxGetDevResource");
  DP_RESOLVE(greenCtxStreamCreate, "cuGreenCtxStreamCreate");
  DP_RESOLVE(streamSynchronize, "cuStreamSynchronize");
  DP_RESOLVE(streamDestroy, "cuStreamDestroy");
#undef DP_RESOLVE
  ready = true;
  *out = &d;
  return 0;
}

int check_driver(const Driver* d, CUresult res, const char* what) {
  if (res == CUDA_SUCCESS) return 0;
  const char* msg = nullptr;
  if (d->getErrorString == nullptr || d->getErrorString(res, &msg) != CUDA_SUCCESS || !msg) {
    msg = "unknown driver error";
  }
  return dp::fail(static_cast<int>(res), "%s failed: %s (CUresult %d)", what, msg,
                  static_cast<int>(res));
}

// Make the device current and its primary context live (green contexts retain it).
// Callers hold a DeviceRestore: this changes the thread's current device.
int activate(int device) {
  if (int err = dp::check_runtime(cudaSetDevice(device), "cudaSetDevice")) return err;
  return dp::check_runtime(cudaFree(nullptr), "cudaFree(nullptr) (context init)");
}

struct Partition {
  CUgreenCtx ctx[2] = {nullptr, nullptr};   // [0] communication, [1] compute
  CUstream stream[2] = {nullptr, nullptr};
};

int destroy_partition(const Driver* d, Partition* p) {
  int first_error = 0;
  for (int i = 0; i < 2; ++i) {
    if (p->stream[i] != nullptr) {
      int err = check_driver(d, d->streamSynchronize(p->stream[i]), "cuStreamSynchronize");
      if (!err) err = check_driver(d, d->streamDestroy(p->stream[i]), "cuStreamDestroy");
      if (err && !first_error) first_error = err;
      p->stream[i] = nullptr;
    }
  }
  for (int i = 0; i < 2; ++i) {
    if (p->ctx[i] != nullptr) {
      int err = check_driver(d, d->greenCtxDestroy(p->ctx[i]), "cuGreenCtxDestroy");
      if (err && !first_error) first_error = err;
      p->ctx[i] = nullptr;
    }
  }
  return first_error;
}

int make_side(const Driver* d, CUdevice dev, CUdevResource* resource, int priority,
              CUgreenCtx* ctx, CUstream* stream, int* sms) {
  CUdevResourceDesc desc = nullptr;
  if (int err = check_driver(d, d->resourceGenerateDesc(&desc, resource, 1), "cuDevResourceGenerateDesc")) return err;
  if (int err = check_driver(d, d->greenCtxCreate(ctx, desc, dev, CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate")) return err;
  if (int err = check_driver(d, d->greenCtxStreamCreate(stream, *ctx, CU_STREAM_NON_BLOCKING, priority), "cuGreenCtxStreamCreate")) return err;
  CUdevResource granted = zeroed<CUdevResource>();
  if (int err = check_driver(d, d->greenCtxGetDevResource(*ctx, &granted, CU_DEV_RESOURCE_TYPE_SM), "cuGreenCtxGetDevResource")) return err;
  *sms = static_cast<int>(granted.sm.smCount);
  return 0;
}

#endif  // DP_HAS_GREEN_CTX

}  // namespace

extern "C" int dp_green_ctx_query(int device, int* sm_count, int* min_partition, int* alignment) {
#if DP_HAS_GREEN_CTX
  const Driver* d = nullptr;
  if (int err = driver(&d)) return err;
  DeviceRestore restore;
  if (int err = activate(device)) return err;
  CUdevice dev = 0;
  if (int err = check_driver(d, d->deviceGet(&dev, device), "cuDeviceGet")) return err;
  CUdevResource res = zeroed<CUdevResource>();
  if (int err = check_driver(d, d->deviceGetDevResource(dev, &res, CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")) return err;
  *sm_count = static_cast<int>(res.sm.smCount);
#if CUDA_VERSION >= 13000
  if (d->api_version >= 13000) {  // fields of the 13.0 ABI, filled at that ABI only
    *min_partition = static_cast<int>(res.sm.minSmPartitionSize);
    *alignment = static_cast<int>(res.sm.smCoscheduledAlignment);
    if (*min_partition > 0 && *alignment > 0) return 0;
  }
#endif
  int major = 0;
  if (int err = dp::check_runtime(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute")) return err;
  documented_granularity(major, min_partition, alignment);
  return 0;
#else
  (void)device; (void)sm_count; (void)min_partition; (void)alignment;
  return dp::fail(-1, "extension built with CUDA < 12.5: green contexts unavailable");
#endif
}

extern "C" int dp_green_ctx_create(int device, int comm_sms, int comm_priority,
                                   int compute_priority, void** handle, void** comm_stream,
                                   void** compute_stream, int* comm_sms_out,
                                   int* compute_sms_out) {
#if DP_HAS_GREEN_CTX
  *handle = nullptr;
  const Driver* d = nullptr;
  if (int err = driver(&d)) return err;
  if (comm_sms <= 0) return dp::fail(-1, "dp_green_ctx_create: comm_sms must be >= 1, got %d", comm_sms);
  DeviceRestore restore;
  if (int err = activate(device)) return err;
  CUdevice dev = 0;
  if (int err = check_driver(d, d->deviceGet(&dev, device), "cuDeviceGet")) return err;
  CUdevResource whole = zeroed<CUdevResource>();
  if (int err = check_driver(d, d->deviceGetDevResource(dev, &whole, CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")) return err;
  if (static_cast<unsigned>(comm_sms) >= whole.sm.smCount) {
    return dp::fail(-1, "comm_sms=%d leaves no SM for compute (device has %u SMs)", comm_sms,
                    whole.sm.smCount);
  }
  CUdevResource comm = zeroed<CUdevResource>();
  CUdevResource rest = zeroed<CUdevResource>();
  unsigned int groups = 1;
  if (int err = check_driver(d, d->smResourceSplitByCount(&comm, &groups, &whole, &rest, 0, static_cast<unsigned>(comm_sms)), "cuDevSmResourceSplitByCount")) return err;
  if (groups != 1 || rest.sm.smCount == 0) {
    return dp::fail(-1,
                    "cuDevSmResourceSplitByCount could not carve %d SMs out of %u "
                    "(groups=%u, remaining=%u SMs)",
                    comm_sms, whole.sm.smCount, groups, rest.sm.smCount);
  }
  auto* p = new (std::nothrow) Partition();
  if (p == nullptr) return dp::fail(-1, "dp_green_ctx_create: out of host memory");
  int err = make_side(d, dev, &comm, comm_priority, &p->ctx[0], &p->stream[0], comm_sms_out);
  if (!err) err = make_side(d, dev, &rest, compute_priority, &p->ctx[1], &p->stream[1], compute_sms_out);
  if (err) {
    // Report the error that made creation fail, not a secondary one from the cleanup.
    char first[1024];
    std::memcpy(first, dp::error_buffer(), sizeof(first));
    destroy_partition(d, p);
    std::memcpy(dp::error_buffer(), first, sizeof(first));
    delete p;
    return err;
  }
  *handle = p;
  *comm_stream = p->stream[0];
  *compute_stream = p->stream[1];
  return 0;
#else
  (void)device; (void)comm_sms; (void)comm_priority; (void)compute_priority; (void)handle;
  (void)comm_stream; (void)compute_stream; (void)comm_sms_out; (void)compute_sms_out;
  return dp::fail(-1, "extension built with CUDA < 12.5: green contexts unavailable");
#endif
}

extern "C" int dp_green_ctx_destroy(void* handle) {
  if (handle == nullptr) return 0;
#if DP_HAS_GREEN_CTX
  const Driver* d = nullptr;
  if (int err = driver(&d)) return err;
  auto* p = static_cast<Partition*>(handle);
  int err = destroy_partition(d, p);
  delete p;
  return err;
#else
  return dp::fail(-1, "extension built with CUDA < 12.5: green contexts unavailable");
#endif
}
