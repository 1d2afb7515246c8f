"""How the build finds a working CUDA configuration, as plain functions (no torch import) that
setup.py calls and tests/test_build_config.py checks without a GPU.

A user's machine is laid out in many ways: `nvcc` on PATH is often a wrapper script or a symlink
(conda's cuda-nvcc, module systems, /usr/local/bin shims), so the toolkit's root is asked of nvcc
itself; the cuBLAS/cuSPARSE headers torch's CUDA headers include may be missing from a minimal
toolkit but ship in the `nvidia-*` wheels that a CUDA build of torch depends on. When a CUDA build
is still impossible, the default is a CPU build with one line saying why; LSTMFAST_CUDA=1 makes it
an error instead.
"""

import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Ampere, Ada, Hopper, plus PTX that newer GPUs compile at load time.
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# The C++ standard of every source, host and CUDA (setup.py passes it to both compilers).
CXX_STANDARD = "c++20"
# torch's ATen/cuda headers include these; a toolkit or the wheels must provide each.
REQUIRED_HEADERS = ("cuda_runtime.h", "cublas_v2.h", "cusparse.h")
HOW_TO_GET_CUDA = (
    "for the CUDA kernels, install a CUDA toolkit whose major version matches torch's (its nvcc on PATH, "
    "or CUDA_HOME set to its root) and reinstall; LSTMFAST_CUDA=1 turns this fallback into an error"
)
HOW_TO_GET_CUDA_TORCH = (
    "for the CUDA kernels, install a CUDA build of torch and a matching CUDA toolkit, then reinstall"
)

Runner = Callable[..., subprocess.CompletedProcess]


def parse_forced(value: Optional[str]) -> Optional[bool]:
    """LSTMFAST_CUDA: unset or empty -> None (decide by what the machine has); "0" -> False; "1" -> True."""
    if value in (None, ""):
        return None
    if value not in ("0", "1"):
        raise ValueError(f"LSTMFAST_CUDA must be 0 or 1, got {value!r}")
    return value == "1"


def parse_nvcc_top(dryrun_output: str) -> Optional[str]:
    """The toolkit root that `nvcc -dryrun` reports on its `#$ TOP=...` line, normalized; None if absent."""
    match = re.search(r"^#\$ TOP=(.*)$", dryrun_output, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match and match.group(1).strip() else None


def parse_nvcc_version(version_output: str) -> Optional[Tuple[int, int]]:
    """(major, minor) from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    match = re.search(r"release (\d+)\.(\d+)", version_output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _run(run: Runner, args: Sequence[str]) -> Optional[str]:
    try:
        done = run(list(args), capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout or "") + (done.stderr or "")


def toolkit_root(environ: Dict[str, str], which: Callable[[str], Optional[str]] = shutil.which,
                 run: Runner = subprocess.run, torch_guess: Optional[str] = None
                 ) -> Tuple[Optional[str], str]:
    """(root, where it came from): CUDA_HOME or CUDA_PATH when set; else the root nvcc on PATH reports
    (a wrapper script's real toolkit); else the directory above a resolved nvcc; else torch's guess."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            return os.path.realpath(environ[var]), var
    nvcc = which("nvcc")
    if nvcc:
        output = _run(run, [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull])
        top = parse_nvcc_top(output or "")
        if top:
            return top, f"reported by {nvcc}"
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"the folder above {nvcc}"
    if torch_guess:
        return os.path.realpath(torch_guess), "torch's guess"
    return None, "no CUDA toolkit found (no CUDA_HOME, CUDA_PATH or nvcc on PATH)"


def wheel_dirs(site_packages: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Include and library folders of the nvidia-* wheels (nvidia/cu13/include, nvidia/cublas/include,
    ...) installed beside torch."""
    includes, libs = [], []
    for site in site_packages:
        includes += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
        libs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
    return includes, libs


def missing_headers(include_dirs: Sequence[str], headers: Sequence[str] = REQUIRED_HEADERS) -> List[str]:
    return [h for h in headers if not any(os.path.isfile(os.path.join(d, h)) for d in include_dirs)]


PROBE_SOURCE = "".join(f"#include <{h}>\n" for h in REQUIRED_HEADERS) + (
    "__global__ void lstmfast_probe(float* x) { x[threadIdx.x] += 1.0f; }\n"
)


def probe_compile(nvcc: str, include_dirs: Sequence[str], system_dirs: Sequence[str] = (),
                  run: Runner = subprocess.run, host_compiler: Optional[str] = None) -> Optional[str]:
    """Compiles a tiny CUDA file as the build compiles its CUDA sources: the same C++ standard, the
    host compiler the build will use (torch's build passes $CC to nvcc as -ccbin), the headers
    searched in the same order (include_dirs, then system_dirs). None when it works, else nvcc's
    first error line (an unsupported host compiler, a header missing, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        with open(source, "w") as f:
            f.write(PROBE_SOURCE)
        args = [nvcc, f"-std={CXX_STANDARD}", "-c", source, "-o", os.path.join(tmp, "probe.o")]
        if host_compiler:
            args += ["-ccbin", host_compiler]
        args += [f"-I{d}" for d in include_dirs]
        for folder in system_dirs:
            args += ["-isystem", folder]
        try:
            done = run(args, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as error:
            return f"{nvcc} could not run ({error})"
    if done.returncode == 0:
        return None
    lines = [l.strip() for l in ((done.stderr or "") + (done.stdout or "")).splitlines() if l.strip()]
    errors = [l for l in lines if "error" in l.lower()]
    return (errors or lines or [f"exit status {done.returncode}"])[0]


def cuda_archs(environ: Dict[str, str], visible: Sequence[Tuple[int, int]]) -> Tuple[str, str]:
    """(TORCH_CUDA_ARCH_LIST value, why): the user's setting; else the GPUs visible at build time (one
    architecture each compiles fastest); else the default list."""
    if environ.get("TORCH_CUDA_ARCH_LIST"):
        return environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"
    if visible:
        return ";".join(f"{major}.{minor}" for major, minor in sorted(set(visible))), \
            "the GPUs visible at build time"
    return DEFAULT_ARCHS, "the default list: no GPU visible at build time"


@dataclass
class CudaPlan:
    """What setup.py builds: `cuda` says whether with the CUDA kernels, `reason` why (one line)."""

    cuda: bool
    reason: str
    remedy: str = HOW_TO_GET_CUDA
    root: Optional[str] = None
    include_dirs: List[str] = field(default_factory=list)  # the wheels', searched after the toolkit's
    library_dirs: List[str] = field(default_factory=list)


def plan(forced: Optional[bool], torch_cuda: Optional[str], environ: Dict[str, str],
         site_packages: Sequence[str], torch_guess: Optional[str] = None,
         which: Callable[[str], Optional[str]] = shutil.which, run: Runner = subprocess.run) -> CudaPlan:
    """Decides CPU or CUDA. Every check a CUDA build needs runs here, before any compiling, so a
    problem means a clear fallback (or, with forced=True, a clear error) instead of a failed build."""
    if forced is False:
        return CudaPlan(False, "LSTMFAST_CUDA=0 asks for the CPU build")
    if torch_cuda is None:
        return CudaPlan(False, "the installed torch is a CPU build",
                        HOW_TO_GET_CUDA_TORCH)
    root, source = toolkit_root(environ, which, run, torch_guess)
    if root is None:
        return CudaPlan(False, source)
    nvcc = os.path.join(root, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        return CudaPlan(False, f"no nvcc at {nvcc} (toolkit root {root}, {source})", root=root)
    version = parse_nvcc_version(_run(run, [nvcc, "--version"]) or "")
    wanted = parse_nvcc_version(f"release {torch_cuda}")
    if version is None or wanted is None or version[0] != wanted[0]:
        found = "unknown" if version is None else f"{version[0]}.{version[1]}"
        return CudaPlan(False, f"{nvcc} is CUDA {found} but torch was built with CUDA {torch_cuda}", root=root)
    wheel_includes, wheel_libs = wheel_dirs(site_packages)
    # Only the wheels' folders that hold a header we need (cudnn, nccl, ... stay out of the way).
    wheel_includes = [d for d in wheel_includes if len(missing_headers([d])) < len(REQUIRED_HEADERS)]
    toolkit_includes = [os.path.join(root, "include")]
    missing = missing_headers(toolkit_includes + wheel_includes)
    if missing:
        return CudaPlan(False, f"{', '.join(missing)} found neither in {root}/include nor in torch's "
                               f"nvidia-* wheels", root=root)
    problem = probe_compile(nvcc, toolkit_includes, wheel_includes, run, environ.get("CC"))
    if problem:
        return CudaPlan(False, f"a test compile with {nvcc} failed: {problem}", root=root)
    return CudaPlan(True, f"CUDA {version[0]}.{version[1]} toolkit at {root} ({source})", root=root,
                    include_dirs=wheel_includes, library_dirs=wheel_libs)


def fallback_message(plan: CudaPlan) -> str:
    """The one line a default build prints when it falls back to the CPU."""
    return f"lstmfast: building for the CPU only: {plan.reason}; {plan.remedy}."


def forced_failure_message(reason: str) -> str:
    return f"lstmfast: LSTMFAST_CUDA=1 but the CUDA build is not possible: {reason}."
