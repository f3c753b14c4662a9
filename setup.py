"""Build script for pyseg and its compiled extension ``pyseg._C``.

What is built:
  * ``csrc/**/*.cpp`` (schemas and the C++ CPU kernels): always.
  * ``csrc/cuda/*.cu`` (the CUDA kernels): when torch has CUDA and nvcc is found,
    or when forced with ``PYSEG_FORCE_CUDA=1`` (compiles on a machine without a GPU,
    like torchvision's ``FORCE_CUDA``). ``PYSEG_SKIP_CUDA=1`` turns them off.

Environment switches:
  PYSEG_FORCE_CUDA=1      compile the CUDA sources even without a visible GPU
  PYSEG_SKIP_CUDA=1       never compile the CUDA sources
  PYSEG_SKIP_EXTENSION=1  pure-Python install (reference and Triton backends only)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;8.6;8.9;9.0+PTX")
  MAX_JOBS                parallel compile jobs (default: number of CPUs)
  PYSEG_DEBUG=1           -O0 -g build
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"[pyseg setup] {msg}", flush=True)


def _version():
    scope = {}
    with open(os.path.join(ROOT, "pyseg", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _locate_cuda_home():
    """Point CUDA_HOME at a toolkit with headers before torch.utils.cpp_extension reads it.

    torch derives CUDA_HOME from ``which nvcc``; on machines where nvcc is a wrapper script in
    /usr/local/bin that gives /usr/local, which has no CUDA headers.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(c, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = c
            return


def _pip_cuda_include_dirs():
    """Headers of the pip CUDA packages (torch's CUDA headers include cublas_v2.h etc.)."""
    dirs = []
    for p in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/cublas/include",
                    "nvidia/cuda_runtime/include"):
            d = os.path.join(p, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _extensions():
    if _env_flag("PYSEG_SKIP_EXTENSION"):
        _log("PYSEG_SKIP_EXTENSION=1: no compiled extension (reference/Triton backends only)")
        return [], {}
    _locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

    force_cuda = _env_flag("PYSEG_FORCE_CUDA")
    skip_cuda = _env_flag("PYSEG_SKIP_CUDA")
    torch_has_cuda = torch.version.cuda is not None
    with_cuda = False
    if skip_cuda:
        reason = "PYSEG_SKIP_CUDA=1"
    elif not torch_has_cuda:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None:
        reason = "nvcc/CUDA toolkit not found (set CUDA_HOME)"
    elif force_cuda or torch.cuda.is_available():
        with_cuda = True
        reason = "PYSEG_FORCE_CUDA=1" if force_cuda else "a CUDA device is visible"
    else:
        reason = "no CUDA device visible (set PYSEG_FORCE_CUDA=1 to compile anyway)"
    if force_cuda and not with_cuda:
        raise RuntimeError(f"PYSEG_FORCE_CUDA=1 but the CUDA sources cannot be compiled: {reason}")

    debug = _env_flag("PYSEG_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # fp-contract=fast: let the compiler fuse a*b+c into FMA in the CPU kernels (ISO -std modes
    # default to off); results stay within the tests' float tolerances.
    cxx_flags = opt + ["-ffp-contract=fast"] + (["-fopenmp"] if sys.platform != "darwin" else [])
    define_macros = []  # torch defines Py_LIMITED_API itself for py_limited_api=True
    extra_link_args = ["-fopenmp"] if sys.platform != "darwin" else []
    include_dirs = [os.path.join(ROOT, "csrc")]

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
        define_macros.append(("PYSEG_WITH_CUDA", None))
        include_dirs += _pip_cuda_include_dirs()
        nvcc_flags = opt + [
            "--expt-relaxed-constexpr",
            "-lineinfo",
        ]
        ext = CUDAExtension(
            "pyseg._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
        _log(f"building pyseg._C with C++ CPU kernels {cpp_sources}")
        _log(f"building pyseg._C with CUDA kernels {cuda_sources} ({reason}); "
             f"CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext = CppExtension(
            "pyseg._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
        _log(f"building pyseg._C with C++ CPU kernels {cpp_sources}")
        _log(f"NOT building the CUDA kernels: {reason}")
    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, 16)))
    _log(f"MAX_JOBS={os.environ['MAX_JOBS']}")
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="pyseg",
    version=_version(),
    packages=find_packages(include=["pyseg", "pyseg.*"]) + ["pyseg.kernels"],
    package_dir={"pyseg.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    zip_safe=False,
)
