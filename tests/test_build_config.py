"""How the build finds CUDA (build_config.py), checked as plain functions with fake toolkits: no GPU,
no real nvcc needed."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import build_config  # noqa: E402

HEADERS = build_config.REQUIRED_HEADERS


def _executable(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def fake_toolkit(folder, version="13.0", headers=("cuda_runtime.h",), compile_error=None):
    """A toolkit root with a bin/nvcc that answers -dryrun, --version and -c like the real one, and
    writes the arguments of each compile into args.log beside bin/."""
    root = os.path.join(folder, "cuda-" + version)
    for header in headers:
        os.makedirs(os.path.join(root, "include"), exist_ok=True)
        open(os.path.join(root, "include", header), "w").close()
    fail = (f'echo "probe.cu(1): {compile_error}" >&2; exit 1' if compile_error
            else 'while [ $# -gt 0 ]; do [ "$1" = -o ] && touch "$2"; shift; done; exit 0')
    _executable(os.path.join(root, "bin", "nvcc"), textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in
          *" -dryrun "*) echo '#$ _HERE_={root}/bin' >&2; echo '#$ TOP={root}/bin/..' >&2; exit 0;;
          *" --version "*) echo "Cuda compilation tools, release {version}, V{version}.88"; exit 0;;
        esac
        echo "$@" >> {root}/args.log
        {fail}
        """))
    return root


def wrapper(folder, root):
    """A script on PATH that execs the real nvcc, as /usr/local/bin/nvcc or conda's shims do."""
    return _executable(os.path.join(folder, "shim", "nvcc"), f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')


def wheels(folder, headers=HEADERS):
    """A site-packages with torch's nvidia-* wheels: nvidia/cu13/{include,lib}."""
    site = os.path.join(folder, "site-packages")
    for sub in ("include", "lib"):
        os.makedirs(os.path.join(site, "nvidia", "cu13", sub), exist_ok=True)
    for header in headers:
        open(os.path.join(site, "nvidia", "cu13", "include", header), "w").close()
    os.makedirs(os.path.join(site, "nvidia", "cudnn", "include"))  # holds none of ours
    return site


def which_from(path):
    return lambda name: path if name == "nvcc" else None


def no_nvcc(name):
    return None


def test_forced_values():
    assert build_config.parse_forced(None) is None
    assert build_config.parse_forced("") is None
    assert build_config.parse_forced("0") is False
    assert build_config.parse_forced("1") is True
    with pytest.raises(ValueError, match="LSTMFAST_CUDA must be 0 or 1, got 'yes'"):
        build_config.parse_forced("yes")


def test_parsers():
    text = "#$ _SPACE_= \n#$ TOP=/opt/cuda-13.0/bin/..\n#$ CICC_PATH=/opt/cuda-13.0/bin/../nvvm/bin\n"
    assert build_config.parse_nvcc_top(text) == os.path.realpath("/opt/cuda-13.0")
    assert build_config.parse_nvcc_top("nvcc fatal: unknown option") is None
    assert build_config.parse_nvcc_version("Cuda compilation tools, release 12.4, V12.4.131") == (12, 4)
    assert build_config.parse_nvcc_version("garbage") is None


def test_toolkit_root_from_environment_first(tmp_path):
    root = fake_toolkit(str(tmp_path))
    shim = wrapper(str(tmp_path), root)
    assert build_config.toolkit_root({"CUDA_HOME": "/opt/x"}, which_from(shim)) == (
        os.path.realpath("/opt/x"), "CUDA_HOME")
    assert build_config.toolkit_root({"CUDA_PATH": "/opt/y"}, which_from(shim)) == (
        os.path.realpath("/opt/y"), "CUDA_PATH")


def test_toolkit_root_through_a_wrapper_script(tmp_path):
    # torch's own guess from the wrapper's location would be tmp_path ("shim/.."): wrong.
    root = fake_toolkit(str(tmp_path))
    shim = wrapper(str(tmp_path), root)
    found, source = build_config.toolkit_root({}, which_from(shim), torch_guess=str(tmp_path))
    assert found == os.path.realpath(root)
    assert source == f"reported by {shim}"


def test_toolkit_root_through_a_symlink_that_cannot_dryrun(tmp_path):
    root = os.path.join(str(tmp_path), "toolkit")
    _executable(os.path.join(root, "bin", "nvcc"), "#!/bin/sh\nexit 1\n")
    os.makedirs(os.path.join(str(tmp_path), "bin"))
    link = os.path.join(str(tmp_path), "bin", "nvcc")
    os.symlink(os.path.join(root, "bin", "nvcc"), link)
    found, source = build_config.toolkit_root({}, which_from(link))
    assert found == os.path.realpath(root)
    assert "folder above" in source


def test_toolkit_root_falls_back_to_torch_then_nothing():
    assert build_config.toolkit_root({}, no_nvcc, torch_guess="/usr/local/cuda") == (
        os.path.realpath("/usr/local/cuda"), "torch's guess")
    root, why = build_config.toolkit_root({}, no_nvcc)
    assert root is None and "no CUDA toolkit found" in why


def test_wheel_dirs_and_missing_headers(tmp_path):
    site = wheels(str(tmp_path), headers=("cublas_v2.h", "cusparse.h"))
    includes, libs = build_config.wheel_dirs([site])
    assert os.path.join(site, "nvidia", "cu13", "include") in includes
    assert libs == [os.path.join(site, "nvidia", "cu13", "lib")]
    assert build_config.missing_headers(includes) == ["cuda_runtime.h"]
    assert build_config.missing_headers([]) == list(HEADERS)


def plan(tmp_path, *, forced=None, torch_cuda="13.0", environ=None, which=no_nvcc, site=None):
    sites = [site] if site else [str(tmp_path / "empty-site")]
    return build_config.plan(forced, torch_cuda, environ or {}, sites, which=which)


def test_plan_minimal_toolkit_plus_wheels_builds_cuda(tmp_path):
    # The newcomer's machine of issue 11: a wrapper nvcc, a toolkit without cuBLAS/cuSPARSE headers,
    # torch's nvidia wheels with them.
    root = fake_toolkit(str(tmp_path))
    site = wheels(str(tmp_path))
    result = plan(tmp_path, which=which_from(wrapper(str(tmp_path), root)), site=site)
    assert result.cuda, result.reason
    assert result.root == os.path.realpath(root)
    assert result.include_dirs == [os.path.join(site, "nvidia", "cu13", "include")]
    assert "CUDA 13.0 toolkit" in result.reason


def test_plan_headers_missing_everywhere_falls_back(tmp_path):
    root = fake_toolkit(str(tmp_path))
    result = plan(tmp_path, which=which_from(wrapper(str(tmp_path), root)))
    assert not result.cuda
    assert "cublas_v2.h, cusparse.h found neither" in result.reason
    message = build_config.fallback_message(result)
    assert message.startswith("lstmfast: building for the CPU only: ")
    assert "LSTMFAST_CUDA=1" in message and "\n" not in message
    assert build_config.forced_failure_message(result.reason).startswith(
        "lstmfast: LSTMFAST_CUDA=1 but the CUDA build is not possible: cublas_v2.h")


def test_plan_host_compiler_rejected_by_nvcc(tmp_path):
    root = fake_toolkit(str(tmp_path), headers=HEADERS,
                        compile_error="error -- unsupported GNU version! gcc versions later than 14")
    result = plan(tmp_path, environ={"CUDA_HOME": root})
    assert not result.cuda
    assert "test compile" in result.reason and "unsupported GNU version" in result.reason


def test_plan_version_mismatch_and_missing_pieces(tmp_path):
    root = fake_toolkit(str(tmp_path), version="12.4", headers=HEADERS)
    result = plan(tmp_path, environ={"CUDA_HOME": root})
    assert not result.cuda and "is CUDA 12.4 but torch was built with CUDA 13.0" in result.reason
    result = plan(tmp_path, environ={"CUDA_HOME": str(tmp_path / "nowhere")})
    assert not result.cuda and "no nvcc at" in result.reason
    result = plan(tmp_path)
    assert not result.cuda and "no CUDA toolkit found" in result.reason


def test_plan_cpu_torch_and_forced_cpu(tmp_path):
    root = fake_toolkit(str(tmp_path), headers=HEADERS)
    result = plan(tmp_path, torch_cuda=None, environ={"CUDA_HOME": root})
    assert not result.cuda and "CPU build" in result.reason and "CUDA build of torch" in result.remedy
    result = plan(tmp_path, forced=False, environ={"CUDA_HOME": root})
    assert not result.cuda and result.reason == "LSTMFAST_CUDA=0 asks for the CPU build"


def test_archs():
    assert build_config.cuda_archs({"TORCH_CUDA_ARCH_LIST": "9.0"}, [(8, 0)]) == ("9.0", "TORCH_CUDA_ARCH_LIST")
    assert build_config.cuda_archs({}, [(9, 0), (8, 0), (9, 0)])[0] == "8.0;9.0"
    archs, why = build_config.cuda_archs({}, [])
    assert archs == build_config.DEFAULT_ARCHS and "no GPU" in why


def _setup(env_update, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "LSTMFAST_CUDA")}
    env.update(env_update)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_setup_forced_cuda_fails_loudly_and_forced_cpu_says_so():
    # Whatever this machine has, a toolkit root that does not exist cannot give a CUDA build.
    done = _setup({"LSTMFAST_CUDA": "1", "CUDA_HOME": "/nonexistent-cuda"}, "--version")
    assert done.returncode != 0
    assert "LSTMFAST_CUDA=1 but the CUDA build is not possible" in done.stderr
    done = _setup({"LSTMFAST_CUDA": "0"}, "--version")
    assert done.returncode == 0, done.stderr
    assert "lstmfast: building for the CPU only: LSTMFAST_CUDA=0 asks for the CPU build." in done.stdout
    done = _setup({"LSTMFAST_CUDA": "2"}, "--version")
    assert done.returncode != 0 and "LSTMFAST_CUDA must be 0 or 1" in done.stderr


def test_info_reports_the_build():
    done = subprocess.run([sys.executable, "-m", "lstmfast", "info"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import lstmfast

    first = done.stdout.splitlines()[0]
    assert first.startswith(f"lstmfast {lstmfast.__version__} on torch ")
    assert ("CUDA kernels for" in first) == lstmfast.has_cuda_kernels()
    assert f"CPU kernels {lstmfast.cpu_isa()}" in first
    assert "built against torch" in done.stdout
    # A CUDA build says which persistent-kernel mode its ops will use (unset: auto).
    assert ("CUDA persistent kernels: LSTMFAST_CUDA_PERSISTENT=" in done.stdout) == lstmfast.has_cuda_kernels()


def test_probe_compiles_as_the_build_does(tmp_path):
    """The probe uses the build's C++ standard and the host compiler torch's build hands nvcc ($CC)."""
    root = fake_toolkit(str(tmp_path), headers=HEADERS)
    result = plan(tmp_path, environ={"CUDA_HOME": root, "CC": "/opt/gcc-13/bin/gcc"})
    assert result.cuda, result.reason
    with open(os.path.join(root, "args.log")) as f:
        args = f.read().split()
    assert f"-std={build_config.CXX_STANDARD}" in args
    assert args[args.index("-ccbin") + 1] == "/opt/gcc-13/bin/gcc"
    setup_py = open(os.path.join(ROOT, "setup.py")).read()
    assert "build_config.CXX_STANDARD" in setup_py and "-std=c++" not in setup_py
