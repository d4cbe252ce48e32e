#!/usr/bin/env bash
# Runs the demo change end to end: builds the runner, the offline base runner image, turns fixtures/demo into a git
# repository, registers it as a project with a `dev` environment, and runs its `deploy` action.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cargo build -q --bin runner
runner() { target/debug/runner "$@"; }

export RUNNER_HOME="${RUNNER_HOME:-$(mktemp -d -t runner-demo-XXXX)}"
repo="$RUNNER_HOME/demo-repo"
echo "demo: data directory $RUNNER_HOME" >&2

runner image build-base
if [ ! -d "$repo/.git" ]; then
  mkdir -p "$repo"
  cp -R fixtures/demo/. "$repo/"
  git -C "$repo" init -q -b main
  git -C "$repo" -c user.name=demo -c user.email=demo@example.com add -A
  git -C "$repo" -c user.name=demo -c user.email=demo@example.com commit -q -m "demo project"
fi
runner project create --code demo --name "Demo" --git-remote "$repo" 2>/dev/null || true
runner environment create --project demo --code dev --name "Development" 2>/dev/null || true
runner project set-properties --project demo --file fixtures/demo-properties/project.json >/dev/null
runner environment set-properties --project demo --environment dev --file fixtures/demo-properties/dev.json >/dev/null
runner secret set opschain-build-env BUILD_TOKEN=demo-build-token >/dev/null 2>&1

runner change create --project demo --environment dev --git-rev main --action deploy
echo "demo: environment properties after the change:" >&2
runner environment show-properties --project demo --environment dev
