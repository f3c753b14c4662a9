// The CUDA launchers and kernels of csrc/cuda/patchwise_conv2d.cu, compiled by the host compiler for the CUDA
// emulator (registered as torch.ops.pyseg_emu.*; tests only).
#ifndef PYSEG_CUDA_EMULATOR
#define PYSEG_CUDA_EMULATOR
#endif
#include "cuda/patchwise_conv2d.cu"
