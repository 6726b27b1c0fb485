#!/usr/bin/env bash
# Model upgrades without re-enrolment, measured (issue #18): an old model A
# and a new model B trained on the same training persons, then the ten
# query/gallery splits of the held-out persons searched four ways: A alone
# M(A,A), B alone M(B,B), B's queries against A's templates M(B,A), and
# against A's templates mapped into B's space by a transform fitted on
# training persons' images only, M(B,T(A)). A third model, BCT, is B's
# config trained backward-compatibly with A (Shen et al., CVPR 2020:
# method.compatibility.old = A's run, the influence loss through A's frozen
# classifier): BCT alone M(BCT,BCT) and BCT's queries against A's templates
# M(BCT,A). Prints the table (mAP and Rank-1, mean over the splits).
#
#   scripts/experiments/upgrade.sh real        # the 11k Hands sample
#   scripts/experiments/upgrade.sh synthetic   # 200 synthetic persons (PERSONS)
#
# A and B are the proof configs (scripts/experiments/proof.sh) trained from
# different seeds, as both papers' experiments: A on half the training
# persons, B (and BCT) on all of them (OLD_PERSONS=quarter: A on every
# fourth training person, a larger gap between A and B; OLD_PERSONS=all: A
# on all of them for a third of the epochs, the protocol of the first
# measurements). The transform is fitted with
# the paper's code's recipe but batches of 32 for 200 epochs: its batches of
# 1024 would make one step an epoch on a few hundred images. Environment:
# DATA (the 11k sample), PERSONS (synthetic persons, 200: half of them
# training persons), OUT (work folder), EPOCHS (each model's; synthetic default
# 400, real the config's), TRANSFORM_EPOCHS (200), TRANSFORM_BATCH (32),
# BCT (the BCT models, space-separated WEIGHT[:CLASSIFIER[:SCALE[:SEED]]]:
# the influence weight λ, method.compatibility.classifier (auto when empty),
# .scale (30 when not given) and the seed (B's when not given), e.g. "3::10"
# or "3:::13"; default "1"; "none": no BCT model), START (own: B and BCT
# from seed 12, another random start than A's; shared: from A's seed 11,
# so from A's initial weights; pretrained: A, B, BCT and SIDE=1's S all
# start from the CLIP towers of a model P
# trained first on another synthetic population (PRETRAIN_PERSONS persons,
# 1600, synth seed 7, P's seed 10, EPOCHS epochs), as two fine-tunings of
# one CLIP checkpoint do; for the 11k sample too, P then being of
# synthetic hands at the sample's config; clip: every model starts from
# the CLIP weights CLIP_WEIGHTS, the product's case, with CONFIG one of
# configs/ for real weights; default own),
# CONFIG (the training config of every model: default the proof configs,
# configs/hands11k_sample_small_vit.yaml and configs/demo_tiny.yaml; any
# method that trains, e.g. configs/clip_reid_vitb16.yaml, whose EPOCHS
# default to its own; with real, the sample's train_extra split is added
# to its data when it names none), DEVICE (--device of every training,
# fit and evaluation, e.g. cuda; default: the config's for training, cpu
# for the rest),
# TRANSFORM_EPOCHS=0 (no transform), KEEP=1 (reuse what OUT already holds:
# data, splits, every model already exported, the transform; to add BCT
# variants to a run), OLD_PERSONS (half, quarter or all: above),
# SIDE=1 or SIDE=ssl (also FCT's side-information and a second transform
# fitted with it, M(B,T(A,S)); the side-information model S, of A's time:
# SIDE=1 a second model of A's recipe and training images, another seed;
# SIDE=ssl one trained self-supervised on A's training images without
# their labels, configs/side_info_tiny.yaml, SIDE_EPOCHS epochs),
# PERSON_TARGET (fit-transform --person-target for both transforms: 0, the
# paper's targets, by default), TRANSFORM_ARCH (fit-transform --arch: mlp,
# the paper's network, by default; linear: one affine map fitted in closed
# form, written to transform-linear/ and evaluated in transformed-linear/,
# so that KEEP=1 adds it beside the MLP's), RIDGE (its --ridge, 0.001 by
# default, or auto; when given, the folders are named with it:
# transform-linear-ridge-auto/, transformed-linear-ridge-auto/).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$(dirname "$here")")"
which="${1:-}"
config_given="${CONFIG:-}"
case "$which" in
  real) CONFIG="${CONFIG:-$root/configs/hands11k_sample_small_vit.yaml}" ;;
  synthetic) CONFIG="${CONFIG:-$root/configs/demo_tiny.yaml}" ;;
  *) echo "usage: $0 real|synthetic" >&2; exit 2 ;;
esac
[ -f "$CONFIG" ] || { echo "no config $CONFIG (CONFIG)" >&2; exit 2; }
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
# The method line that BCT's compatibility key goes under.
grep -Eq '^  kind: (finetune|clip_reid|prompt_sg)$' "$CONFIG" ||
  { echo "$CONFIG trains no model (method.kind finetune, clip_reid or prompt_sg)" >&2; exit 2; }
device=()
[ -z "${DEVICE:-}" ] || device=(--device "$DEVICE")
case "${START:-own}" in
  clip)
    [ -f "${CLIP_WEIGHTS:-}" ] || { echo "START=clip needs CLIP_WEIGHTS, a CLIP weights file (got '${CLIP_WEIGHTS:-}')" >&2; exit 2; }
    CLIP_WEIGHTS="$(cd "$(dirname "$CLIP_WEIGHTS")" && pwd)/$(basename "$CLIP_WEIGHTS")"
    start_id="clip $CLIP_WEIGHTS" ;;
  *) start_id="${START:-own}" ;;
esac
OUT="${OUT:-${TMPDIR:-/tmp}/handid-upgrade-$which}"

# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
(cd "$root" && cargo build --quiet --release -p handid-trainer --bin handid-trainer)
ht="$CARGO_TARGET_DIR/release/handid-trainer"
[ "${KEEP:-0}" = 1 ] || rm -rf "$OUT"
mkdir -p "$OUT"

fit_splits=(--split train)
if [ "$which" = real ]; then
  DATA="${DATA:-$(cd "$root/.." && pwd)/shared/data/11k-hands-sample}"
  [ -f "$DATA/HandInfo.csv" ] || { echo "no 11k sample at $DATA (set DATA)" >&2; exit 1; }
  [ -f "$OUT/splits.tsv" ] ||
    "$ht" splits --data "$DATA" --layout 11k --train-extra --out "$OUT/splits.tsv" > /dev/null
  fit_splits+=(--split train_extra)
  # Empty: the config's own (a two-stage method's are under its stages).
  epochs="${EPOCHS:-$(sed -n 's/^  epochs: //p' "$CONFIG" | head -n 1)}"
else
  if [ ! -f "$OUT/splits.tsv" ]; then
    "$ht" synth --out "$OUT/data" --persons "${PERSONS:-200}" --images-per-person 8 --size 64 > /dev/null
    "$ht" splits --data "$OUT/data" --layout folder --test-fraction 0.5 --out "$OUT/splits.tsv" > /dev/null
  fi
  epochs="${EPOCHS:-400}"
  [ -z "$config_given" ] || epochs="${EPOCHS:-$(sed -n 's/^  epochs: //p' "$CONFIG" | head -n 1)}"
fi

# The old model's manifest: the papers' protocol (BCT's and FCT's ImageNet
# and CIFAR experiments train the old model on half the classes, the new one
# on all): every other training person (sorted by id) is dropped from every
# split, so A never sees their images; the query/gallery splits of the
# held-out persons are untouched.
# OLD_PERSONS=quarter: only every fourth training person is kept.
# OLD_PERSONS=all: A on every training person for a third of the epochs
# (this script's protocol until 2026-12-02).
old_persons="${OLD_PERSONS:-half}"
case "$old_persons" in
  half) old_epochs="$epochs"; keep_every=2 ;;
  quarter) old_epochs="$epochs"; keep_every=4 ;;
  all)
    [ -n "$epochs" ] || { echo "OLD_PERSONS=all needs EPOCHS with $CONFIG (a third of them for A)" >&2; exit 2; }
    old_epochs=$(( (epochs + 2) / 3 )); keep_every=1 ;;
  *) echo "OLD_PERSONS must be half, quarter or all" >&2; exit 2 ;;
esac
# KEEP=1 reuses A only when it learnt the persons this run asks for (a
# work folder of before OLD_PERSONS was recorded holds the default's).
recorded=""
if [ -f "$OUT/old-persons" ]; then
  recorded="$(cat "$OUT/old-persons")"
elif [ -f "$OUT/old-splits.tsv" ]; then
  recorded=half
fi
if [ -n "$recorded" ] && [ "$recorded" != "$old_persons" ]; then
  echo "$OUT holds an A of OLD_PERSONS=$recorded, not $old_persons (use another OUT)" >&2
  exit 2
fi
echo "$old_persons" > "$OUT/old-persons"
if [ ! -f "$OUT/old-splits.tsv" ]; then
  if [ "$keep_every" != 1 ]; then
    awk -F'\t' '!/^#/ && ($1 == "train" || $1 == "train_extra") {print $2}' "$OUT/splits.tsv" |
      sort -u | awk -v every="$keep_every" 'NR % every != 1 % every' > "$OUT/old-dropped.txt"
    awk -F'\t' 'NR == FNR {drop[$1] = 1; next} /^#/ || !($2 in drop)' \
      "$OUT/old-dropped.txt" "$OUT/splits.tsv" > "$OUT/old-splits.tsv"
  else
    cp "$OUT/splits.tsv" "$OUT/old-splits.tsv"
  fi
fi

# A: seed 11, half (OLD_PERSONS) the training persons; B: seed 12
# (START=shared: 11, A's initial weights), all of them; BCT: B trained
# compatible with A's run, once per variant. The same epochs each.
train() { # NAME SEED MANIFEST EPOCHS [METHOD_LINE]
  [ -f "$OUT/$1/serving/handid.yaml" ] && return
  rm -rf "${OUT:?}/$1"
  sed -e "s/^name: .*/name: $1/" -e "s/^seed: .*/seed: $2/" "$CONFIG" > "$OUT/$1.yaml"
  if [ "$1" = pretrain ]; then
    # P's synthetic manifest has no train_extra split (the sample's config trains it).
    sed -i '/^  extra_train_splits:/d' "$OUT/$1.yaml"
  elif [ "$which" = real ] && ! grep -q '^  extra_train_splits:' "$OUT/$1.yaml"; then
    # The sample's training persons' other images (48 in the protocol's train split alone).
    sed -i '/^data:$/a\  extra_train_splits: [train_extra]' "$OUT/$1.yaml"
  fi
  if [ -n "${5:-}" ]; then
    sed -i -E "/^  kind: (finetune|clip_reid|prompt_sg)$/a\\$5" "$OUT/$1.yaml"
  fi
  local start=$SECONDS epochs_arg=()
  [ -z "$4" ] || epochs_arg=(--epochs "$4")
  "$ht" train --config "$OUT/$1.yaml" --manifest "$3" --out "$OUT/$1/run" "${epochs_arg[@]}" --quiet \
    "${clip_weights[@]}" "${device[@]}"
  "$ht" export --run "$OUT/$1/run" --out "$OUT/$1/serving" > /dev/null
  echo "[upgrade] $1: ${4:-the configured} epochs in $((SECONDS - start)) s"
}
clip_weights=()
case "${START:-own}" in
  own|pretrained|clip) new_seed=12 ;;
  shared) new_seed=11 ;;
  *) echo "START must be own, shared, pretrained or clip" >&2; exit 2 ;;
esac
# KEEP=1 reuses B and BCT only when they started where this run asks.
if [ -f "$OUT/start" ] && [ "$(cat "$OUT/start")" != "$start_id" ]; then
  echo "$OUT holds models of START=$(cat "$OUT/start"), not $start_id (use another OUT)" >&2
  exit 2
fi
echo "$start_id" > "$OUT/start"
[ "${START:-own}" != clip ] || clip_weights=(--clip-weights "$CLIP_WEIGHTS")
if [ "${START:-own}" = pretrained ]; then
  # P: every person of its own synthetic population a training person (a
  # tenth held out for validation), never one of this run's persons.
  if [ ! -f "$OUT/pretrained.safetensors" ]; then
    "$ht" synth --out "$OUT/pretrain-data" --persons "${PRETRAIN_PERSONS:-1600}" --images-per-person 8 \
      --size 64 --seed 7 > /dev/null
    "$ht" splits --data "$OUT/pretrain-data" --layout folder --test-fraction 0.1 \
      --out "$OUT/pretrain-splits.tsv" > /dev/null
    train pretrain 10 "$OUT/pretrain-splits.tsv" "$epochs"
    python3 "$here/clip_towers.py" "$OUT/pretrain/run/checkpoints/best/model.safetensors" \
      "$OUT/pretrained.safetensors"
  fi
  clip_weights=(--clip-weights "$OUT/pretrained.safetensors")
fi
train old 11 "$OUT/old-splits.tsv" "$old_epochs"
train new "$new_seed" "$OUT/splits.tsv" "$epochs"
read -ra variants <<< "${BCT:-1}"
[ "${variants[*]}" = none ] && variants=()
field() { # VARIANT I DEFAULT: the variant's :-separated field I (from 0), or DEFAULT when empty
  local fields
  IFS=: read -ra fields <<< "$1"
  echo "${fields[$2]:-$3}"
}
weight() { field "$1" 0 1; }
classifier() { field "$1" 1 auto; }
scale() { field "$1" 2 30; }
seed() { field "$1" 3 "$new_seed"; }
bct_name() { # VARIANT: bct, bct-2, bct-synthesised, bct-2-synthesised-s10-seed13
  local name=bct
  [ "$(weight "$1")" = 1 ] || name="$name-$(weight "$1")"
  [ "$(classifier "$1")" = auto ] || name="$name-$(classifier "$1")"
  [ "$(scale "$1")" = 30 ] || name="$name-s$(scale "$1")"
  [ "$(seed "$1")" = "$new_seed" ] || name="$name-seed$(seed "$1")"
  echo "$name"
}
bct_label() { # VARIANT: BCT, BCT λ=2, BCT synthesised, BCT λ=3 s=10 seed 13, ...
  local label=BCT
  [ "$(weight "$1")" = 1 ] || label="$label λ=$(weight "$1")"
  [ "$(classifier "$1")" = auto ] || label="$label $(classifier "$1")"
  [ "$(scale "$1")" = 30 ] || label="$label s=$(scale "$1")"
  [ "$(seed "$1")" = "$new_seed" ] || label="$label seed $(seed "$1")"
  echo "$label"
}
for v in "${variants[@]}"; do
  train "$(bct_name "$v")" "$(seed "$v")" "$OUT/splits.tsv" "$epochs" \
    "  compatibility: {old: $OUT/old/run, influence_weight: $(weight "$v"), classifier: $(classifier "$v"), scale: $(scale "$v")}"
done

transforms="${TRANSFORM_EPOCHS:-200}"
arch="${TRANSFORM_ARCH:-mlp}"
case "$arch" in
  mlp) t="" ;;
  linear) t="-linear${RIDGE:+-ridge-$RIDGE}" ;;
  *) echo "TRANSFORM_ARCH must be mlp or linear" >&2; exit 2 ;;
esac
fit_args=(--arch "$arch" --ridge "${RIDGE:-0.001}" --epochs "$transforms" --batch-size "${TRANSFORM_BATCH:-32}"
  --person-target "${PERSON_TARGET:-0}")
if [ "$transforms" != 0 ] && [ ! -f "$OUT/transform$t/transform.yaml" ]; then
  start=$SECONDS
  "$ht" fit-transform --old "$OUT/old/serving" --new "$OUT/new/serving" --manifest "$OUT/splits.tsv" \
    "${fit_splits[@]}" "${fit_args[@]}" "${device[@]}" --out "$OUT/transform$t"
  echo "[upgrade] transform fitted in $((SECONDS - start)) s"
fi

case "${SIDE:-0}" in
  0) ;;
  1) train side 13 "$OUT/old-splits.tsv" "$old_epochs" ;;
  ssl)
    # Sees what A saw, without the labels: every training image of A's
    # manifest is its own person (no genuine pairs: exported uncalibrated).
    if [ ! -f "$OUT/side/serving/handid.yaml" ]; then
      awk -F'\t' 'BEGIN {OFS = "\t"} /^#/ {print; next}
        $1 == "train" || $1 == "train_extra" {p = $3; gsub(/[^A-Za-z0-9]/, "_", p); print "train", p, $3}' \
        "$OUT/old-splits.tsv" > "$OUT/side-splits.tsv"
      rm -rf "$OUT/side"
      start=$SECONDS
      "$ht" train --config "$root/configs/side_info_tiny.yaml" --manifest "$OUT/side-splits.tsv" \
        --out "$OUT/side/run" --epochs "${SIDE_EPOCHS:-100}" --quiet
      "$ht" export --run "$OUT/side/run" --out "$OUT/side/serving" --uncalibrated > /dev/null
      echo "[upgrade] self-supervised side-information model: ${SIDE_EPOCHS:-100} epochs in $((SECONDS - start)) s"
    fi
    ;;
  *) echo "SIDE must be 0, 1 or ssl" >&2; exit 2 ;;
esac
if [ "${SIDE:-0}" != 0 ] && [ "$transforms" != 0 ]; then
  if [ ! -f "$OUT/transform-side$t/transform.yaml" ]; then
    start=$SECONDS
    "$ht" fit-transform --old "$OUT/old/serving" --new "$OUT/new/serving" --side-info "$OUT/side/serving" \
      --manifest "$OUT/splits.tsv" "${fit_splits[@]}" "${fit_args[@]}" "${device[@]}" --out "$OUT/transform-side$t"
    echo "[upgrade] transform with side-information fitted in $((SECONDS - start)) s"
  fi
fi

across() { # OUT [--transform DIR]
  local out="$1"; shift
  "$ht" eval --query-model "$OUT/new/serving" --gallery-model "$OUT/old/serving" \
    --manifest "$OUT/splits.tsv" --out "$OUT/$out" "${device[@]}" "$@" > /dev/null
}
across plain
[ "$transforms" = 0 ] || across "transformed$t" --transform "$OUT/transform$t"
if [ "${SIDE:-0}" != 0 ] && [ "$transforms" != 0 ]; then
  across "transformed-side$t" --transform "$OUT/transform-side$t" --side-info "$OUT/side/serving"
fi
for v in "${variants[@]}"; do
  name="$(bct_name "$v")"
  "$ht" eval --query-model "$OUT/$name/serving" --gallery-model "$OUT/old/serving" \
    --manifest "$OUT/splits.tsv" --out "$OUT/$name-old" "${device[@]}" > /dev/null
done

echo
echo "## $which: mean over the ten splits ($OUT)"
echo
echo "| search | mAP | Rank-1 |"
echo "|---|---:|---:|"
sed -n 's/^| old \/ old: \(.*\)$/| \1/p' "$OUT/plain/report.md"
sed -n 's/^| new \/ new: \(.*\)$/| \1/p' "$OUT/plain/report.md"
sed -n 's/^| new \/ old: \(.*\)$/| \1/p' "$OUT/plain/report.md"
if [ "$transforms" != 0 ]; then
  sed -n 's/^| new \/ old through `[^`]*`: \(.*\)$/| \1/p' "$OUT/transformed$t/report.md"
fi
if [ "${SIDE:-0}" != 0 ] && [ "$transforms" != 0 ]; then
  sed -n 's/^| new \/ old through `[^`]*`: M(B,T(A)) \(.*\)$/| M(B,T(A,S)) with side-information \1/p' \
    "$OUT/transformed-side$t/report.md"
fi
for v in "${variants[@]}"; do
  name="$(bct_name "$v")"
  label="$(bct_label "$v")"
  sed -n "s/^| new \/ new: M(B,B) \(.*\)$/| M($label,$label) \1/p" "$OUT/$name-old/report.md"
  sed -n "s/^| new \/ old: M(B,A) \(.*\)$/| M($label,A) \1/p" "$OUT/$name-old/report.md"
done
echo
[ "$transforms" = 0 ] || grep '^Compatible' "$OUT/transformed$t/report.md"
if [ "${SIDE:-0}" != 0 ] && [ "$transforms" != 0 ]; then
  echo "with side-information: $(grep '^Compatible' "$OUT/transformed-side$t/report.md")"
fi
for v in "${variants[@]}"; do
  echo "$(bct_label "$v"): $(grep '^Compatible' "$OUT/$(bct_name "$v")-old/report.md")"
done
