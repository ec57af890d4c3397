#!/bin/bash
# Build .kit_gpu/kit.tar.xz: the packages benchmarks/precompute.py and benchmarks/device/gpu_check.py
# need that the lent GPU machine lacks (Python 3.12, torch, transformers, timm, einops, safetensors,
# opencv, pyarrow and numpy already there; no network), unpacked, as one archive under the 64 MiB
# that travels with a device run. Not in it: MLflow, which gpu_check does without (its docstring).
# Run from the repo root on this machine:
#   bash benchmarks/device/make_kit.sh          # then: see run_precompute.sh, gpu_check.sh
set -euo pipefail
KIT=.kit_gpu
grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude  # never committed
rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/site"
# Versions of this project's venv; cp312 manylinux wheels for the device's interpreter.
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
# scenedetect-headless (+ platformdirs): the decode step's scene cuts, on by default.
for pkg in ray diffusers decord av jsonschema referencing rpds-py jsonschema-specifications importlib_metadata \
    scenedetect-headless platformdirs; do
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2010_x86_64 \
    -d "$KIT/wheels" "$pkg==$(version $pkg)"
done
for whl in "$KIT"/wheels/*.whl; do unzip -q -o "$whl" -d "$KIT/site"; done  # unzip keeps the exec bits (gcs_server, raylet)
# What neither check loads: Ray's Java jars, RLlib, Serve, its LLM libraries and the dashboard's web build.
rm -rf "$KIT"/site/ray/jars "$KIT"/site/ray/rllib "$KIT"/site/ray/serve "$KIT"/site/ray/llm \
       "$KIT"/site/ray/dashboard/client/build
XZ_OPT=-9e tar -C "$KIT/site" -cJf "$KIT/kit.tar.xz" .  # -9e: under 64 MiB with the working tree (xz -6 gave 66.4 MB)
rm -rf "$KIT/wheels" "$KIT/site"
# What travels with a device run: the kit and the working tree (tracked files, and untracked ones git
# does not ignore), at most 64 MiB together.
tree=$( (git ls-files; git ls-files --others --exclude-standard) | { xargs -d '\n' du -cb 2>/dev/null || true; } \
  | awk '$2 == "total" {s += $1} END {print s}')
awk -v kit="$(stat -c %s "$KIT/kit.tar.xz")" -v tree="$tree" \
  'BEGIN {printf "kit %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 that travel\n", kit / 2^20, tree / 2^20, (kit + tree) / 2^20}'
