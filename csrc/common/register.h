// The one registration macro of the compiled kernels: an op's forward and backward implementations for
// one dispatch key (schemas pyseg::<op> and pyseg::<op>_backward in csrc/pyseg.cpp). CPU files use
// PYSEG_KERNELS(CPU, <op>, forward, backward); CUDA files PYSEG_CUDA_KERNELS(<op>, forward, backward)
// (csrc/cuda/runtime.cuh: the CUDA key, or the emulator's pyseg_emu library).
#pragma once

#include <torch/library.h>

#define PYSEG_KERNELS(key, op, forward, backward) \
  TORCH_LIBRARY_IMPL(pyseg, key, m) {             \
    m.impl(#op, &forward);                        \
    m.impl(#op "_backward", &backward);           \
  }
