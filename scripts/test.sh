#!/usr/bin/env bash
# The CI entry point (.ci/run): installs the dependencies, builds everything with warnings as
# errors, runs the unit and integration tests, then fuzzes the decoders for a bounded time.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTRACEMESH_WERROR=ON
ninja -C build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j2

# ------------------------------------------------------------------------------------------
# Fuzzing: the frame/envelope/credential decoders under libFuzzer with ASan and UBSan, for a
# bounded time (TRACEMESH_FUZZ_SECONDS, default 60). A crash fails the run.
# ------------------------------------------------------------------------------------------
bash scripts/fuzz.sh "${TRACEMESH_FUZZ_SECONDS:-60}"
