#!/usr/bin/env bash
# Identify's search: handid's gallery index vs FAISS IndexFlatIP (PyPI
# faiss-cpu) on the same vectors, same machine, same thread count and k, in
# alternated rounds (handid first in odd rounds, FAISS first in even ones);
# the summary gives per gallery size the medians over rounds of each side's
# p50, the ratio FAISS / handid (> 1: handid is faster), the effective read
# rate next to the machine's measured copy rate, a batch of 16 probes in one
# call on both sides, and handid's 16-caller throughput ratio.
#
#   scripts/bench/index_speed.sh                       # 100k and 1M, 3 rounds
#   SIZES=10000,100000 ROUNDS=5 scripts/bench/index_speed.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$(dirname "$here")")"
SIZES="${SIZES:-100000,1000000}" K="${K:-10}" ROUNDS="${ROUNDS:-3}" QUERIES="${QUERIES:-64}"
THREADS="${THREADS:-$(nproc)}"
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
# FAISS at its best: OpenMP on every core, and none of the OPENBLAS_*
# tuning variables, which slow current numpy and FAISS builds.
for v in $(env | grep -o '^OPENBLAS_[A-Z_]*' || true); do unset "$v"; done
export OMP_NUM_THREADS="$THREADS"
venv="$HANDID_CACHE/bench-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c 'import faiss' 2>/dev/null || "$venv/bin/pip" install -q "faiss-cpu==1.*" "numpy<3"
(cd "$root" && cargo build --quiet --release -p handid-server --example index_bench)
bench="$CARGO_TARGET_DIR/release/examples/index_bench"
data="$(mktemp -d)"
trap 'rm -rf "$data"' EXIT
out="$data/results.txt"
handid() {
  "$bench" --sizes "$SIZES" --k "$K" --queries "$QUERIES" --threads "$THREADS" --half true --callers 16 "$@" |
    sed "s/^/round=$r /" | tee -a "$out"
}
faiss() {
  "$venv/bin/python" "$here/faiss_search.py" --dir "$data" --sizes "$SIZES" --k "$K" --batch 16 |
    sed "s/^/round=$r /" | tee -a "$out"
}
for r in $(seq 1 "$ROUNDS"); do
  if [ "$r" = 1 ]; then
    handid --export "$data"   # the vectors FAISS reads (the same every round: fixed seeds)
    faiss
  elif [ $((r % 2)) = 0 ]; then
    faiss
    handid
  else
    handid
    faiss
  fi
done
python3 - "$out" <<'PY'
import re, statistics, sys
rows = {}
copy = []
for line in open(sys.argv[1]):
    m = re.match(r"round=(\d+) (handid|handid-half|faiss) n=(\d+) p50_ms=([\d.]+)", line)
    if m:
        rows.setdefault(int(m[3]), {}).setdefault(m[2], []).append(float(m[4]))
    m = re.match(r"round=(\d+) (handid-batch|faiss-batch) n=(\d+) probes=\d+ p50_ms=([\d.]+)", line)
    if m:
        rows.setdefault(int(m[3]), {}).setdefault(m[2], []).append(float(m[4]))
    m = re.match(r"round=(\d+) handid-callers n=(\d+) .* ratio=([\d.]+)", line)
    if m:
        rows.setdefault(int(m[2]), {}).setdefault("callers", []).append(float(m[3]))
    m = re.match(r"round=(\d+) copy threads=\d+ read_gbs=([\d.]+)", line)
    if m:
        copy.append(float(m[2]))
med = statistics.median
spread = lambda v: f"{min(v):.1f}-{max(v):.1f}"
print(f"\nmachine copy rate: median {med(copy):.1f} GB/s (rounds {spread(copy)})")
print("\n| templates | handid f32 p50 ms (GB/s) | handid half p50 ms | FAISS p50 ms | FAISS/handid f32 | FAISS/handid half | batch of 16: handid / FAISS ms | 16 callers / 1 |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
for n, v in sorted(rows.items()):
    h, hh, f = med(v["handid"]), med(v["handid-half"]), med(v["faiss"])
    gbs = n * 512 * 4 / (h / 1e3) / 1e9
    print(f"| {n} | {h:.1f} ({gbs:.1f}) [{spread(v['handid'])}] | {hh:.1f} [{spread(v['handid-half'])}] | {f:.1f} [{spread(v['faiss'])}] "
          f"| {f / h:.2f} | {f / hh:.2f} | {med(v['handid-batch']):.0f} / {med(v['faiss-batch']):.0f} | {med(v['callers']):.1f} |")
print("\n(medians over rounds; [min-max] of the per-round p50s)")
PY
