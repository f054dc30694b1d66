#!/usr/bin/env bash
# Runs every test of the workspace: format and lint checks, unit, property, crash and integration
# tests, then the loom models (release, LOOM_MAX_PREEMPTIONS=2). Fails if the loom run executed
# no model. This is README's test command and what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The RESP tests (tests/it/resp.rs) drive the server with redis-cli and redis-py.
if ! command -v redis-cli >/dev/null 2>&1; then
  echo "== installing redis-tools (redis-cli)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-tools >/dev/null
fi
if ! python3 -c 'import redis' >/dev/null 2>&1; then
  echo "== installing redis-py"
  python3 -m pip install -q --disable-pip-version-check redis 2>&1 | grep -v "Running pip as the 'root' user" || true
  python3 -c 'import redis'
fi

echo "== cargo test (workspace)"
cargo test --workspace --locked --exclude heapgrid-loom-tests

echo "== loom models"
log="$(mktemp)"
RUSTFLAGS="--cfg heapgrid_loom" LOOM_MAX_PREEMPTIONS=2 \
  cargo test -p heapgrid-loom-tests --release --locked --target-dir "$target/loom" 2>&1 | tee "$log"
models=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
rm -f "$log"
if [ "$models" -eq 0 ]; then
  echo "loom: no model ran" >&2
  exit 1
fi
echo "loom: $models models passed"
