#!/usr/bin/env bash
# Training throughput: handid's stage-2 step (Rust, tch) vs the same step in
# PyTorch, same random-weight architecture, batch, losses, optimizer and
# thread count. Prints images/s per batch size and the ratio Rust / Python,
# plus each side's peak resident memory.
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
PYTHON="${PYTHON:-$root/.fixture-venv/bin/python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" MKL_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
args=(--arch "$ARCH" --device "$DEVICE" --batches "$BATCHES" --seconds "$SECONDS_EACH")
out="$(mktemp)"
if [ -n "${RUST_BIN:-}" ]; then
  "$RUST_BIN" "${args[@]}" | tee -a "$out"
else
  # shellcheck source=scripts/env.sh
  source "$root/scripts/env.sh"
  (cd "$root" && cargo run --quiet --release -p handid-trainer --example train_throughput -- "${args[@]}") | tee -a "$out"
fi
"$PYTHON" "$here/torch_train_step.py" "${args[@]}" | tee -a "$out"
python3 - "$out" <<'PY'
import re, sys
rates, mem = {}, {}
for line in open(sys.argv[1]):
    m = re.match(r"(rust|python) batch=(\d+) images_per_s=([\d.]+).*peak_rss_mib=(\d+)", line)
    if m:
        rates.setdefault(int(m[2]), {})[m[1]] = float(m[3])
        mem.setdefault(int(m[2]), {})[m[1]] = int(m[4])
print("\n| batch | handid (img/s) | PyTorch (img/s) | ratio | peak RSS handid / PyTorch (MiB) |")
print("|---:|---:|---:|---:|---:|")
for b, r in sorted(rates.items()):
    print(f"| {b} | {r['rust']:.2f} | {r['python']:.2f} | {r['rust'] / r['python']:.2f} | "
          f"{mem[b]['rust']} / {mem[b]['python']} |")
PY
rm -f "$out"
