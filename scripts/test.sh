#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the tests:
#   scripts/test.sh              the whole suite, slow tests included (CI): the fast tests run first
#   scripts/test.sh --fast       only the fast unit tests: in-process, no launcher, no `slow` test
#   scripts/test.sh [--fast] ARG...   ARGs go to pytest: a file (tests/test_losses.py), -k NAME, -x, ...
set -euo pipefail
cd "$(dirname "$0")/.."
markers=()
if [ "${1:-}" = --fast ]; then
  markers=(-m "not slow")
  shift
fi
targets=(tests)
for arg in "$@"; do
  case "$arg" in tests/*|./tests/*) targets=() ;; esac  # a file or test named: run that, not all of tests/
done
DPO_DS_FOR_TESTS=1 bash scripts/setup.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "${targets[@]}" -q -ra "${markers[@]}" "$@"
