"""Builds lstmfast._C, the fused LSTM/RNN kernels, against the torch that is installed.

The CUDA sources are compiled in when torch has CUDA and a CUDA toolkit is found; LSTMFAST_CUDA=0
forces a CPU-only build and LSTMFAST_CUDA=1 demands the CUDA one (failing clearly without a toolkit).
Build with `pip install --no-build-isolation .` so the extension links the torch that will run it.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - only hit when someone forgets --no-build-isolation
    sys.exit(
        "lstmfast: torch must be installed before building, and the build must see it: "
        "pip install torch && pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    forced = os.environ.get("LSTMFAST_CUDA")
    if forced not in (None, "", "0", "1"):
        sys.exit(f"lstmfast: LSTMFAST_CUDA must be 0 or 1, got {forced!r}")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if forced == "1" and not available:
        sys.exit(
            "lstmfast: LSTMFAST_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}. "
            "Install a CUDA-enabled torch and set CUDA_HOME to the toolkit's root."
        )
    if forced == "0":
        return False
    return available


def cublas_library():
    """Path of the cuBLAS shared library to link: the toolkit's, else the one torch's wheel ships."""
    roots = [os.path.join(cpp_extension.CUDA_HOME, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
    site = os.path.dirname(os.path.dirname(torch.__file__))
    roots += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, "libcublas.so*")))
        if found:
            return found[0]
    sys.exit(f"lstmfast: libcublas not found under {roots}")


def extension():
    cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # Default symbol visibility: a hidden copy of libstdc++'s stream templates crashed when formatting
    # error messages on a GPU machine whose compiler was newer than torch's runtime libstdc++.
    # -fopenmp: at::parallel_for is inlined from torch's headers and only runs in parallel when the
    # extension itself is compiled with OpenMP (torch's CPU builds use the OpenMP backend; the
    # libgomp.so.1 that torch loads first is the one the extension then uses).
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    extra = {"cxx": cxx}
    link = ["-fopenmp"]
    if os.environ.get("LSTMFAST_SANITIZE"):
        # e.g. LSTMFAST_SANITIZE=address,undefined (CI's sanitizer step). Linked with the same flag so
        # the module names its sanitizer runtimes; running it inside CPython still needs libasan
        # LD_PRELOADed (see .ci/sanitize).
        sanitize = "-fsanitize=" + os.environ["LSTMFAST_SANITIZE"]
        extra["cxx"] = ["-O1", "-std=c++20", "-fopenmp", sanitize, "-fno-omit-frame-pointer", "-g"]
        link = ["-fopenmp", sanitize]
    if cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # Default architectures: Ampere, Ada, Hopper, plus PTX for newer GPUs. TORCH_CUDA_ARCH_LIST
        # (read by torch's build helpers) overrides it.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
        # No --use_fast_math: its tanh/exp approximations would cost float32 its 1e-5 agreement.
        extra["nvcc"] = ["-O3", "-std=c++20", "-lineinfo"]
        print(f"lstmfast: building with CUDA for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        return cpp_extension.CUDAExtension(
            "lstmfast._C", sources, extra_compile_args=extra, extra_link_args=[cublas_library()] + link
        )
    print("lstmfast: building for the CPU only")
    return cpp_extension.CppExtension("lstmfast._C", sources, extra_compile_args=extra,
                                      extra_link_args=link)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
