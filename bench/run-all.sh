#!/usr/bin/env bash
# Runs every benchmark of docs/benchmarks.md against its peers, in one go, and
# prints the tables. Usage: bench/run-all.sh [RUNS]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
tm=build/bin/tracemesh
[[ -x $tm ]] || { echo "build first: bash scripts/demo.sh (or ninja -C build)" >&2; exit 1; }
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
set -x
$tm bench fanin --size 128 --count 1000000 --curve off --peers --runs "$runs"
$tm bench fanin --size 128 --count 1000000 --curve on --peers --runs "$runs"
$tm bench fanout --size 128 --count 250000 --peers --runs "$runs"
$tm bench many-topics --size 128 --count 1000000 --peers --runs "$runs"
$tm bench rtt --count 10000 --peers --runs "$runs"
$tm bench rtt --count 10000 --peers --runs "$runs" --transport unix
$tm bench fanin --size 128 --count 1000000 --curve off --peers --runs "$runs" --transport unix
$tm bench fanin --size 128 --count 1000000 --curve off --peers --runs "$runs" --transport native
$tm bench fanin --size 128 --count 1000000 --curve on --peers --runs "$runs" --transport native
$tm bench rtt --count 10000 --peers --runs "$runs" --transport native --curve on
$tm bench durable --size 128 --count 300000 --peers --runs "$runs"
$tm bench durable --size 128 --count 100000 --crash
$tm bench chain --size 128 --count 1000000 --peers --runs "$runs"
$tm bench chain --size 128 --count 1000000 --peers --runs "$runs" --links native
$tm bench chain --size 128 --count 1000000 --peers --runs "$runs" --links native --transport native
$tm bench chain --size 128 --count 1000000 --curve on --peers --runs "$runs"
$tm bench chain --size 128 --count 1000000 --curve on --peers --runs "$runs" --links native
$tm bench outage --rate 2000 --outage-seconds 60
$tm bench outage --rate 2000 --outage-seconds 60 --links native
