#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL cluster: starts it, exports
# DATABASE_URL (and HANDID_PG_DIR, PG_BIN for tests that stop and restart
# it), runs the command, then stops the cluster and deletes it, whatever the
# command's outcome.
#
#   scripts/with-postgres.sh cargo test --workspace
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -gt 0 ] || { echo "usage: scripts/with-postgres.sh COMMAND..." >&2; exit 2; }
eval "$("$here/pg.sh" start)"
trap '"$here/pg.sh" destroy "$HANDID_PG_DIR"' EXIT
PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}"
export PG_BIN
echo "[with-postgres] DATABASE_URL=$DATABASE_URL" >&2
"$@"
