#!/usr/bin/env bash
# Runs the whole test suite, after making the machine ready (Docker, busybox-static, the static agent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec cargo test --workspace --no-fail-fast "$@"
