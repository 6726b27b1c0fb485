#!/usr/bin/env bash
# GPU host check (issue #13, item 7): one script, under 8 minutes on a GPU
# host, that prints figures and PASS/FAIL lines:
#
#   1. parity: the serving code path (handid_model::Embedder::embed_images:
#      preprocessing, forward, L2 normalisation) on the GPU vs the CPU in
#      f32, on a random-weights ViT-B/16 checkpoint (`handid-trainer init
#      --arch vit-b16`) and 8 synthetic hands: max abs difference of the
#      embeddings, GPU f32 (<= 1e-4) and GPU f16 (<= 2e-2).
#   2. throughput: ViT-B/16 f16 embeddings per second at batch 1..256
#      (model/examples/embed_throughput.rs, the Embedder that
#      scripts/bench/embed_speed.sh times), and the best.
#   3. training: optimizer steps at `optim.precision: amp` of each method on
#      random-weights ViT-B/16, batch 16 (4 persons x 4 views of synthetic
#      hands): finetune (BNNeck + ArcFace, ID + triplet + center + SupCon),
#      clip_reid (configs/clip_reid_vitb16.yaml: stage-1 prompt steps, which
#      are f32 in every run, then stage-2 steps) and prompt_sg
#      (configs/prompt_sg_vitb16.yaml), through handid_trainer's
#      ImageTrainer / PromptTrainer; every loss term, finiteness, loss scale,
#      whether the weights moved, step times (trainer/examples/gpu_check.rs).
#   search (issue #16, item 6): the gallery index on the device
#      (server/examples/index_bench.rs): 1M x 512 templates, single-probe
#      latency, every answer checked against the host's exact search
#      (RESULT search_device_vs_host), and 64 concurrent callers batched
#      into one matrix product per pass against one caller (RESULT search).
#   4. server: the real `handid-server serve` with `model.device: cuda` (its
#      embedder and gallery index on the GPU) and a real PostgreSQL 15 whose
#      binaries travel in the bundle (the GPU host has none and cannot
#      download), answering Enroll, Identify and DeleteGallery over gRPC:
#      16 subjects enrolled, each enrolled image identified as its own
#      subject first at score >= 0.999, latencies p50/p99.
#   Not covered: real CLIP weights and accuracy (random weights only), a
#   whole training run (data loader, epochs, checkpoints), the Verify / Embed
#   / admin RPCs, TLS, API keys (auth is off), replicas, model reloads,
#   telemetry export, RN50, multi-GPU, and the Python references
#   (embed_speed.sh and train_speed.sh compare with open_clip / PyTorch where
#   those are installed). Part 4 needs glibc >= 2.34 and the user nobody on
#   the host (PostgreSQL refuses to run as root); otherwise it prints FAIL
#   with initdb's log and the other parts still count.
#
# The GPU host (tool `device`) has torch 2.11.0+cu130 in /opt/torch/.venv but
# no Rust toolchain, no PostgreSQL and no network. So:
#
#   # here, once per change of the sources (release build, a few minutes):
#   scripts/bench/gpu_check.sh prepare
#   # -> .device/handid-gpu-check.tar.xz (the four binaries stripped, CLIP's
#   #    BPE vocabulary, PostgreSQL 15 with the libraries ldd lists),
#   #    .device/ is added to .git/info/exclude; prints the carry size.
#
#   # then the device tool's `run` with carry [".device"], timeout_s 480 and
#   # the command (one line):
#   set -o pipefail; T=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib; TORCH_LIB=$T LD_LIBRARY_PATH=$T HANDID_LIBTORCH_CUDA=$T/libtorch_cuda.so scripts/bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
#
#   (TORCH_LIB defaults to that folder when it exists; the script puts it on
#   LD_LIBRARY_PATH and sets HANDID_LIBTORCH_CUDA=$TORCH_LIB/libtorch_cuda.so,
#   as README.md says. The parts have time limits of 75 + 75 + 150 + 120 + 120 s;
#   expect about 3 minutes on an H200, plus the machine's start. The log and
#   a summary come back in $OUT.)
#
#   # a smoke test of everything on this machine's CPU (tiny batches, f32
#   # throughput, f32 training steps since amp is CUDA-only; about 3 minutes
#   # on 2 cores; runs `prepare` first when the bundle is missing):
#   DEVICE=cpu scripts/bench/gpu_check.sh
#
# The bundle is not rebuilt by a run: after changing the sources, `prepare`
# again (the run prints the commit the bundle was built from).
# Settings: DEVICE (cuda), TORCH_LIB, PARITY_BATCH, EMBED_BATCHES,
# EMBED_SECONDS, EMBED_PRECISION, TRAIN_BATCH, TRAIN_VIEWS, TRAIN_STEPS,
# SEARCH_SIZE, SEARCH_CALLERS, ID_GALLERY, ID_PROBES, PARTS (any of
# parity,throughput,train,search,server;
# default all), KEEP=1 keeps the work folder. Exit status: 0 when every part
# passed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$(dirname "$here")")"
stage="$root/.device"
bundle="$stage/handid-gpu-check.tar.xz"
mode="${1:-run}"

# ---------------------------------------------------------------- prepare (here)
prepare() {
  # shellcheck source=scripts/env.sh
  source "$root/scripts/env.sh"
  echo "== building release binaries in $CARGO_TARGET_DIR"
  (cd "$root" && cargo build --release \
    -p handid-server --bin handid-server --example index_bench \
    -p handid-trainer --bin handid-trainer --example gpu_check \
    -p handid-model --example embed_throughput)
  local rel="$CARGO_TARGET_DIR/release" tmp
  tmp="$(mktemp -d /tmp/handid-gpu-stage.XXXXXX)"
  local top="$tmp/handid-gpu-check"
  mkdir -p "$top/bin"
  cp "$rel/handid-server" "$rel/handid-trainer" "$rel/examples/gpu_check" "$rel/examples/embed_throughput" "$rel/examples/index_bench" "$top/bin/"
  strip "$top"/bin/*
  cp -L "$HANDID_BPE_VOCAB" "$top/"

  # PostgreSQL 15 as Debian installs it, relocated under pg/ with the same
  # layout (its binaries find share/ and lib/ relative to themselves), plus
  # every shared library ldd lists except glibc's (the GPU host's is newer;
  # the C++ runtime travels too: ICU needs GLIBCXX_3.4.30). Only the
  # PostgreSQL processes get pg/libs on their library path.
  local pgbin pgver
  pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
  pgver="$(basename "$(dirname "$pgbin")")"
  local pgroot="$top/pg" pglib="/usr/lib/postgresql/$pgver/lib" pgshare="/usr/share/postgresql/$pgver"
  mkdir -p "$pgroot/usr/lib/postgresql/$pgver/bin" "$pgroot/usr/lib/postgresql/$pgver/lib" "$pgroot/usr/share/postgresql" "$pgroot/libs"
  cp "$pgbin/postgres" "$pgbin/initdb" "$pgbin/pg_ctl" "$pgroot/usr/lib/postgresql/$pgver/bin/"
  cp "$pglib/plpgsql.so" "$pglib/dict_snowball.so" "$pgroot/usr/lib/postgresql/$pgver/lib/"
  cp -r "$pgshare" "$pgroot/usr/share/postgresql/"
  rm -rf "$pgroot/usr/share/postgresql/$pgver"/{man,contrib}
  find "$pgroot/usr/share/postgresql/$pgver/extension" -type f ! -name 'plpgsql*' -delete
  ldd "$pgbin/postgres" "$pgbin/initdb" "$pgbin/pg_ctl" "$pglib/plpgsql.so" "$pglib/dict_snowball.so" \
    | awk '/=> \//{print $1, $3}' | sort -u \
    | grep -v -E '^(libc|libm|libdl|librt|libpthread|libresolv|ld-linux[^ ]*)\.so' \
    | while read -r name path; do cp -L "$path" "$pgroot/libs/$name"; done
  strip "$pgroot/usr/lib/postgresql/$pgver"/bin/* "$pgroot/libs"/* 2>/dev/null || true
  echo "$pgver" >"$pgroot/VERSION"
  {
    echo "commit $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "uncommitted_changes $(git -C "$root" status --porcelain 2>/dev/null | wc -l)"
    echo "built $(date -u +%FT%TZ)"
  } >"$top/BUILD"

  echo "== packing (xz)"
  mkdir -p "$stage"
  rm -f "$bundle"
  tar -C "$tmp" -cf - handid-gpu-check | xz -6 -T0 >"$bundle.part"
  mv "$bundle.part" "$bundle"
  rm -rf "$tmp"
  # .device/ must not be committed: ignore it in this clone only.
  local exclude
  exclude="$(git -C "$root" rev-parse --git-path info/exclude 2>/dev/null || true)"
  if [ -n "$exclude" ]; then
    case "$exclude" in /*) ;; *) exclude="$root/$exclude" ;; esac
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.device/' "$exclude" 2>/dev/null || echo '/.device/' >>"$exclude"
  fi
  local carry tree
  carry="$(du -sb "$stage" | cut -f1)"
  tree="$(cd "$root" && git ls-files -co --exclude-standard -z 2>/dev/null | xargs -0 -r du -cb 2>/dev/null | tail -n 1 | cut -f1)"
  echo "== staged $bundle"
  echo "carry .device: $((carry / 1024 / 1024)) MiB ($carry bytes); working tree: $((${tree:-0} / 1024 / 1024)) MiB; limit 64 MiB together"
  echo "device command (tool run, carry [\".device\"], timeout_s 480):"
  echo '  set -o pipefail; T=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib; TORCH_LIB=$T LD_LIBRARY_PATH=$T HANDID_LIBTORCH_CUDA=$T/libtorch_cuda.so scripts/bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log'
}

if [ "$mode" = prepare ]; then
  prepare
  exit 0
fi
[ "$mode" = run ] || { echo "usage: gpu_check.sh [prepare|run]" >&2; exit 2; }

# ---------------------------------------------------------------- run (GPU host, or DEVICE=cpu here)
DEVICE="${DEVICE:-cuda}"
if [ ! -f "$bundle" ]; then
  if command -v cargo >/dev/null; then
    prepare
  else
    echo "gpu_check: $bundle is missing: run 'scripts/bench/gpu_check.sh prepare' on the build machine and carry .device" >&2
    exit 1
  fi
fi
if [ "$DEVICE" = cpu ]; then
  : "${PARITY_BATCH:=2}" "${EMBED_BATCHES:=1,2}" "${EMBED_SECONDS:=3}" "${EMBED_PRECISION:=f32}"
  : "${TRAIN_BATCH:=4}" "${TRAIN_VIEWS:=2}" "${TRAIN_STEPS:=2}" "${ID_GALLERY:=4}" "${ID_PROBES:=8}"
  : "${SEARCH_SIZE:=20000}" "${SEARCH_CALLERS:=8}"
  scale=20 # the CPU is slow: the per-part time limits x20
else
  : "${PARITY_BATCH:=8}" "${EMBED_BATCHES:=1,16,64,128,256}" "${EMBED_SECONDS:=4}" "${EMBED_PRECISION:=f16}"
  : "${TRAIN_BATCH:=16}" "${TRAIN_VIEWS:=4}" "${TRAIN_STEPS:=3}" "${ID_GALLERY:=16}" "${ID_PROBES:=64}"
  : "${SEARCH_SIZE:=1000000}" "${SEARCH_CALLERS:=64}"
  scale=1
fi
PARTS="${PARTS:-parity,throughput,train,search,server}"
part_on() { case ",$PARTS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

TORCH_LIB="${TORCH_LIB:-}"
if [ -z "$TORCH_LIB" ] && [ -d /opt/torch/.venv/lib/python3.12/site-packages/torch/lib ]; then
  TORCH_LIB=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
fi
if [ -n "$TORCH_LIB" ]; then
  export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export HANDID_LIBTORCH_CUDA="${HANDID_LIBTORCH_CUDA:-$TORCH_LIB/libtorch_cuda.so}"
fi

work="$(mktemp -d /tmp/handid-gpu-check.XXXXXX)"
chmod 755 "$work" # PostgreSQL runs as another user and reads its binaries here
kit="$work/handid-gpu-check"
bin="$kit/bin"
ckpt="$work/vit-b16"
# PostgreSQL (part 4) runs from the bundle; initdb refuses root, so as root
# the cluster runs as nobody.
pg_data="$work/pgdata"
pg_as=""
if [ "$(id -u)" = 0 ]; then
  if command -v setpriv >/dev/null; then
    pg_as="setpriv --reuid=65534 --regid=65534 --clear-groups --"
  else
    pg_as="runuser -u nobody --"
  fi
fi
# Stops what part 4 started, also after its time limit killed it.
stop_services() {
  local pid
  pid="$(cat "$work/server.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$work/server.pid"
  if [ -f "$pg_data/postmaster.pid" ]; then
    pg_cmd pg_ctl -D "$pg_data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}
pg_cmd() {
  local pgb
  pgb="$kit/pg/usr/lib/postgresql/$(cat "$kit/pg/VERSION")/bin"
  # shellcheck disable=SC2086 # pg_as is a command prefix
  $pg_as env LD_LIBRARY_PATH="$kit/pg/libs" PATH="$pgb:/usr/bin:/bin" "$@"
}
cleanup() {
  stop_services
  if [ "${KEEP:-0}" = 1 ]; then echo "work folder kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

results="$work/results.txt"
: >"$results"
start_all=$SECONDS
note() { echo "$*" | tee -a "$results"; }
# Runs a part under its time limit; its RESULT lines go to the summary.
part() {
  local name="$1" limit="$2"
  shift 2
  echo
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS rc
  set +e
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$work/$name.out"
  rc=${PIPESTATUS[0]}
  set -e
  grep '^RESULT ' "$work/$name.out" | sed 's/^RESULT //' >>"$results" || true
  if [ "$rc" = 0 ]; then
    note "$name: ok in $((SECONDS - t0))s"
  else
    note "$name: FAIL (exit $rc$([ "$rc" = 124 ] && echo ', time limit') after $((SECONDS - t0))s)"
  fi
  return 0
}

echo "== handid GPU check: DEVICE=$DEVICE, host $(uname -n), $(nproc) cores"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
echo "TORCH_LIB=${TORCH_LIB:-(none: the RUNPATH of the binaries)}"
echo "== unpacking $(basename "$bundle") ($(du -h "$bundle" | cut -f1))"
if command -v xz >/dev/null; then
  tar -C "$work" -xJf "$bundle"
else
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="fully_trusted")' "$bundle" "$work"
fi
cat "$kit/BUILD"
export HANDID_BPE_VOCAB="$kit/bpe_simple_vocab_16e6.txt.gz"
"$bin/handid-trainer" init --arch vit-b16 --seed 0 --out "$ckpt"

part_on parity && part parity $((75 * scale)) \
  "$bin/gpu_check" parity --model "$ckpt" --device "$DEVICE" --batch "$PARITY_BATCH"

if part_on throughput; then
  part throughput $((75 * scale)) \
    "$bin/embed_throughput" --arch vit_b16 --device "$DEVICE" --precision "$EMBED_PRECISION" \
    --batches "$EMBED_BATCHES" --seconds "$EMBED_SECONDS"
  best="$(awk '/^rust batch=/{split($2,b,"=");split($3,r,"="); if (r[2]+0 > best+0) {best=r[2]; at=b[2]}} END {if (best) printf "%.1f img/s at batch %s", best, at}' "$work/throughput.out")"
  note "throughput_best vit_b16 $EMBED_PRECISION $DEVICE: ${best:-none}"
fi

part_on train && part train $((150 * scale)) \
  "$bin/gpu_check" train-steps --device "$DEVICE" --batch "$TRAIN_BATCH" --views "$TRAIN_VIEWS" \
  --steps "$TRAIN_STEPS" --configs "$root/configs"

# ---------------------------------------------------------------- search
# The gallery index on the device: SEARCH_SIZE x 512 templates, single
# probes (p50/p99), the device's answers checked against the host's exact
# search, and SEARCH_CALLERS concurrent callers batched into one matrix
# product per pass (throughput against one caller's).
part_on search && part search $((120 * scale)) \
  "$bin/index_bench" --device "$DEVICE" --sizes "$SEARCH_SIZE" --queries 64 --half false \
  --callers "$SEARCH_CALLERS" --threads "$(nproc)"

# ---------------------------------------------------------------- 4. server
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
server_check() {
  local t0=$SECONDS pgport port pid
  mkdir -p "$pg_data" "$work/pgsock"
  [ -n "$pg_as" ] && chown 65534:65534 "$pg_data" "$work/pgsock"
  echo "-- PostgreSQL $(cat "$kit/pg/VERSION") from the bundle${pg_as:+, as nobody}"
  pg_cmd initdb -D "$pg_data" -U handid --auth=trust --encoding=UTF8 --no-locale -N >"$work/initdb.log" 2>&1 \
    || { tail -n 30 "$work/initdb.log"; return 1; }
  pgport="$(free_port)"
  pg_cmd pg_ctl -D "$pg_data" -l "$work/pgsock/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $pgport -k $work/pgsock -c fsync=off -c shared_buffers=64MB" start >/dev/null \
    || { tail -n 30 "$work/pgsock/server.log"; return 1; }
  echo "-- PostgreSQL up on 127.0.0.1:$pgport after $((SECONDS - t0))s"
  port="$(free_port)"
  t0=$SECONDS
  HANDID__SERVER__LISTEN="127.0.0.1:$port" \
    HANDID__DATABASE__URL="postgres://handid@127.0.0.1:$pgport/postgres" \
    HANDID__DATABASE__MIGRATE_ON_START=true \
    HANDID__MODEL__PATH="$ckpt" HANDID__MODEL__DEVICE="$DEVICE" \
    HANDID__AUTH__ENABLED=false RUST_LOG="${RUST_LOG:-info}" \
    "$bin/handid-server" serve >"$work/server.log" 2>&1 &
  pid=$!
  echo "$pid" >"$work/server.pid"
  until "$bin/handid-server" health --addr "http://127.0.0.1:$port" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "handid-server exited:"
      tail -n 30 "$work/server.log"
      return 1
    fi
    sleep 0.5
  done
  echo "-- handid-server serving on 127.0.0.1:$port (model.device $DEVICE) $((SECONDS - t0))s after its start"
  grep -m 1 'model loaded' "$work/server.log" | sed 's/\x1b\[[0-9;]*m//g' || true
  "$bin/gpu_check" identify --server "http://127.0.0.1:$port" --gallery "$ID_GALLERY" --probes "$ID_PROBES"
  kill -TERM "$pid"
  wait "$pid" || { echo "handid-server exited with status $? after SIGTERM"; tail -n 20 "$work/server.log"; return 1; }
  rm -f "$work/server.pid"
  echo "-- handid-server drained and stopped"
}
if part_on server; then
  export -f server_check free_port pg_cmd
  export kit work bin ckpt pg_data pg_as DEVICE ID_GALLERY ID_PROBES
  part server $((120 * scale)) bash -c 'set -euo pipefail; server_check'
  stop_services
fi

echo
echo "================ handid GPU check summary (DEVICE=$DEVICE, $((SECONDS - start_all))s)"
cat "$results"
if grep -q 'FAIL' "$results"; then
  echo "RESULT: FAIL"
  status=1
else
  echo "RESULT: PASS"
  status=0
fi
[ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] && cp "$results" "$OUT/gpu_check_summary.txt"
exit "$status"
