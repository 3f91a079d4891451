#!/bin/bash
# The GPU measurements, run on a machine with a CUDA device, from the repository root,
# with the wheels of fetch_wheels.sh in .whl/:
#   bash benchmarks/device/run_checks.sh STAGE...     (stages run in the order given)
# Stages (default timeout in seconds, each enforced by `timeout`):
#   laplace  benchmarks/laplace_vs_laplace_torch.py --device cuda, images task
#            at GPU size (20k training rows, 5k test rows), four
#            configurations, both libraries                                     [300]
#   cvp      benchmarks/cvp_vs_sampling.py --device cuda                       [60]
#   tests    the whole test suite on CUDA (device="auto" picks the GPU)      [150]
#   compare  benchmarks/compare.py --device cuda (COMPARE_SEEDS, default 1)    [480]
# e.g. `run_checks.sh laplace cvp tests`, then `run_checks.sh compare`.
# Timeouts: STAGE_TIMEOUT_<stage>=seconds. Everything the stages write (logs and
# benchmarks/results/*cuda*) is packed into $OUT/device_results.tgz, plus
# $OUT/run.log; a stage that fails or times out does not stop the next one.
set -u
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT" /tmp/device_logs
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed: run fetch_wheels.sh here first"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
python3 - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, torch.cuda.get_device_name(0))
import laplace, skorch, skuq  # noqa: F401  the carried wheels and the package import
PY
stage_timeout() { local v="STAGE_TIMEOUT_$1"; echo "${!v:-$2}"; }
stage() {  # name, default timeout, command...
    local name=$1 secs; secs=$(stage_timeout "$1" "$2"); shift 2
    echo "=== $name (timeout ${secs}s) $(date -u +%T)"
    timeout "$secs" "$@" > "/tmp/device_logs/$name.log" 2>&1
    echo "=== $name rc=$? $(date -u +%T)"; tail -25 "/tmp/device_logs/$name.log"
}
for s in "$@"; do
    case $s in
        tests) stage tests 150 python3 -m pytest -q -n 8 -p no:cacheprovider ;;
        cvp) stage cvp 60 python3 benchmarks/cvp_vs_sampling.py --device cuda \
            --out /tmp/device_logs/cvp_cuda ;;
        laplace) stage laplace 300 python3 benchmarks/laplace_vs_laplace_torch.py \
            --device cuda --tasks images --n-train 20000 --n-test 5000 --batch-size 64 \
            --configs all:kron,all:diag,last_layer:full,last_layer:kron \
            --fit-budget 45 --predict-budget 15 --timeout 75 --repeats 1 ;;
        compare) stage compare 480 python3 benchmarks/compare.py --device cuda \
            --seeds "${COMPARE_SEEDS:-1}" --no-plots ;;
        *) echo "unknown stage $s (tests, cvp, laplace, compare)" ;;
    esac
done
tar czf "$OUT/device_results.tgz" /tmp/device_logs benchmarks/results/*cuda* 2>/dev/null
ls -la "$OUT"
