#!/bin/bash
# Sourced on the lent GPU machine by run_precompute.sh and gpu_check.sh: unpack the kit
# (make_kit.sh) into /tmp/site and put it on the interpreter's path. Returns non-zero on failure.
mkdir -p /tmp/site && tar -C /tmp/site -xJf .kit_gpu/kit.tar.xz || return 3
# A .pth in the interpreter's own site-packages, not PYTHONPATH alone: it reaches Ray's workers and
# the decoder children whatever env_vars a runtime_env sets.
python3 -c "import site; open(site.getsitepackages()[0] + '/zz_kit.pth', 'w').write('/tmp/site\n')" || return 4
