"""Index helpers shared by the Triton kernels (``@triton.jit`` functions, inlined by the compiler).

Patch rule of every patch-wise op: cell g of an axis of n pixels cut into ``grid`` cells covers
[ceil(g*n/grid), ceil((g+1)*n/grid)) (csrc/common/patch_index.h holds the C++/CUDA copy).
"""
import triton
import triton.language as tl


@triton.jit
def reflect(i, n):
    """PyTorch "reflect" padding index for i in [-1, n] (one pixel beyond each border)."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= n, 2 * (n - 1) - i, i)


@triton.jit
def patch_rect(patch, gh, gw, H, W):
    """(first row, rows, first column, columns) of patch (patch // gw, patch % gw) of a gh x gw grid
    over an H x W map."""
    gi = patch // gw
    gj = patch % gw
    r0 = (gi * H + gh - 1) // gh
    ph = ((gi + 1) * H + gh - 1) // gh - r0
    c0 = (gj * W + gw - 1) // gw
    pw = ((gj + 1) * W + gw - 1) // gw - c0
    return r0, ph, c0, pw
