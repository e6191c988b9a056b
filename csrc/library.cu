// The library's own entry points: version and build information, status names, the
// thread-local last error, the device check and the host copy of the Philox noise.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <exception>
#include <string>

#include "abi.h"
#include "build_config.h"  // FASTDDPM_VERSION, FASTDDPM_TARGETS: written by setup.py
#include "fastddpm/fastddpm.h"
#include "fastddpm/philox.cuh"

namespace fastddpm {
namespace abi {
namespace {

thread_local std::string last_error;

}  // namespace

void clear_error() { last_error.clear(); }

int fail(int status, const char* format, ...) {
  char buffer[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buffer, sizeof(buffer), format, args);
  va_end(args);
  last_error = buffer;
  return status;
}

int cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return FASTDDPM_SUCCESS;
  return fail(FASTDDPM_ERROR_CUDA, "%s: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err));
}

int num_sms() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return 0;
  if (device < kMaxDevices && cache[device].load() > 0) return cache[device].load();
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  if (device < kMaxDevices) cache[device].store(sms);
  return sms;
}

}  // namespace abi

// Compiled for the same targets as every kernel: whether it has code for a device tells
// whether they all do.
__global__ void probe_kernel() {}

}  // namespace fastddpm

extern "C" {

int fastddpm_abi_version(void) { return FASTDDPM_ABI_VERSION; }

const char* fastddpm_build_info(void) {
  static const std::string info = [] {
    char buffer[256];
    std::snprintf(buffer, sizeof(buffer), "fastddpm-cuda %s; CUDA %d.%d; targets %s", FASTDDPM_VERSION,
                  CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10, FASTDDPM_TARGETS);
    return std::string(buffer);
  }();
  return info.c_str();
}

const char* fastddpm_build_targets(void) { return FASTDDPM_TARGETS; }

const char* fastddpm_status_name(int status) {
  switch (status) {
    case FASTDDPM_SUCCESS:
      return "FASTDDPM_SUCCESS";
    case FASTDDPM_ERROR_INVALID_VALUE:
      return "FASTDDPM_ERROR_INVALID_VALUE";
    case FASTDDPM_ERROR_NOT_SUPPORTED:
      return "FASTDDPM_ERROR_NOT_SUPPORTED";
    case FASTDDPM_ERROR_CUDA:
      return "FASTDDPM_ERROR_CUDA";
    case FASTDDPM_ERROR_INTERNAL:
      return "FASTDDPM_ERROR_INTERNAL";
    default:
      return "unknown status";
  }
}

const char* fastddpm_last_error(void) { return fastddpm::abi::last_error.c_str(); }

int fastddpm_check_device(void) {
  FASTDDPM_API_BEGIN
  int device = -1;
  const int status = fastddpm::abi::cuda_status(cudaGetDevice(&device), "no usable CUDA device");
  if (status != FASTDDPM_SUCCESS) return status;
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, fastddpm::probe_kernel);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return fastddpm::abi::fail(FASTDDPM_ERROR_NOT_SUPPORTED,
                               "the library has no code for CUDA device %d (sm_%d%d); it was built for %s", device,
                               major, minor, FASTDDPM_TARGETS);
  }
  return fastddpm::abi::cuda_status(err, "cudaFuncGetAttributes");
  FASTDDPM_API_END
}

int fastddpm_philox_normal_host(uint64_t seed, uint64_t offset, int64_t n, float* out) {
  FASTDDPM_API_BEGIN
  FASTDDPM_CHECK_NONNEGATIVE(n);
  FASTDDPM_CHECK(n == 0 || out != nullptr, FASTDDPM_ERROR_INVALID_VALUE, "out is a null pointer");
  for (int64_t g = 0; 4 * g < n; ++g) {
    float z[4];
    fastddpm::philox_normal4(seed, offset, static_cast<uint64_t>(g), z);
    for (int64_t e = 0; e < 4 && 4 * g + e < n; ++e) out[4 * g + e] = z[e];
  }
  return FASTDDPM_SUCCESS;
  FASTDDPM_API_END
}

}  // extern "C"
