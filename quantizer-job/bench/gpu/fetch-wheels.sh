#!/usr/bin/env bash
# Downloads into .whl/ the wheels compare.sh installs on the GPU machine:
# llm-compressor 0.14.0.1 and what the device image lacks (see README.md
# beside this script for why each one). Python 3.12, x86-64 Linux.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$repo"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
for wheel in llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19 auto-round==0.15.1 loguru==0.7.3 pydantic==2.13.5 \
    pydantic-core==2.46.5 annotated-types==0.8.0 typing-inspection==0.4.2; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$wheel"
done
ls -la .whl
