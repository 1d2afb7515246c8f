#!/usr/bin/env bash
# One-shot GPU verification: build in place with CUDA; run the CUDA tests with the persistent kernels
# (issue 17; experimental, off by default) forced off and forced on, and the shared CUDA grids of
# test_functional / test_modules / test_ops with them forced on; compute-sanitizer memcheck, racecheck
# and synccheck on a small persistent run (memcheck also on the default path); the GPU benchmark with
# both paths against cuDNN, reporting which path ran.
# Usage: benchmarks/gpu_check.sh DIR   (logs and JSON go to DIR, e.g. benchmarks/results/persistent_h200;
#        needs torch with CUDA, no network; about 8-10 minutes on an H200, build included)
#        FULL=1 benchmarks/gpu_check.sh DIR   also runs every other test file (about 5 more minutes)
# Each phase runs even if an earlier one failed; the exit status says whether all passed.
set -u
DIR=${1:?usage: benchmarks/gpu_check.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0
phase() { echo "== $1 ($(date +%T))" | tee -a "$DIR/summary.txt"; }
result() { echo "   -> exit $1" | tee -a "$DIR/summary.txt"; [ "$1" = 0 ] || status=1; }
# run_tests NAME MODE FILE [pytest args...]: one pytest per call, so a crash cannot hide other results.
run_tests() {
  local name=$1 mode=$2 file=$3; shift 3
  LSTMFAST_CUDA_PERSISTENT=$mode timeout 240 $PY -m pytest "$file" -q -p no:cacheprovider -rfs --tb=short \
    --junitxml="$DIR/$name.xml" "$@" > "$DIR/$name.log" 2>&1
  local rc=$?
  echo "   $name (LSTMFAST_CUDA_PERSISTENT=$mode): exit $rc, $(tail -1 "$DIR/$name.log")" | tee -a "$DIR/summary.txt"
  [ $rc = 0 ] || status=1
}

phase environment
{ $PY -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name()); p = torch.cuda.get_device_properties(0); print('SMs', p.multi_processor_count, 'shared memory per block (opt-in)', getattr(p, 'shared_memory_per_block_optin', '?'), 'per SM', getattr(p, 'shared_memory_per_multiprocessor', '?'))"; nvidia-smi; git log -1 --oneline 2>/dev/null; } > "$DIR/environment.txt" 2>&1
result $?

phase build
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-8}
[ -n "${CUDA_HOME:-}" ] || export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
LSTMFAST_CUDA=1 $PY setup.py build_ext --inplace > "$DIR/build.log" 2>&1
rc=$?; result $rc
if [ $rc != 0 ]; then tail -40 "$DIR/build.log"; exit 1; fi
# What the persistent plan says for the issue's sizes on this GPU (with mode 1).
$PY - > "$DIR/persistent_plans.txt" 2>&1 <<'EOF'
import torch, lstmfast
for cell in ("lstm", "rnn"):
    for dtype in (torch.float32, torch.bfloat16):
        for H in (256, 512, 1024):
            for B in (1, 16, 64):
                for backward in (False, True):
                    plan = lstmfast.cuda_persistent_plan(cell, H, B, 512, dtype, backward=backward, mode="1")
                    print(f"{cell} {str(dtype)[6:]:9} H={H:5} B={B:3} {'bwd' if backward else 'fwd'}: {plan}")
EOF

phase "smoke: one small persistent forward + backward (60 s at most: a hang stops here)"
LSTMFAST_CUDA_PERSISTENT=1 timeout 60 $PY - > "$DIR/smoke.log" 2>&1 <<'EOF'
import torch, lstmfast
m = lstmfast.LSTM(8, 64).cuda()
x = torch.randn(20, 3, 8, device="cuda", requires_grad=True)
before = lstmfast.cuda_persistent_launches()
out, _ = m(x)
out.sum().backward()
torch.cuda.synchronize()
ran = lstmfast.cuda_persistent_launches() - before
print("persistent launches:", ran, "|", lstmfast.cuda_persistent_plan("lstm", 64, 3, 20, torch.float32))
assert ran == 2 and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
EOF
smoke=$?; result $smoke
if [ $smoke != 0 ]; then
  # Do not spend the GPU's time on timeouts: check the default path, benchmark it, stop.
  echo "   the persistent smoke run failed (smoke.log): only the default path is checked" | tee -a "$DIR/summary.txt"
  cat "$DIR/smoke.log"
  run_tests test_cuda_default 0 tests/test_cuda.py -k "not paths and not persistent"
  timeout 300 $PY benchmarks/gpu_bench.py --grid persistent --json "$DIR/gpu_bench.json" > "$DIR/gpu_bench.log" 2>&1
  exit 1
fi

phase "tests, persistent kernels off (the default) and forced on"
run_tests test_persistent_plan 0 tests/test_persistent_plan.py
run_tests test_cuda_default 0 tests/test_cuda.py
# The tests that compare the paths force each path themselves; the others run here on the persistent one.
run_tests test_cuda_persistent 1 tests/test_cuda.py -k "not paths and not persistent"
for f in functional modules ops; do
  run_tests test_${f}_persistent 1 tests/test_$f.py -k cuda
done
if [ "${FULL:-0}" = 1 ]; then
  for f in tests/test_*.py; do
    name=$(basename "$f" .py)
    case $name in test_cuda|test_persistent_plan) continue;; esac
    run_tests $name 0 "$f"
  done
fi

phase "compute-sanitizer (persistent kernels forced on)"
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
  for tool in memcheck racecheck synccheck; do
    LSTMFAST_CUDA_PERSISTENT=1 timeout 150 "$SANITIZER" --tool $tool --error-exitcode 7 \
      --log-file "$DIR/sanitizer_$tool.txt" \
      $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -k "memcheck_subset_paths and persistent" \
      > "$DIR/sanitizer_${tool}_pytest.log" 2>&1
    rc=$?; echo "   $tool: exit $rc, $(tail -1 "$DIR/sanitizer_$tool.txt" 2>/dev/null)" | tee -a "$DIR/summary.txt"
    [ $rc = 0 ] || status=1
  done
  LSTMFAST_CUDA_PERSISTENT=0 timeout 150 "$SANITIZER" --tool memcheck --error-exitcode 7 \
    --log-file "$DIR/sanitizer_memcheck_default.txt" \
    $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -k "memcheck_subset or non_default_stream" \
    > "$DIR/sanitizer_memcheck_default_pytest.log" 2>&1
  rc=$?; echo "   memcheck, default path: exit $rc" | tee -a "$DIR/summary.txt"
  [ $rc = 0 ] || status=1
else
  echo "   no compute-sanitizer at $SANITIZER: skipped (NOT verified)" | tee -a "$DIR/summary.txt"
  status=1
fi

phase "benchmark: default path, persistent kernels, cuDNN"
timeout 300 $PY benchmarks/gpu_bench.py --grid persistent --persistent --json "$DIR/gpu_bench.json" \
  > "$DIR/gpu_bench.log" 2>&1
result $?
tail -4 "$DIR/gpu_bench.log" | tee -a "$DIR/summary.txt"
exit $status
