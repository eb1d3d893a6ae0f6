#!/usr/bin/env bash
# Sets up, builds and runs every test suite; ends with "N passed, N failed".
#   scripts/test.sh            all suites (engine, slow, gimp)
#   scripts/test.sh engine     only the named suites
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh || { echo "0 passed, 1 failed"; exit 1; }

build=${BUILD_DIR:-build}
if [ ! -f "$build/build.ninja" ]; then
  meson setup "$build" -Dplugin=auto >/dev/null || { echo "0 passed, 1 failed"; exit 1; }
fi
ninja -C "$build" || { echo "0 passed, 1 failed"; exit 1; }

suites=("$@")
[ ${#suites[@]} -eq 0 ] && suites=(engine slow gimp)
args=()
for s in "${suites[@]}"; do args+=(--suite "$s"); done

log=$(mktemp)
meson test -C "$build" --print-errorlogs --num-processes 2 "${args[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# meson test's own summary: "Ok: N", "Fail: N", "Timeout: N", ...
count() { awk -v k="$1" -F: '$1 == k { gsub(/ /, "", $2); n += $2 } END { print n + 0 }' "$log"; }
passed=$(( $(count Ok) + $(count 'Expected Fail') ))
failed=$(( $(count Fail) + $(count Timeout) + $(count 'Unexpected Pass') ))
skipped=$(count Skipped)
rm -f "$log"
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
