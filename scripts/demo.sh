#!/usr/bin/env bash
# The one-command demo (README "Run the main job"): sets the machine up,
# makes a dataset, trains a small model from random weights, exports it,
# starts PostgreSQL and the gRPC server, replays the ten query/gallery
# splits through gRPC with an API key, prints the table, and stops what it
# started. About 10 minutes on a 2-core CPU.
#
#   scripts/demo.sh
#   HANDS11K_ROOT=/data/11k scripts/demo.sh          # the real 11k Hands (dorsal right)
#   HANDID_CLIP_WEIGHTS=ViT-B-16.pt scripts/demo.sh  # a real CLIP, served zero-shot
#
# Everything it writes goes to $DEMO_DIR (default: a new folder under
# /tmp, kept at the end so the report, the run and the checkpoint can be
# looked at).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
DEMO_DIR="${DEMO_DIR:-$(mktemp -d /tmp/handid-demo.XXXXXX)}"
mkdir -p "$DEMO_DIR"
started=$SECONDS
n=0
step() {
    n=$((n + 1))
    printf '\n==> [%d/8] %s  (%ds)\n' "$n" "$*" "$((SECONDS - started))"
}

step "Setting up: apt packages, libtorch 2.11, CLIP's BPE vocabulary (scripts/setup.sh)"
bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

# The dev profile is optimised (Cargo.toml) and shares its build with the
# tests, so a machine that ran them builds nothing new here.
step "Building handid-trainer and handid-server"
cargo build --quiet -p handid-trainer -p handid-server
# Private copies: another build in the shared target dir cannot swap them mid-run.
mkdir -p "$DEMO_DIR/bin"
cp "$CARGO_TARGET_DIR/debug/handid-trainer" "$CARGO_TARGET_DIR/debug/handid-server" "$DEMO_DIR/bin/"
trainer="$DEMO_DIR/bin/handid-trainer"
server="$DEMO_DIR/bin/handid-server"

step "Preparing the data and its ten query/gallery splits"
if [[ -n "${HANDS11K_ROOT:-}" ]]; then
    echo "using the 11k Hands dataset at $HANDS11K_ROOT (dorsal right, the CLIP-FH protocol)"
    "$trainer" splits --data "$HANDS11K_ROOT" --layout 11k --splits 10 --out "$DEMO_DIR/splits.tsv"
else
    echo "no HANDS11K_ROOT: generating a synthetic hand dataset (200 persons x 8 images)"
    "$trainer" synth --out "$DEMO_DIR/data" --persons 200 --images-per-person 8 --size 64 >/dev/null
    "$trainer" splits --data "$DEMO_DIR/data" --layout folder --test-fraction 0.5 --splits 10 \
        --out "$DEMO_DIR/splits.tsv"
fi

if [[ -n "${HANDID_CLIP_WEIGHTS:-}" ]]; then
    step "Importing the CLIP weights $HANDID_CLIP_WEIGHTS (served zero-shot; no training on CPU)"
    "$trainer" import --from "$HANDID_CLIP_WEIGHTS" --out "$DEMO_DIR/serving"
    step "Skipping export: the imported checkpoint is served as it is"
else
    step "Training a small ViT from random weights (configs/demo_tiny.yaml; progress per epoch)"
    "$trainer" train --config configs/demo_tiny.yaml --manifest "$DEMO_DIR/splits.tsv" \
        --out "$DEMO_DIR/run" --quiet
    step "Exporting the best checkpoint (validation on training persons) with calibrated thresholds"
    "$trainer" export --run "$DEMO_DIR/run" --out "$DEMO_DIR/serving"
fi

step "Starting PostgreSQL (throwaway cluster) and the gRPC server"
pg_env="$(scripts/pg.sh start)"
eval "$pg_env"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    scripts/pg.sh destroy "$HANDID_PG_DIR" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# One API key with the scopes the replay needs; only its SHA-256 goes into
# the settings.
api_key="hid_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
key_hash="$(printf '%s' "$api_key" | sha256sum | cut -d' ' -f1)"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# Two roles, as in production: the cluster's owner migrates; the server
# connects as handid_server, a member of handid_app (made by the migration),
# which may only append to the audit log.
"$server" migrate --database-url "$DATABASE_URL" >/dev/null
pg_bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
"$pg_bin/psql" -q "$DATABASE_URL" -c "CREATE ROLE handid_server LOGIN IN ROLE handid_app"
service_url="${DATABASE_URL/\/\/handid@/\/\/handid_server@}"
cat >"$DEMO_DIR/server.yaml" <<EOF
server:
  listen: 127.0.0.1:$port
  # The replay is one bulk client; the default per-caller rate limit
  # (100 calls/s) is meant for door readers and desks.
  rate_limit_per_second: 0
database:
  url: $service_url
model:
  path: $DEMO_DIR/serving
  device: cpu
limits:
  max_top_k: 1000
auth:
  enabled: true
  keys:
    - id: demo-replay
      sha256: $key_hash
      scopes: [identify, enroll]
EOF
"$server" serve --config "$DEMO_DIR/server.yaml" >"$DEMO_DIR/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
    if "$server" health --addr "http://127.0.0.1:$port" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "the server exited; its log:" >&2
        cat "$DEMO_DIR/server.log" >&2
        exit 1
    fi
    sleep 0.2
done
echo "server ready on 127.0.0.1:$port (log: $DEMO_DIR/server.log)"

step "Replaying the ten splits through gRPC (Enroll the gallery, Identify every query, delete)"
HANDID_API_KEY="$api_key" "$trainer" replay --server "http://127.0.0.1:$port" \
    --manifest "$DEMO_DIR/splits.tsv" --report "$DEMO_DIR/report"

printf '\nDone in %d s. Report: %s/report (report.md, report.json, report.csv, plots).\n' \
    "$((SECONDS - started))" "$DEMO_DIR"
