#!/usr/bin/env bash
# A newcomer's first run, timed: clone HEAD into a temporary directory, build its venv from nothing (from
# requirements.lock, as `make` does), run `make test`, then `make demo`; print both wall times, pytest's summary
# line and the demo's verdict. Uncommitted changes are not in the clone: commit first.
#
#   scripts/fresh_clone_check.sh              # ~12 min on 2 cores; exit status 0 only if both passed
#   KEEP=1 scripts/fresh_clone_check.sh       # keep the clone and its logs (the path is printed)
set -uo pipefail

repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
    echo "note: $repo has uncommitted changes; the clone checks HEAD without them" >&2
fi
dir=$(mktemp -d /tmp/swarmnode-fresh-XXXXXX)
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$dir"' EXIT; fi
git clone -q "$repo" "$dir/swarmnode"
cd "$dir/swarmnode" || exit 1
echo "fresh clone of $(git rev-parse --short HEAD) ($(git log -1 --format=%cd --date=iso)) in $dir/swarmnode"
[ -e .venv ] && { echo "error: the clone already has a .venv" >&2; exit 1; }

minutes() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }

t0=$(date +%s)
make test > "$dir/test.log" 2>&1
test_rc=$?
t1=$(date +%s)
make demo > "$dir/demo.log" 2>&1
demo_rc=$?
t2=$(date +%s)

summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed).* in [0-9.]+s' "$dir/test.log" | tail -1)
echo "make test: exit $test_rc, $(minutes $((t1 - t0))) wall (venv from nothing included): ${summary:-no pytest summary}"
grep -E '^FAILED|^ERROR' "$dir/test.log" | head -20
echo "make demo: exit $demo_rc, $(minutes $((t2 - t1))) wall"
grep -E '^job .* (done|cancelled|paused|running)|same model hash on all|joined mid-job' "$dir/demo.log"
[ -n "${KEEP:-}" ] && echo "logs: $dir/test.log $dir/demo.log"
[ "$test_rc" -eq 0 ] && [ "$demo_rc" -eq 0 ]
