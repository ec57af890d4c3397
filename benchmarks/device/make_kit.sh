#!/bin/bash
# Build .kit_gpu/kit.tar.xz: the packages benchmarks/precompute.py needs that the lent GPU machine
# lacks (Python 3.12, torch, pyarrow and numpy already there; no network), unpacked, as one archive
# under the 64 MiB that travels with a device run. Run from the repo root on this machine:
#   bash benchmarks/device/make_kit.sh          # then: see run_precompute.sh
set -euo pipefail
KIT=.kit_gpu
grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude  # never committed
rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/site"
# Versions of this project's venv; cp312 manylinux wheels for the device's interpreter.
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
for pkg in ray diffusers decord av jsonschema referencing rpds-py jsonschema-specifications importlib_metadata; do
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2010_x86_64 \
    -d "$KIT/wheels" "$pkg==$(version $pkg)"
done
for whl in "$KIT"/wheels/*.whl; do unzip -q -o "$whl" -d "$KIT/site"; done  # unzip keeps the exec bits (gcs_server, raylet)
# What precompute never loads: Ray's Java jars, RLlib, Serve, its LLM libraries and the dashboard's web build.
rm -rf "$KIT"/site/ray/jars "$KIT"/site/ray/rllib "$KIT"/site/ray/serve "$KIT"/site/ray/llm \
       "$KIT"/site/ray/dashboard/client/build
XZ_OPT=-9e tar -C "$KIT/site" -cJf "$KIT/kit.tar.xz" .  # -9e: under 64 MiB with the working tree (xz -6 gave 66.4 MB)
rm -rf "$KIT/wheels" "$KIT/site"
du -h "$KIT/kit.tar.xz"
