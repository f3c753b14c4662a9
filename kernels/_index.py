"""Index and math helpers shared by the Triton kernels (``@triton.jit`` functions, inlined by the compiler).

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


@triton.jit
def mm(a, b, acc, ACC_F64: tl.constexpr):
    """acc + a @ b with tl.dot on the tensor cores: float16/bfloat16 operands as loaded, float32
    operands as "tf32x3" (three TF32 products, about float32 accuracy: an FMA-only "ieee" dot holds
    whole K rows per thread and spills at these tile sizes); float64 (the interpreter's
    correctness path) in float64. Accumulation in float32 (float64)."""
    if ACC_F64:
        return tl.dot(a.to(tl.float64), b.to(tl.float64), acc, input_precision="ieee", out_dtype=tl.float64)
    elif a.dtype == tl.float32 or b.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3", out_dtype=tl.float32)
    else:
        return tl.dot(a, b, acc, out_dtype=tl.float32)


@triton.jit
def relu6(v):
    return tl.minimum(tl.maximum(v, 0.0), 6.0)


@triton.jit
def patch_item(gh, gw, H, W):
    """The work item of a per-(sample, patch) program (program_id(0) = sample * G + patch, G = gh*gw):
    (item, sample as int64 for element offsets, patch, G, first row, rows, first column, columns)."""
    item = tl.program_id(0)
    G = gh * gw
    patch = item % G
    b = (item // G).to(tl.int64)
    r0, ph, c0, pw = patch_rect(patch, gh, gw, H, W)
    return item, b, patch, G, r0, ph, c0, pw


@triton.jit
def block_range(start, n, BLOCK: tl.constexpr):
    """Indices start .. start + BLOCK - 1 and their mask (< n)."""
    i = start + tl.arange(0, BLOCK)
    return i, i < n


@triton.jit
def unflatten(pid, n0, n1, n2, G):
    """Split a flat program id into (i0, i1, i2, group, sample), i0 fastest: pid = (((sample * G +
    group) * n2 + i2) * n1 + i1) * n0 + i0. pid, group and sample int64 (the grid may exceed
    2**31 elements of the output); i0..i2 int32."""
    i0 = (pid % n0).to(tl.int32)
    rest = pid // n0
    i1 = (rest % n1).to(tl.int32)
    rest = rest // n1
    i2 = (rest % n2).to(tl.int32)
    rest = rest // n2
    return i0, i1, i2, rest % G, rest // G
