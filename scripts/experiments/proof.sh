#!/usr/bin/env bash
# The trainer's proofs: an untrained network and the same network fine-tuned
# are evaluated on the ten query/gallery splits of held-out test persons;
# prints both tables.
#
#   scripts/experiments/proof.sh real        # 11k Hands sample, about 4 min on 2 cores
#   scripts/experiments/proof.sh synthetic   # 200 synthetic persons, about 4 min
#
# real: the sample's dorsal right hands (33 training / 27 test persons by the
# protocol's id threshold), configs/hands11k_sample_small_vit.yaml.
# synthetic: `synth` 200 persons x 8 images at 64x64, half the persons held
# out, configs/demo_tiny.yaml trained for EPOCHS (default 400).
# Environment: DATA (the 11k sample), OUT (work folder), CONFIG, EPOCHS.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$(dirname "$here")")"
which="${1:-}"
case "$which" in
  real) CONFIG="${CONFIG:-$root/configs/hands11k_sample_small_vit.yaml}" ;;
  synthetic) CONFIG="${CONFIG:-$root/configs/demo_tiny.yaml}" ;;
  *) echo "usage: $0 real|synthetic" >&2; exit 2 ;;
esac
OUT="${OUT:-${TMPDIR:-/tmp}/handid-proof-$which}"

# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
(cd "$root" && cargo build --quiet --release -p handid-trainer --bin handid-trainer)
ht="$CARGO_TARGET_DIR/release/handid-trainer"
rm -rf "$OUT" && mkdir -p "$OUT"

train_args=()
if [ "$which" = real ]; then
  DATA="${DATA:-$(cd "$root/.." && pwd)/shared/data/11k-hands-sample}"
  [ -f "$DATA/HandInfo.csv" ] || { echo "no 11k sample at $DATA (set DATA)" >&2; exit 1; }
  "$ht" splits --data "$DATA" --layout 11k --train-extra --out "$OUT/splits.tsv"
else
  "$ht" synth --out "$OUT/data" --persons 200 --images-per-person 8 --size 64
  "$ht" splits --data "$OUT/data" --layout folder --test-fraction 0.5 --out "$OUT/splits.tsv"
  train_args=(--epochs "${EPOCHS:-400}")
fi
# The untrained baseline: the same model section and seed, no training.
{ sed -e '/^method:/,$d' -e 's/^name: .*/name: untrained/' "$CONFIG"; echo "method: {kind: zero_shot}"; } \
  > "$OUT/untrained.yaml"
for run in untrained trained; do
  if [ "$run" = trained ]; then config="$CONFIG" extra=("${train_args[@]}"); else config="$OUT/untrained.yaml" extra=(); fi
  start=$SECONDS
  "$ht" train --config "$config" --manifest "$OUT/splits.tsv" --out "$OUT/$run/run" --quiet "${extra[@]}"
  echo "$run: trained in $((SECONDS - start)) s"
  "$ht" export --run "$OUT/$run/run" --out "$OUT/$run/serving"
  "$ht" eval --model "$OUT/$run/serving" --manifest "$OUT/splits.tsv" --out "$OUT/$run/report" > /dev/null
done
for run in untrained trained; do
  echo; echo "## $run ($OUT/$run/report/report.md)"
  # The summary table: from its header to the first blank line.
  sed -n '/^| metric/,/^$/p' "$OUT/$run/report/report.md" | grep -E '^\|(---| (metric|rank1|rank5|rank10|mAP|mINP|EER) )' || true
done
