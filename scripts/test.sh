#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
DPO_DS_FOR_TESTS=1 bash scripts/setup.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests -q -ra "$@"
