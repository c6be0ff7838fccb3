#!/usr/bin/env bash
# The CI entry point (.ci/run): installs the dependencies, builds everything with warnings as
# errors, and runs the unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTRACEMESH_WERROR=ON
ninja -C build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j2

# ------------------------------------------------------------------------------------------
# Fuzzing (libFuzzer targets, -DTRACEMESH_FUZZ=ON, see scripts/fuzz.sh): the fuzz step goes here.
# ------------------------------------------------------------------------------------------
