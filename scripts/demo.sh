#!/usr/bin/env bash
# Builds tracemeshd, the tracemesh CLI and the factory demo into build/, then runs the demo:
# a simulated production line publishing through a real broker that is restarted and crashed
# mid-run. Exits with the demo's status (0: nothing durable was lost). Arguments are passed to
# the demo (see build/bin/factory_demo --help).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
ninja -C build factory_demo tracemeshd tracemesh_cli
exec build/bin/factory_demo "$@"
