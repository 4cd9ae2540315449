#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on the device machine, whose image already holds torch, timm,
# transformers, pandas and scikit-learn but not these (its Python is 3.12). Run here, where pip reaches
# the registry; .whl/ is kept out of git and travels with `carry` (5.4 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    captum==0.9.0 pydicom==3.0.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls .whl
