# Shared by every benchmark script: builds the release binary (unless HG names one), makes a
# work directory, and on exit stops every process whose pid is in `pids` and removes the
# directory. Source it from the repository root.

if [ -z "${HG:-}" ]; then
  cargo build --release --quiet
  HG="${CARGO_TARGET_DIR:-target}/release/heapgrid"
fi
work="$(mktemp -d "${TMPDIR:-/var/tmp}/hg-bench.XXXXXX")"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
