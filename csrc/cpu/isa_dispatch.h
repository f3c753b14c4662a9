// Compiles a per-item compute header twice: into namespace isa_base for the baseline ISA and, on
// x86-64 with GCC/Clang, into namespace isa_avx2 under AVX2 + FMA; PYSEG_ISA_CALL picks one at run
// time (use_avx2() in cpu_isa.h).
//
// Usage, at namespace scope after everything the compute header uses is declared:
//   #define PYSEG_ISA_HEADER "cpu/<op>_patch.h"
//   #include "cpu/isa_dispatch.h"
// No include guard on purpose (one use per translation unit); the includer includes cpu/cpu_isa.h
// at global scope first.
#ifndef PYSEG_CPU_AVX2
#error "include cpu/cpu_isa.h before cpu/isa_dispatch.h"
#endif
#ifndef PYSEG_ISA_HEADER
#error "define PYSEG_ISA_HEADER before including cpu/isa_dispatch.h"
#endif

#define PYSEG_VEC_BYTES 16
namespace isa_base {
#include PYSEG_ISA_HEADER
}  // namespace isa_base
#undef PYSEG_VEC_BYTES
#if PYSEG_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define PYSEG_VEC_BYTES 32
namespace isa_avx2 {
#include PYSEG_ISA_HEADER
}  // namespace isa_avx2
#undef PYSEG_VEC_BYTES
#pragma GCC pop_options
#endif

#ifndef PYSEG_ISA_CALL
#if PYSEG_CPU_AVX2
#define PYSEG_ISA_CALL(avx2, fn, ...) ((avx2) ? isa_avx2::fn(__VA_ARGS__) : isa_base::fn(__VA_ARGS__))
#else
#define PYSEG_ISA_CALL(avx2, fn, ...) isa_base::fn(__VA_ARGS__)
#endif
#endif
