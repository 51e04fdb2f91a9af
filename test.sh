#!/usr/bin/env bash
# Run the whole test suite against real PostgreSQL and Redis (local servers, or embedded ones).
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/pytest "$@"
