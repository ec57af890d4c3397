#!/bin/bash
# On the lent GPU machine: unpack the kit (make_kit.sh), check that a Ray GPU task imports the
# pipeline, then benchmarks/precompute.py with the whole process tree on 2 cores and the encoder on
# the GPU (issue 12's steady-throughput target: ratio >= 0.8 on 2 cores). From this machine:
#   run(command="bash benchmarks/device/run_precompute.sh --videos 25", carry=[".kit_gpu"], timeout_s=540)
# Writes gpu.txt, precheck.log, bench.json, bench.err and gpu_use.txt under $OUT.
export PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi -L | tee "$OUT/gpu.txt"
source benchmarks/device/unpack_kit.sh || exit $?
export PYTHONPATH=$PWD
echo "unpacked in $(( $(date +%s) - T0 )) s"
timeout 120 taskset -c 0,1 python3 - > "$OUT/precheck.log" 2>&1 <<'PY' || { tail -20 "$OUT/precheck.log"; exit 5; }
import os
import pipelines  # noqa: F401  (first: it sets RAY_AUTH_MODE before ray is imported)
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
print("ray resources", ray.cluster_resources())
@ray.remote(num_gpus=1)
def probe():
    import decord, av, diffusers, torch  # noqa: F401
    import pipelines.data.latent_encoder  # noqa: F401
    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available(), sorted(os.sched_getaffinity(0))
print("gpu task sees", ray.get(probe.remote(), timeout=90))
PY
tail -3 "$OUT/precheck.log"
(while sleep 3; do echo "$(date +%T) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"; done > "$OUT/gpu_use.txt" 2>&1) &
MONITOR=$!
set -o pipefail
timeout "${BENCH_TIMEOUT:-420}" taskset -c 0,1 python3 benchmarks/precompute.py --num-cpus 2 "$@" 2> "$OUT/bench.err" | tee "$OUT/bench.json"
echo "bench rc=$? at $(( $(date +%s) - T0 )) s"
kill $MONITOR
tail -c 2000 "$OUT/bench.err"
sort -k3 -n "$OUT/gpu_use.txt" | tail -2
