#!/usr/bin/env bash
# Identify's search: handid's gallery index vs FAISS IndexFlatIP (PyPI
# faiss-cpu) on the same vectors, same machine, same thread count. Prints
# p50/p99 latency per gallery size and the ratio FAISS / handid (> 1: handid
# is faster).
#
#   scripts/bench/index_speed.sh                  # 10k, 100k, 1M templates
#   SIZES=10000,100000 scripts/bench/index_speed.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$(dirname "$here")")"
SIZES="${SIZES:-10000,100000,1000000}" K="${K:-10}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
venv="$HANDID_CACHE/bench-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c 'import faiss' 2>/dev/null || "$venv/bin/pip" install -q "faiss-cpu==1.*" "numpy<3"
data="$(mktemp -d)"
trap 'rm -rf "$data"' EXIT
out="$data/results.txt"
(cd "$root" && cargo run --quiet --release -p handid-server --example index_bench -- \
  --sizes "$SIZES" --k "$K" --export "$data") | tee -a "$out"
"$venv/bin/python" "$here/faiss_search.py" --dir "$data" --sizes "$SIZES" --k "$K" | tee -a "$out"
python3 - "$out" <<'PY'
import re, sys
r = {}
for line in open(sys.argv[1]):
    m = re.match(r"(handid|faiss) n=(\d+) p50_ms=([\d.]+) p99_ms=([\d.]+)", line)
    if m:
        r.setdefault(int(m[2]), {})[m[1]] = (float(m[3]), float(m[4]))
print("\n| templates | handid p50 / p99 (ms) | FAISS p50 / p99 (ms) | ratio FAISS/handid (p50) |\n|---:|---:|---:|---:|")
for n, v in sorted(r.items()):
    h, f = v["handid"], v["faiss"]
    print(f"| {n} | {h[0]:.2f} / {h[1]:.2f} | {f[0]:.2f} / {f[1]:.2f} | {f[0] / h[0]:.2f} |")
PY
