#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo fuzz, libFuzzer, nightly), each for
# MINUTES, one after the other, and prints what they did.
#
#   scripts/fuzz.sh [MINUTES] [TARGET...]   # default: 5 minutes, every target
#   FUZZ_SANITIZER=none scripts/fuzz.sh 60 image
#
# Targets: `image` (bytes -> header checks -> decode -> preprocessing, under
# the server's default limits) and `requests` (bytes -> every request
# message -> validation). What each asserts: server/src/fuzzing.rs.
#
# Each target starts from the committed seeds and regressions
# (fuzz/corpus/<target>, fuzz/regressions/<target>) and grows a working
# corpus in $HANDID_FUZZ_DIR/corpus/<target> (default $HANDID_CACHE/fuzz),
# kept from run to run. A crash, out-of-memory or timeout does not end the
# run: its input is saved in $HANDID_FUZZ_DIR/artifacts/<target>/ and
# fuzzing goes on for the minutes left. Fix it, then copy the input into
# fuzz/regressions/<target>/ (named after the finding) so that `cargo test`
# (server/tests/fuzz_regressions.rs) replays it from then on.
#
# Environment: FUZZ_SANITIZER (address, the default, or none: faster, but
# no ASan and no -malloc_limit_mb), FUZZ_JOBS (parallel libFuzzer workers
# per target, default 1), FUZZ_FLAGS (more libFuzzer flags, appended),
# HANDID_FUZZ_DIR.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
# shellcheck source=scripts/env.sh
source "$here/env.sh"

minutes="${1:-5}"
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(image requests)
sanitizer="${FUZZ_SANITIZER:-address}"
jobs="${FUZZ_JOBS:-1}"
work="${HANDID_FUZZ_DIR:-$HANDID_CACHE/fuzz}"
if ! [[ "$minutes" =~ ^[0-9]+$ ]] || [ "$minutes" -eq 0 ]; then
    echo "usage: scripts/fuzz.sh [MINUTES] [TARGET...]" >&2
    exit 2
fi

# libFuzzer flags per target. Memory: the server lets one image take up to
# max_pixels x 8 bytes (40 Mpx of 16-bit RGBA, 320 MiB) while it decodes,
# so any single allocation over 512 MiB is a finding, and so is an RSS over
# 3 GiB (libtorch and ASan's shadow included). Time: the server's request
# timeout is 30 s, so an image that takes longer is one; a request message
# is validated in microseconds.
flags_for() {
    case "$1" in
        image) echo "-max_len=65536 -rss_limit_mb=3072 -malloc_limit_mb=512 -timeout=30 -report_slow_units=5" ;;
        requests) echo "-max_len=4096 -rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=5 -use_value_profile=1 -dict=fuzz/requests.dict" ;;
        *) echo "unknown fuzz target $1 (known: image requests)" >&2; return 1 ;;
    esac
}
for target in "${targets[@]}"; do flags_for "$target" > /dev/null; done

# The tools: a nightly toolchain and cargo-fuzz (from crates.io).
if ! cargo +nightly --version > /dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz > /dev/null; then
    cargo install cargo-fuzz --locked
fi

# One build for every target. Its own target dir per sanitizer: switching
# would otherwise rebuild libtorch's bindings and everything above them.
fuzz_target_dir="$CARGO_TARGET_DIR/fuzz-$sanitizer"
echo "[fuzz] building (sanitizer $sanitizer) in $fuzz_target_dir"
cargo +nightly fuzz build --sanitizer "$sanitizer" --debug-assertions --codegen-units 16 \
    --target-dir "$fuzz_target_dir"
bin_dir="$fuzz_target_dir/x86_64-unknown-linux-gnu/release"

# libtorch keeps some allocations for the life of the process: not a leak
# of the code under test.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}"

stamp="$(date +%Y%m%d-%H%M%S)"
summary=()
for target in "${targets[@]}"; do
    corpus="$work/corpus/$target"
    artifacts="$work/artifacts/$target"
    logs="$work/logs"
    mkdir -p "$corpus" "$artifacts" "$logs"
    log="$logs/$target-$stamp.log"
    seeds=("fuzz/corpus/$target")
    [ -d "fuzz/regressions/$target" ] && seeds+=("fuzz/regressions/$target")
    read -r -a flags <<< "$(flags_for "$target") ${FUZZ_FLAGS:-}"
    # -jobs=1 would still fork a worker and send its output elsewhere.
    if [ "$jobs" -gt 1 ]; then flags+=(-jobs="$jobs" -workers="$jobs"); fi
    deadline=$(( $(date +%s) + minutes * 60 ))
    executions=0 seconds=0 runs=0 quick_crashes=0
    before="$(mktemp)"
    ls "$artifacts" > "$before"
    echo "[fuzz] $target: $minutes min, log $log"
    # Crashes end a libFuzzer run; start another for the time left.
    while left=$(( deadline - $(date +%s) )); [ "$left" -gt 10 ]; do
        runs=$(( runs + 1 ))
        started=$(date +%s)
        set +e
        "$bin_dir/$target" "$corpus" "${seeds[@]}" "${flags[@]}" \
            -max_total_time="$left" \
            -artifact_prefix="$artifacts/" -print_final_stats=1 \
            >> "$log" 2>&1
        rc=$?
        set -e
        # With -jobs > 1 each worker logs to fuzz-N.log in the working dir.
        if [ "$jobs" -gt 1 ]; then cat fuzz-*.log >> "$log" 2>/dev/null; rm -f fuzz-*.log; fi
        took=$(( $(date +%s) - started ))
        seconds=$(( seconds + took ))
        if [ "$rc" -eq 0 ]; then break; fi
        echo "[fuzz] $target: run $runs ended with status $rc after ${took}s (a finding, see the log)"
        if [ "$took" -lt 30 ]; then quick_crashes=$(( quick_crashes + 1 )); else quick_crashes=0; fi
        if [ "$quick_crashes" -ge 3 ]; then
            echo "[fuzz] $target: three quick crashes in a row, stopping; fix the finding first"
            break
        fi
    done
    # Each run (each worker) ends with its stat:: lines.
    executions=$(awk '/stat::number_of_executed_units:/ { n += $2 } END { print n + 0 }' "$log")
    peak=$(awk '/stat::peak_rss_mb:/ { if ($2 > p) p = $2 } END { print p + 0 }' "$log")
    new="$(ls "$artifacts" | grep -vxF -f "$before" || true)"
    rm -f "$before"
    findings=$(printf '%s' "$new" | grep -c . || true)
    rate=$(( seconds > 0 ? executions / seconds : 0 ))
    summary+=("$(printf '%-9s %4s min %12s execs %7s exec/s %6s corpus %6s MB peak %3s new findings' \
        "$target" "$minutes" "$executions" "$rate" "$(ls "$corpus" | wc -l)" "$peak" "$findings")")
    if [ -n "$new" ]; then
        printf '[fuzz] %s: new findings in %s:\n' "$target" "$artifacts"
        printf '    %s\n' $new
    fi
done

echo "[fuzz] summary (sanitizer $sanitizer, $jobs job(s) per target):"
printf '    %s\n' "${summary[@]}"
