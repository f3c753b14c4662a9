// Run-time choice of the instruction set of the CPU kernels.
//
// Hot per-item code is compiled twice (see csrc/cpu/meta_block.cpp): for the baseline ISA the
// extension is built with, and, on x86-64 with GCC or Clang, for AVX2 + FMA. use_avx2() picks the
// AVX2 build when the CPU has both extensions, unless the environment variable PYSEG_CPU_ISA is
// "base" (read on every call, so tests can exercise both builds in one process).
#pragma once

#include <cstdlib>
#include <cstring>

#if (defined(__x86_64__) || defined(__amd64__)) && (defined(__GNUC__) || defined(__clang__))
#define PYSEG_CPU_AVX2 1
#else
#define PYSEG_CPU_AVX2 0
#endif

namespace pyseg {

inline bool use_avx2() {
#if PYSEG_CPU_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("PYSEG_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "base") == 0) return false;
  return supported;
#else
  return false;
#endif
}

}  // namespace pyseg
