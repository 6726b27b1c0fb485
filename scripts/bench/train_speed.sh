#!/usr/bin/env bash
# Training throughput: handid's stage-2 step (Rust, tch) vs the same step in
# PyTorch, same random-weight architecture, batch, losses, optimizer and
# thread count. Prints images/s per batch size and the ratio Rust / Python,
# plus each side's peak resident memory; ROUNDS alternating runs (default 3).
#
#   scripts/bench/train_speed.sh                         # ViT-B/16, CPU, batches 2 and 8
#   PYTHON=/opt/torch/.venv/bin/python3 DEVICE=cuda BATCHES=32,64 \
#     RUST_BIN=path/to/train_throughput scripts/bench/train_speed.sh   # a GPU host
#
# PYTHON needs torch 2.11.0 and open-clip-torch 3.3.0
# (scripts/fixtures/setup_venv.sh makes such a venv in .fixture-venv).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$(dirname "$here")")"
ARCH="${ARCH:-vit_b16}" DEVICE="${DEVICE:-cpu}" BATCHES="${BATCHES:-2,8}" SECONDS_EACH="${SECONDS_EACH:-30}"
# Rounds alternate handid and PyTorch so that load from other processes on a
# shared machine hits both sides alike; the summary takes medians.
ROUNDS="${ROUNDS:-3}"
PYTHON="${PYTHON:-$root/.fixture-venv/bin/python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" MKL_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
args=(--arch "$ARCH" --device "$DEVICE" --batches "$BATCHES" --seconds "$SECONDS_EACH")
out="$(mktemp)"
if [ -z "${RUST_BIN:-}" ]; then
  # shellcheck source=scripts/env.sh
  source "$root/scripts/env.sh"
  (cd "$root" && cargo build --quiet --release -p handid-trainer --example train_throughput)
  RUST_BIN="$CARGO_TARGET_DIR/release/examples/train_throughput"
fi
for round in $(seq "$ROUNDS"); do
  echo "# round $round of $ROUNDS"
  "$RUST_BIN" "${args[@]}" | tee -a "$out"
  "$PYTHON" "$here/torch_train_step.py" "${args[@]}" 2> >(grep -v "No pretrained weights" >&2) | tee -a "$out"
done
python3 - "$out" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r"(rust|python) batch=(\d+) images_per_s=([\d.]+).*best_step_s=([\d.]+).*peak_rss_mib=(\d+)", line)
    if m:
        r = runs.setdefault(int(m[2]), {}).setdefault(m[1], {"rate": [], "best": [], "rss": []})
        r["rate"].append(float(m[3]))
        r["best"].append(float(m[4]))
        r["rss"].append(int(m[5]))
print("\n| batch | handid img/s (median) | PyTorch img/s (median) | ratio | ratio of best steps | peak RSS handid / PyTorch (MiB) |")
print("|---:|---:|---:|---:|---:|---:|")
for b, r in sorted(runs.items()):
    rust, py = r["rust"], r["python"]
    rate_r, rate_p = statistics.median(rust["rate"]), statistics.median(py["rate"])
    print(f"| {b} | {rate_r:.3f} | {rate_p:.3f} | {rate_r / rate_p:.2f} | "
          f"{min(py['best']) / min(rust['best']):.2f} | {max(rust['rss'])} / {max(py['rss'])} |")
PY
rm -f "$out"
