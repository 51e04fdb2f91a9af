#!/usr/bin/env bash
# Start the shop with demo data: local or embedded PostgreSQL + Redis, migrate, seed, API + worker.
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/shop dev "$@"
