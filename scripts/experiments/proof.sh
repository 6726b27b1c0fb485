#!/usr/bin/env bash
# The trainer's proofs: an untrained network and the same network fine-tuned
# are evaluated on the ten query/gallery splits of held-out test persons;
# prints both tables.
#
#   scripts/experiments/proof.sh real        # 11k Hands sample, about 4 min on 2 cores
#   scripts/experiments/proof.sh synthetic   # 200 synthetic persons, about 4 min
#   scripts/experiments/proof.sh methods     # the 11k sample, every method, about 15 min
#
# real: the sample's dorsal right hands (33 training / 27 test persons by the
# protocol's id threshold), configs/hands11k_sample_small_vit.yaml.
# synthetic: `synth` 200 persons x 8 images at 64x64, half the persons held
# out, configs/demo_tiny.yaml trained for EPOCHS (default 400).
# methods: as real, but every method (zero-shot, fine-tuning, CLIP-ReID,
# PromptSG) starts from one random CLIP written in OpenAI's key names
# (`init --clip-for`), loaded with `--clip-weights` as users load ViT-B-16.pt;
# each method's section is the real config's with the method swapped.
# Environment: DATA (the 11k sample), OUT (work folder), CONFIG, EPOCHS.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$(dirname "$here")")"
which="${1:-}"
case "$which" in
  real|methods) CONFIG="${CONFIG:-$root/configs/hands11k_sample_small_vit.yaml}" ;;
  synthetic) CONFIG="${CONFIG:-$root/configs/demo_tiny.yaml}" ;;
  *) echo "usage: $0 real|synthetic|methods" >&2; exit 2 ;;
esac
OUT="${OUT:-${TMPDIR:-/tmp}/handid-proof-$which}"

# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
(cd "$root" && cargo build --quiet --release -p handid-trainer --bin handid-trainer)
ht="$CARGO_TARGET_DIR/release/handid-trainer"
rm -rf "$OUT" && mkdir -p "$OUT"

train_args=()
if [ "$which" != synthetic ]; then
  DATA="${DATA:-$(cd "$root/.." && pwd)/shared/data/11k-hands-sample}"
  [ -f "$DATA/HandInfo.csv" ] || { echo "no 11k sample at $DATA (set DATA)" >&2; exit 1; }
  "$ht" splits --data "$DATA" --layout 11k --train-extra --out "$OUT/splits.tsv"
else
  "$ht" synth --out "$OUT/data" --persons 200 --images-per-person 8 --size 64
  "$ht" splits --data "$OUT/data" --layout folder --test-fraction 0.5 --out "$OUT/splits.tsv"
  train_args=(--epochs "${EPOCHS:-400}")
fi
# The untrained baseline: the same model section and seed, no training.
base() { sed -e '/^method:/,$d' -e "s/^name: .*/name: $1/" "$CONFIG"; }
{ base untrained; echo "method: {kind: zero_shot}"; } > "$OUT/untrained.yaml"
runs=(untrained trained)
if [ "$which" = methods ]; then
  # The fine-tuning recipe of the real config, and the same optimisation
  # under CLIP-ReID's and PromptSG's methods.
  sed -n '/^method:/,$p' "$CONFIG" | sed -e '1d' -e '/^  kind:/d' > "$OUT/stage.yaml"
  cp "$CONFIG" "$OUT/finetune.yaml"
  # CLIP-ReID's two branches: the class token and its projection.
  { base clip_reid | sed 's/^  input_size: .*$/&\n  feature: clip_reid/'
    echo "method:"; echo "  kind: clip_reid"
    echo "  stage1: {epochs: 40, batch_size: 64}"; echo "  stage2:"
    sed -e 's/^/  /' -e 's/^    losses:$/    losses:\n      i2t: {weight: 1.0}/' "$OUT/stage.yaml"
  } > "$OUT/clip_reid.yaml"
  { base prompt_sg; echo "method:"; echo "  kind: prompt_sg"
    echo "  prompt: {heads: 4, blocks: 1, inversion_hidden: 128}"; echo "  train:"
    sed -e 's/^/  /' "$OUT/stage.yaml" \
      | sed -e 's/^\(      \)sup_con: .*$/\1image_text: {weight: 0.5}/' \
            -e 's/^\(      \)lr: \(.*\)$/&\n\1head_lr: \2/' \
            -e 's/^\(      triplet: .*\)}$/\1, features: [fused, projected, backbone, penultimate]}/'
  } > "$OUT/prompt_sg.yaml"
  "$ht" init --clip-for "$CONFIG" --seed 7 --out "$OUT/clip.safetensors"
  train_args=(--clip-weights "$OUT/clip.safetensors")
  runs=(untrained finetune clip_reid prompt_sg)
fi
for run in "${runs[@]}"; do
  case "$run" in
    untrained) config="$OUT/untrained.yaml" extra=() ;;
    trained) config="$CONFIG" extra=("${train_args[@]}") ;;
    *) config="$OUT/$run.yaml" extra=("${train_args[@]}") ;;
  esac
  if [ "$which" = methods ]; then extra=(--clip-weights "$OUT/clip.safetensors"); fi
  start=$SECONDS
  "$ht" train --config "$config" --manifest "$OUT/splits.tsv" --out "$OUT/$run/run" --quiet "${extra[@]}"
  echo "$run: trained in $((SECONDS - start)) s"
  "$ht" export --run "$OUT/$run/run" --out "$OUT/$run/serving"
  "$ht" eval --model "$OUT/$run/serving" --manifest "$OUT/splits.tsv" --out "$OUT/$run/report" > /dev/null
done
for run in "${runs[@]}"; do
  echo; echo "## $run ($OUT/$run/report/report.md)"
  # The summary table: from its header to the first blank line.
  sed -n '/^| metric/,/^$/p' "$OUT/$run/report/report.md" | grep -E '^\|(---| (metric|rank1|rank5|rank10|mAP|mINP|EER) )' || true
done
