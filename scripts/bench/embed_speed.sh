#!/usr/bin/env bash
# Embedder speed: handid (Rust, tch) vs open_clip's encode_image (Python),
# same random-weight architecture, same machine, same thread count. Prints
# images/s per batch size and the ratio Rust / Python.
#
#   scripts/bench/embed_speed.sh                       # ViT-B/16, CPU, f32
#   PYTHON=/opt/torch/.venv/bin/python3 DEVICE=cuda PRECISION=f16 \
#     RUST_BIN=path/to/embed_throughput scripts/bench/embed_speed.sh   # a GPU host
#
# PYTHON must have torch 2.11.0 and open-clip-torch 3.3.0
# (scripts/fixtures/setup_venv.sh makes such a venv in .fixture-venv).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$(dirname "$here")")"
ARCH="${ARCH:-vit_b16}" DEVICE="${DEVICE:-cpu}" PRECISION="${PRECISION:-f32}"
BATCHES="${BATCHES:-1,8}" SECONDS_EACH="${SECONDS_EACH:-20}"
PYTHON="${PYTHON:-$root/.fixture-venv/bin/python}"
# One thread count for both sides (libtorch and PyTorch read these).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" MKL_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
args=(--arch "$ARCH" --device "$DEVICE" --precision "$PRECISION" --batches "$BATCHES" --seconds "$SECONDS_EACH")
out="$(mktemp)"
if [ -n "${RUST_BIN:-}" ]; then
  "$RUST_BIN" "${args[@]}" | tee -a "$out"
else
  # shellcheck source=scripts/env.sh
  source "$root/scripts/env.sh"
  (cd "$root" && cargo run --quiet --release -p handid-model --example embed_throughput -- "${args[@]}") | tee -a "$out"
fi
"$PYTHON" "$here/open_clip_embed.py" "${args[@]}" | tee -a "$out"
python3 - "$out" <<'PY'
import re, sys
rates = {}
for line in open(sys.argv[1]):
    m = re.match(r"(rust|python) batch=(\d+) images_per_s=([\d.]+)", line)
    if m:
        rates.setdefault(int(m[2]), {})[m[1]] = float(m[3])
print("\n| batch | handid (img/s) | open_clip (img/s) | ratio |\n|---:|---:|---:|---:|")
for b, r in sorted(rates.items()):
    print(f"| {b} | {r['rust']:.2f} | {r['python']:.2f} | {r['rust'] / r['python']:.2f} |")
PY
rm -f "$out"
