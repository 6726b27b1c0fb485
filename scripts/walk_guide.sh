#!/usr/bin/env bash
# Walks docs/operator-guide.md as an operator would, so the guide cannot
# drift from the code: every fenced block opened with "```sh walk" runs, in
# the guide's order, in one bash shell (variables and the background server
# carry over from block to block), and every hidden check
# "<!-- walk-check: COMMAND -->" runs where it stands. The first command that
# fails stops the walk, naming the guide's line.
#
# The guide's commands use a few variables, set here for a throwaway
# installation (the guide's "Before you start" lists them): HANDID_HOME (the
# server's files), OWNER_URL (the schema owner's connection), SERVICE_URL
# (the service login's), NEW_DATABASE_URL (an empty database to restore
# into), MANIFEST (a labelled split manifest), ARCH (tiny-vit here instead of
# vit-b16) and PORT.
#
#   scripts/with-postgres.sh scripts/walk_guide.sh     # (scripts/test.sh runs it)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
# shellcheck source=scripts/env.sh
source "$here/env.sh"
: "${DATABASE_URL:?run under scripts/with-postgres.sh}"
guide="${GUIDE:-docs/operator-guide.md}"

cargo build --locked --quiet -p handid-server -p handid-client -p handid-trainer --bins
bin="${CARGO_TARGET_DIR:-$root/target}/debug"
pg_bin="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}"

work="$(mktemp -d -t handid-walk.XXXXXX)"
cleanup() {
    # A server the walk left running (a failed block) is stopped.
    pkill -TERM -f "handid-server serve --config $work/" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

export PATH="$bin:$pg_bin:$PATH"
export HANDID_HOME="$work/srv"
export OWNER_URL="$DATABASE_URL"
export SERVICE_URL="${DATABASE_URL/\/\/handid@/\/\/handid_server@}"
export NEW_DATABASE_URL="${DATABASE_URL%/*}/handid_restored"
export ARCH=tiny-vit
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export PORT
export HANDID_ADDR="http://127.0.0.1:$PORT"
export RUST_LOG=warn
mkdir -p "$HANDID_HOME"
psql -q "$OWNER_URL" -c "CREATE DATABASE handid_restored"

# A small labelled dataset and its splits, for calibrate and replay.
handid-trainer synth --out "$work/data" --persons 12 --images-per-person 4 --size 64 >/dev/null
handid-trainer splits --data "$work/data" --layout folder --test-fraction 0.5 --splits 10 \
    --out "$work/splits.tsv" >/dev/null
export MANIFEST="$work/splits.tsv"

# The guide's blocks and checks, in order, as one script.
python3 - "$guide" "$work/walk.sh" <<'EOF'
import re, shlex, sys
guide, out = sys.argv[1], sys.argv[2]
lines = open(guide, encoding="utf-8").read().split("\n")
script, block, blocks, checks = [], None, 0, 0
for number, line in enumerate(lines, 1):
    if block is not None:
        if line.strip() == "```":
            script.append(f'echo "[walk] {guide}:{block}"')
            script.append("\n".join(body))
            block = None
        else:
            body.append(line[indent:] if line[:indent].strip() == "" else line)
        continue
    opening = re.match(r"^(\s*)```sh walk\s*$", line)
    if opening:
        block, indent, body = number, len(opening.group(1)), []
        blocks += 1
        continue
    check = re.match(r"^\s*<!-- walk-check: (.*) -->\s*$", line)
    if check:
        command = check.group(1)
        where = shlex.quote(f"{guide}:{number}: {command}")
        script.append(f'( {command} ) || {{ echo "[walk] check failed at "{where} >&2; exit 1; }}')
        checks += 1
if block is not None:
    sys.exit(f"{guide}:{block}: a walk block is never closed")
if blocks == 0:
    sys.exit(f"{guide}: no ```sh walk blocks")
open(out, "w", encoding="utf-8").write("set -euo pipefail\n" + "\n".join(script) + "\n")
print(f"[walk] {blocks} blocks and {checks} checks from {guide}")
EOF

cd "$work"
started=$SECONDS
timeout 900 bash "$work/walk.sh"
echo "[walk] the operator guide walked in $((SECONDS - started)) s"
