#!/usr/bin/env bash
# The trainer's real-data check: on the 11k Hands sample (dorsal right; 33
# training persons, 27 test persons by the protocol's id threshold), the
# untrained network and the same network fine-tuned with
# configs/hands11k_sample_small_vit.yaml are evaluated on the ten
# query/gallery splits of the test persons. Prints both tables.
#
#   scripts/experiments/sample_real.sh              # about 6 minutes on 2 cores
#   DATA=/path/to/11k-hands-sample OUT=/tmp/sample_real CONFIG=... scripts/experiments/sample_real.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$(dirname "$here")")"
DATA="${DATA:-$(cd "$root/.." && pwd)/shared/data/11k-hands-sample}"
OUT="${OUT:-${TMPDIR:-/tmp}/handid-sample-real}"
CONFIG="${CONFIG:-$root/configs/hands11k_sample_small_vit.yaml}"
[ -f "$DATA/HandInfo.csv" ] || { echo "no 11k sample at $DATA (set DATA)" >&2; exit 1; }

# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
(cd "$root" && cargo build --quiet --release -p handid-trainer --bin handid-trainer)
ht="$CARGO_TARGET_DIR/release/handid-trainer"
rm -rf "$OUT" && mkdir -p "$OUT"

"$ht" splits --data "$DATA" --layout 11k --train-extra --out "$OUT/sample.tsv"
# The untrained baseline: the same model section and seed, no training.
{ sed -e '/^method:/,$d' -e 's/^name: .*/name: untrained/' "$CONFIG"; echo "method: {kind: zero_shot}"; } \
  > "$OUT/untrained.yaml"
for run in untrained trained; do
  config="$OUT/untrained.yaml"; [ "$run" = trained ] && config="$CONFIG"
  "$ht" train --config "$config" --manifest "$OUT/sample.tsv" --out "$OUT/$run/run" --quiet
  "$ht" export --run "$OUT/$run/run" --out "$OUT/$run/serving"
  "$ht" eval --model "$OUT/$run/serving" --manifest "$OUT/sample.tsv" --out "$OUT/$run/report" > /dev/null
done
for run in untrained trained; do
  echo; echo "## $run ($OUT/$run/report/report.md)"
  grep -E '^\| (metric|---|rank1|rank5|rank10|mAP|mINP|EER)' "$OUT/$run/report/report.md" || true
done
