// Helpers of the C ABI launchers: status codes with a thread-local message, and the guard
// that keeps C++ exceptions from crossing the boundary. Not installed; not part of the ABI.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fastddpm/fastddpm.h"

namespace fastddpm {
namespace abi {

void clear_error();
// Records a printf-style message for fastddpm_last_error() and returns `status`.
int fail(int status, const char* format, ...) __attribute__((format(printf, 2, 3)));
// FASTDDPM_SUCCESS, or FASTDDPM_ERROR_CUDA naming `what` and the CUDA error.
int cuda_status(cudaError_t err, const char* what);
// Streaming multiprocessors of the current device (cached per device), or 0 if unknown.
int num_sms();

}  // namespace abi
}  // namespace fastddpm

// Every entry point's body sits between these: clears the last error on entry and turns an
// escaping exception into FASTDDPM_ERROR_INTERNAL.
#define FASTDDPM_API_BEGIN \
  try {                    \
    fastddpm::abi::clear_error();
#define FASTDDPM_API_END                                                                   \
  }                                                                                        \
  catch (const std::exception& err) {                                                      \
    return fastddpm::abi::fail(FASTDDPM_ERROR_INTERNAL, "internal error: %s", err.what()); \
  }                                                                                        \
  catch (...) {                                                                            \
    return fastddpm::abi::fail(FASTDDPM_ERROR_INTERNAL, "internal error");                 \
  }

// Argument checks: each returns from the entry point with a message naming the argument.
#define FASTDDPM_CHECK(cond, status, ...) \
  do {                                    \
    if (!(cond)) return fastddpm::abi::fail(status, __VA_ARGS__); \
  } while (0)
#define FASTDDPM_CHECK_NOT_NULL(ptr) \
  FASTDDPM_CHECK((ptr) != nullptr, FASTDDPM_ERROR_INVALID_VALUE, "%s is a null pointer", #ptr)
#define FASTDDPM_CHECK_DTYPE(dtype)                                                                 \
  FASTDDPM_CHECK((dtype) == FASTDDPM_FLOAT32 || (dtype) == FASTDDPM_FLOAT16 ||                      \
                     (dtype) == FASTDDPM_BFLOAT16,                                                  \
                 FASTDDPM_ERROR_NOT_SUPPORTED,                                                      \
                 "%s = %d is not a supported dtype (0 float32, 1 float16, 2 bfloat16)", #dtype, \
                 static_cast<int>(dtype))
#define FASTDDPM_CHECK_NONNEGATIVE(size) \
  FASTDDPM_CHECK((size) >= 0, FASTDDPM_ERROR_INVALID_VALUE, "%s = %lld is negative", #size, \
                 static_cast<long long>(size))
