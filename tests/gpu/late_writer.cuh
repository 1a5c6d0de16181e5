#pragma once
// A kernel standing for an engine's kernel before a library call on the same stream, written so that a
// library kernel that reads its inputs too early reads the wrong values: it lets its programmatic dependents
// launch at once, then writes those inputs about `ns` nanoseconds later.

#include <cuda_runtime.h>

#include <cstdint>

namespace spectralkv::test {

/// `words` 32-bit words from src to dst (words = 0: nothing).
struct LateCopy {
  std::uint32_t* dst = nullptr;
  const std::uint32_t* src = nullptr;
  int words = 0;
};

/// Launch with one CTA. `static`: each test file that includes this has its own copy of the kernel.
static __global__ void late_writer(LateCopy a, LateCopy b, unsigned long long ns) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  // %globaltimer, not __nanosleep alone: a sleep may return at once.
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
  for (int i = threadIdx.x; i < a.words; i += blockDim.x) a.dst[i] = a.src[i];
  for (int i = threadIdx.x; i < b.words; i += blockDim.x) b.dst[i] = b.src[i];
}

}  // namespace spectralkv::test
