#!/usr/bin/env bash
# One command to run Shoal: installs what is missing, then `shoal up` (embedded NATS + every service).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
"$ROOT/deploy/setup.sh"
exec "${SHOAL_VENV:-$ROOT/.venv}/bin/shoal" up "$@"
