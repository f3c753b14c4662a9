// Every pyseg operator schema lives in this file (one TORCH_LIBRARY block).
// Backends register implementations with PYSEG_KERNELS (csrc/common/register.h) in
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
  // Fused HyperSeg v1_0 meta block (see csrc/common/meta_block.h and pyseg/ops/meta_block.py):
  // per patch, pw1 (hid x Cin, on the patch and its 1-px halo, reflect at image borders only)
  // -> affine -> ReLU6 -> depthwise 3x3 valid -> affine -> ReLU6 -> pw2 (Cout x hid) -> affine.
  // x: (B, Cin, H, W) contiguous; weight: (B, hid*Cin + 9*hid + Cout*hid, gh, gw) contiguous,
  // per patch [W1 (hid, Cin) | W2 (hid, 3, 3) | W3 (Cout, hid)] row-major; scale, shift:
  // (2*hid + Cout,) = [stage 1 (hid) | stage 2 (hid) | stage 3 (Cout)]. Output (B, Cout, H, W);
  // pixel (i, j) belongs to patch (i*gh/H, j*gw/W) (sizes need not divide). H, W >= 2.
  m.def("meta_block(Tensor x, Tensor weight, Tensor scale, Tensor shift, int hidden, int out_channels) -> Tensor");
  // Returns (grad_x, grad_weight, grad_scale, grad_shift); entries whose output_mask is false are
  // empty. Deterministic (no atomics); forward intermediates are recomputed per patch.
  m.def(
      "meta_block_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor scale, Tensor shift, "
      "int hidden, int out_channels, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // HyperSeg's 1x1 level: patch-wise 1x1 conv -> affine -> ReLU. x: (B, Cin, H, W) contiguous;
  // weight: (B, Cout*Cin, gh, gw) contiguous, per patch (Cout, Cin) row-major; scale, shift: (Cout,).
  m.def("pointwise_block(Tensor x, Tensor weight, Tensor scale, Tensor shift) -> Tensor");
  m.def(
      "pointwise_block_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor scale, Tensor shift, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- hmsa_fuse ----------------------------------------------------------------------
  // logits[k]: (B, C, h_k, w_k); attentions[k]: (B, 1, ha_k, wa_k); attentions[0] (the top
  // scale's) is ignored, pass any tensor (a plain Tensor[] keeps autograd over the list); scales
  // sorted strictly descending and containing 1.0.
  // scale_sizes: None (scale k's grid is its logits' size) or flat (gh_0, gw_0, gh_1, gw_1, ...):
  // scale k's logits and attention are bilinearly resized to its grid (gh_k, gw_k) (sampled on the
  // fly, never stored); fusion per SPEC section 4 on the grids; the result is resized to out_size.
  // labels=false: (B, C, out_h, out_w) logits; labels=true: (B, out_h, out_w) int64 argmax.
  m.def(
      "hmsa_fuse(Tensor[] logits, Tensor[] attentions, float[] scales, int[2] out_size, bool labels, "
      "int[]? scale_sizes=None) -> Tensor");
  // Backward of the two-scale training form, scales (s, 1.0) with s < 1; grad_out (B, C, out_h, out_w).
  // Returns (grad_logits_one, grad_logits_low, grad_attention_low).
  m.def(
      "hmsa_fuse_backward(Tensor grad_out, Tensor logits_one, Tensor logits_low, Tensor attention_low) "
      "-> (Tensor, Tensor, Tensor)");
}
