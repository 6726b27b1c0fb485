#!/usr/bin/env bash
# The test command (README): sets everything up, starts a throwaway Postgres,
# runs the whole test suite against it, and stops it.
#
#   scripts/test.sh                 # all tests, the operator guide's walk, the Python client
#   scripts/test.sh -p handid-model # extra arguments go to `cargo test`
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$(dirname "$here")"
"$here/setup.sh"
# shellcheck source=scripts/env.sh
source "$here/env.sh"
if [ $# -gt 0 ]; then
    exec "$here/with-postgres.sh" cargo test --locked "$@"
fi
"$here/with-postgres.sh" cargo test --locked --workspace
# Every command of docs/operator-guide.md, run as an operator would.
"$here/with-postgres.sh" "$here/walk_guide.sh"
# The Python client's suite against real servers (and the gateway's
# OpenAPI document through a validator).
"$here/with-postgres.sh" "$here/test_python.sh"
# Every command of docs/clients.md (handid, Python, curl over the gateway),
# after the suite above, which makes the Python client's venv.
"$here/with-postgres.sh" env GUIDE=docs/clients.md "$here/walk_guide.sh"
