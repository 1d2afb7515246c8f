"""Builds lstmfast._C, the fused LSTM/RNN kernels, against the torch that is installed.

The CUDA sources are compiled in when torch has CUDA and a working CUDA toolkit is found (see
build_config.py for how); otherwise it builds for the CPU and prints one line saying why.
LSTMFAST_CUDA=0 forces the CPU-only build and LSTMFAST_CUDA=1 demands the CUDA one (failing with what
is missing). Build with `pip install --no-build-isolation .` so the extension links the torch that will
run it.
"""

import glob
import os
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # build_config.py, beside this file (PEP 517 backends do not add it)
import build_config  # noqa: E402

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - only hit when someone forgets --no-build-isolation
    sys.exit(
        "lstmfast: torch must be installed before building, and the build must see it: "
        "pip install torch && pip install --no-build-isolation ."
    )


def site_packages():
    """Where torch (and the nvidia-* wheels it depends on) are installed."""
    return sorted({os.path.dirname(os.path.dirname(torch.__file__)), sysconfig.get_paths()["purelib"]})


def cuda_plan():
    try:
        forced = build_config.parse_forced(os.environ.get("LSTMFAST_CUDA"))
    except ValueError as error:
        sys.exit(f"lstmfast: {error}")
    plan = build_config.plan(forced, torch.version.cuda, dict(os.environ), site_packages(),
                             torch_guess=cpp_extension.CUDA_HOME)
    if not plan.cuda:
        if forced:
            sys.exit(build_config.forced_failure_message(plan.reason))
        print(build_config.fallback_message(plan) if forced is None
              else f"lstmfast: building for the CPU only: {plan.reason}.", flush=True)
    return plan


def cublas_library(plan):
    """Path of the cuBLAS shared library to link: the toolkit's, else the one torch's wheels ship."""
    roots = [os.path.join(plan.root, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
    for root in roots + plan.library_dirs:
        found = sorted(glob.glob(os.path.join(root, "libcublas.so*")))
        if found:
            return found[0]
    sys.exit(f"lstmfast: libcublas not found under {roots + plan.library_dirs}")


def visible_gpus():
    """Compute capabilities of the GPUs visible now (empty without a GPU or a driver)."""
    try:
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken driver just means: build for the default list
        return []


BUILD_INFO = {}


class BuildExtension(cpp_extension.BuildExtension):
    """torch's extension builder (ninja), which also writes lstmfast/_build_info.py: what was built and
    why, for `python -m lstmfast info` (only when something is built, not on `setup.py --version`)."""

    def run(self):
        # In the source tree (in-place and editable builds) and, for a wheel, beside the built package
        # (build_py has copied the package by now).
        folders = [ROOT] if self.inplace else [ROOT, self.build_lib]
        for folder in folders:
            os.makedirs(os.path.join(folder, "lstmfast"), exist_ok=True)
            with open(os.path.join(folder, "lstmfast", "_build_info.py"), "w") as f:
                f.write('"""Written by setup.py: how this copy of lstmfast._C was built."""\n\n')
                f.write(f"BUILD = {BUILD_INFO!r}\n")
        super().run()


def extension():
    plan = cuda_plan()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # Default symbol visibility: a hidden copy of libstdc++'s stream templates crashed when formatting
    # error messages on a GPU machine whose compiler was newer than torch's runtime libstdc++.
    # -fopenmp: at::parallel_for is inlined from torch's headers and only runs in parallel when the
    # extension itself is compiled with OpenMP (torch's CPU builds use the OpenMP backend; the
    # libgomp.so.1 that torch loads first is the one the extension then uses).
    cxx = ["-O3", f"-std={build_config.CXX_STANDARD}", "-fopenmp"]
    extra = {"cxx": cxx}
    link = ["-fopenmp"]
    if os.environ.get("LSTMFAST_SANITIZE"):
        # e.g. LSTMFAST_SANITIZE=address,undefined (CI's sanitizer step). Linked with the same flag so
        # the module names its sanitizer runtimes; running it inside CPython still needs libasan
        # LD_PRELOADed (see .ci/run).
        sanitize = "-fsanitize=" + os.environ["LSTMFAST_SANITIZE"]
        extra["cxx"] = ["-O1", f"-std={build_config.CXX_STANDARD}", "-fopenmp", sanitize, "-fno-omit-frame-pointer", "-g"]
        link = ["-fopenmp", sanitize]
    info = BUILD_INFO
    info.update({"cuda": plan.cuda, "reason": plan.reason, "remedy": None if plan.cuda else plan.remedy,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda})
    if plan.cuda:
        # torch's build helpers take nvcc, headers and libraries from cpp_extension.CUDA_HOME.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = plan.root
        archs, why = build_config.cuda_archs(dict(os.environ), visible_gpus())
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        info.update(archs=archs, archs_reason=why)
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # No --use_fast_math: its tanh/exp approximations would cost float32 its 1e-5 agreement.
        extra["nvcc"] = ["-O3", f"-std={build_config.CXX_STANDARD}", "-lineinfo"]
        # The wheels' headers only fill what the toolkit lacks: searched after its -I folders.
        for folder in plan.include_dirs:
            extra["cxx"] += ["-isystem", folder]
            extra["nvcc"] += ["-isystem", folder]
        print(f"lstmfast: building with CUDA for {archs} ({why}); {plan.reason}", flush=True)
        return cpp_extension.CUDAExtension(
            "lstmfast._C", sources, extra_compile_args=extra,
            extra_link_args=[cublas_library(plan)] + link)
    return cpp_extension.CppExtension("lstmfast._C", sources, extra_compile_args=extra,
                                      extra_link_args=link)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
