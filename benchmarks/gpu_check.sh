#!/usr/bin/env bash
# One-shot GPU verification: build in place with CUDA, run the test suite (CUDA tests included),
# run a small CUDA subset under compute-sanitizer memcheck, run the GPU benchmark.
# Usage: benchmarks/gpu_check.sh DIR   (logs and JSON go to DIR; needs torch with CUDA, no network)
# Each phase runs even if an earlier one failed; the exit status says whether all passed.
set -u
DIR=${1:?usage: benchmarks/gpu_check.sh DIR}
mkdir -p "$DIR"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0
phase() { echo "== $1 ($(date +%T))" | tee -a "$DIR/summary.txt"; }
result() { echo "   -> exit $1" | tee -a "$DIR/summary.txt"; [ "$1" = 0 ] || status=1; }

phase environment
{ $PY -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name())"; nvidia-smi; } > "$DIR/environment.txt" 2>&1
result $?

phase build
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-8}
[ -n "${CUDA_HOME:-}" ] || export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
LSTMFAST_CUDA=1 $PY setup.py build_ext --inplace > "$DIR/build.log" 2>&1
rc=$?; result $rc
if [ $rc != 0 ]; then tail -40 "$DIR/build.log"; exit 1; fi

phase tests
# One pytest per file, so that a crash in one cannot hide the results of the others.
for f in tests/test_*.py; do
  name=$(basename "$f" .py)
  timeout 200 $PY -m pytest "$f" -q -p no:cacheprovider -rfs --tb=short --junitxml="$DIR/$name.xml" \
    > "$DIR/$name.log" 2>&1
  rc=$?; echo "   $name: exit $rc, $(tail -1 "$DIR/$name.log")" | tee -a "$DIR/summary.txt"
  [ $rc = 0 ] || status=1
done

phase memcheck
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 7 --log-file "$DIR/memcheck.txt" \
  $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -k "memcheck_subset or non_default_stream" \
  > "$DIR/memcheck_pytest.log" 2>&1
result $?
tail -3 "$DIR/memcheck.txt" 2>/dev/null

phase benchmark
timeout 200 $PY benchmarks/gpu_bench.py --json "$DIR/gpu_bench.json" > "$DIR/gpu_bench.log" 2>&1
result $?
tail -3 "$DIR/gpu_bench.log"
exit $status
