// Allocation of the large outputs the CPU kernels write in full.
//
// glibc serves big requests with fresh mmap()s, so every forward faults a large output in again,
// 4 KiB at a time; on virtual machines each fault costs microseconds (measured on a 2-vCPU KVM
// guest: 40 MB took 19 ms to allocate and fill, 2.8 ms to fill once resident). When transparent
// huge pages are enabled in "madvise" or "always" mode, advising the output's whole 2 MiB pages
// with MADV_HUGEPAGE makes that one fault per 2 MiB (same guest: 4.9 ms). Advice only: the
// memory, its contents and the returned tensor are those of at::empty, and where the kernel
// refuses (THP "never", another OS) nothing changes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyseg {

// Below this size the fault cost is small and the advice would not cover a whole huge page.
constexpr int64_t kHugePageAdviceBytes = int64_t{4} << 20;

// PYSEG_HUGE_PAGES=0 in the environment turns the advice off (read on every call).
inline bool huge_page_advice_enabled() {
  const char* env = std::getenv("PYSEG_HUGE_PAGES");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(out.nbytes());
  if (out.device().is_cpu() && bytes >= kHugePageAdviceBytes && huge_page_advice_enabled()) {
    constexpr uintptr_t kHuge = uintptr_t{2} << 20;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
    if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace pyseg
