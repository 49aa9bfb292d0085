#!/usr/bin/env bash
# The GPU check of issue #5, as one prepared command for the lent machine (bench/README.md):
#   bench/gpu/fetch-wheels.sh here, then the device tool's
#   run(command="bash bench/gpu/run.sh", carry=[".whl"], timeout_s=590)
# Installs .whl/ into /tmp/site, then runs bench/inference.py for the real Wan2.1-T2V-1.3B shapes
# (480x832x81, 4 steps, guidance 1, medians of 3): the default fast path against stock, with the
# issue's targets; then the CUDA cases of tests/inference; then bench/parts.py's VAE decode
# variants. Each run's output goes to $OUT/<name>.txt and to stdout; a run that fails or overruns
# its limit does not stop the next, and all of them end within BUDGET_S (560) seconds of the
# start. RUNS picks other runs (the case below: parts, the lossy speed options, the step caches, ...). BENCH_ARGS
# replaces the config arguments (e.g. "--config tiny" to try the script on a CPU machine); PYTHON
# picks the interpreter (default python3, the GPU image's).
set -uo pipefail
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-560} ))  # every run ends by then: inside timeout_s=590
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-bench-out}
BENCH_ARGS=${BENCH_ARGS:---config 1.3b --repeats 3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PYTHON" -c 'import torch, diffusers, transformers, av; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), "diffusers", diffusers.__version__, "transformers", transformers.__version__, "av", av.__version__)'
  "$PYTHON" bench/inference.py $BENCH_ARGS --dry-run
} 2>&1 | tee "$OUT/environment.txt"

bench() {  # bench NAME LIMIT_S SCRIPT [arguments]: LIMIT_S, or less if the deadline is nearer
  local name=$1 limit=$2 script=$3; shift 3
  local left=$(( DEADLINE - $(date +%s) ))
  (( left < limit )) && limit=$left
  (( limit < 30 )) && { echo "=== $name: skipped, ${left} s left"; return 1; }
  echo "=== $name: $script $*"
  timeout "$limit" "$PYTHON" "$script" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc$( [ "$rc" = 124 ] && echo ", stopped at its ${limit} s limit")" | tee -a "$OUT/$name.txt"
  return "$rc"
}
# RUNS names the runs, in order (default: fast-path gpu-tests vae-variants); each ends by the deadline.
speed="--option fp8=compute --option vae_dtype=bfloat16"
for run in ${RUNS:-fast-path gpu-tests vae-variants}; do
  case $run in
    # If the compiled fast path fails, a run without compile still gives the other figures.
    fast-path) bench fast-path 210 bench/inference.py $BENCH_ARGS \
        || bench fast-path-no-compile 110 bench/inference.py $BENCH_ARGS --option compile=off ;;
    # The lossless fast path with a bfloat16 VAE, the one lossy option that moves the end to end.
    fast-bf16-vae) bench fast-bf16-vae 210 bench/inference.py $BENCH_ARGS --option vae_dtype=bfloat16 ;;
    # float16 is what vae_dtype=auto picks on CUDA; float32 was the default before it.
    fast-fp16-vae) bench fast-fp16-vae 210 bench/inference.py $BENCH_ARGS --option vae_dtype=float16 ;;
    fast-fp32-vae) bench fast-fp32-vae 210 bench/inference.py $BENCH_ARGS --option vae_dtype=float32 ;;
    # The inference tests that have a CUDA case (tests/inference, e.g. the float16 VAE's fallback).
    gpu-tests) bench gpu-tests 120 -m pytest -q -p no:django -p no:cacheprovider tests/inference -k cuda ;;
    # Attention backends and VAE decode variants, one at a time (what the defaults should be).
    parts) bench parts 120 bench/parts.py $BENCH_ARGS ;;
    vae-compile) bench vae-compile 300 bench/parts.py $BENCH_ARGS --part vae-compile ;;
    # inference/vae_speed.py's changes one by one, float32, bfloat16, float16 (vae-profile: and the top kernels).
    vae-variants) bench vae-variants 240 bench/parts.py $BENCH_ARGS --part vae-variants ;;
    vae-profile) bench vae-profile 240 bench/parts.py $BENCH_ARGS --part vae-variants --profile ;;
    # The lossy speed options together: FP8 matmuls in the transformer blocks and a bfloat16 VAE.
    speed) bench speed 210 bench/inference.py $BENCH_ARGS $speed \
        || bench speed-no-compile 110 bench/inference.py $BENCH_ARGS $speed --option compile=off ;;
    # The step caches (lossy): TaylorSeer predicts step 3 of 4; First Block Cache skips what its threshold allows.
    cache-taylorseer) bench cache-taylorseer 210 bench/inference.py $BENCH_ARGS --option cache=taylorseer ;;
    cache-first-block) bench cache-first-block 210 bench/inference.py $BENCH_ARGS --option cache=first_block ;;
    *) echo "unknown run $run"; exit 2 ;;
  esac
done
exit 0
