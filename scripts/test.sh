#!/usr/bin/env bash
# Run the test suite in .venv. pytest's exit code 5 (no tests collected) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# lint first (pyproject.toml [tool.ruff]): a finding fails the run like a failing test
ruff check pipeline jobs tests benchmarks || exit 1
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
