// Every pyseg operator schema lives in this file (one TORCH_LIBRARY block).
// Backends register implementations with TORCH_LIBRARY_IMPL(pyseg, <Key>, m) in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; autograd and fake (meta) kernels are
// registered from Python in pyseg/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing pyseg._C loads this library and with it the registrations below.
// The module itself carries no Python functions (extension-cpp style, limited API).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "pyseg compiled operators (see torch.ops.pyseg)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pyseg, m) {
  // ---- patchwise_conv2d ---------------------------------------------------------------
  // x: (B, Cin, H, W); weight: (B, Cout, Cin/groups, kh, kw, gh, gw) contiguous;
  // bias: (B, Cout, gh, gw) or None; padding = (top, bottom, left, right), zeros.
  // Output (B, Cout, Hout, Wout); output pixel (i, j) uses patch (i*gh/Hout, j*gw/Wout).
  m.def(
      "patchwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups) -> Tensor");
  // Returns (grad_x, grad_weight, grad_bias); entries whose output_mask is false are empty.
  m.def(
      "patchwise_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- meta_block ---------------------------------------------------------------------

  // ---- hmsa_fuse ----------------------------------------------------------------------
}
