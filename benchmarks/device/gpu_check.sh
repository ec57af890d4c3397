#!/bin/bash
# One prepared GPU check (issue 30, part 6): benchmarks/device/gpu_check.py prints one JSON line per
# result, in under 8 minutes on one H100 (what each check does: its docstring, docs/performance.md).
# On a lent GPU machine, after `bash benchmarks/device/make_kit.sh` here (nothing is downloaded there):
#   run(command="bash benchmarks/device/gpu_check.sh", carry=[".kit_gpu"], timeout_s=540)
# Anywhere, on the CPU (this checkout's .venv, no kit):
#   bash benchmarks/device/gpu_check.sh --cpu
# The JSON lines go to stdout (and $OUT/gpu_check.jsonl), the checks' own output to a log
# ($OUT/gpu_check.log, else a temporary folder), whose end is shown when a check fails.
set -uo pipefail
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -x .venv/bin/python ]; then
  PYTHON=.venv/bin/python
else  # the GPU machine: its python3 holds torch; the kit brings what it lacks
  PYTHON=python3
  if [ -f .kit_gpu/kit.tar.xz ]; then
    source benchmarks/device/unpack_kit.sh || exit $?
    echo "kit unpacked in $(( $(date +%s) - T0 )) s" >&2
  fi
fi
DIR=${OUT:-$(mktemp -d)}
LOG=$DIR/gpu_check.log
command -v nvidia-smi > /dev/null && nvidia-smi -L > "$LOG" 2>&1
"$PYTHON" benchmarks/device/gpu_check.py "$@" 2>> "$LOG" | tee "$DIR/gpu_check.jsonl"
rc=${PIPESTATUS[0]}
if [ "$rc" != 0 ]; then
  echo "--- the last lines of $LOG ---" >&2
  grep -v '^\s*$' "$LOG" | tail -40 >&2
fi
echo "gpu_check: exit $rc in $(( $(date +%s) - T0 )) s; log: $LOG" >&2
exit "$rc"
