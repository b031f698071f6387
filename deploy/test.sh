#!/usr/bin/env bash
# One command to run the test suite: installs what is missing, then pytest against real parts.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
"$ROOT/deploy/setup.sh" --test
cd "$ROOT"
exec "${SHOAL_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
