#!/usr/bin/env bash
# Builds the libFuzzer targets (clang-14, ASan+UBSan) in their own build
# directory and runs each for a bounded time over its committed corpus, then
# checks that every reproducer of a known engine bug still fails (see
# README.md). Exit status is non-zero if a target found a crash or a check
# failure, or if a known bug no longer reproduces (then remove it from
# known_engine_bugs.txt).
#
#   tests/fuzz/run_fuzzers.sh                 # short run: 20 s per target (CI)
#   tests/fuzz/run_fuzzers.sh --long          # 150 s per target (10 minutes)
#   tests/fuzz/run_fuzzers.sh --time 600 engine_ops_fuzzer
#   tests/fuzz/run_fuzzers.sh --update-corpus # merge what was found into corpus/
#
# Options:
#   --time N          seconds per target
#   --long            --time 150
#   --build-dir DIR   default: build-fuzz (at the top of the tree)
#   --no-build        use the binaries already in the build directory
#   --update-corpus   after running, merge new coverage into corpus/<target>
#   --jobs N          build parallelism (default 2)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
top="$(cd "$here/../.." && pwd)"
all_targets=(log_codec_fuzzer write_batch_fuzzer key_fuzzer engine_ops_fuzzer)
seconds=20
build_dir="$top/build-fuzz"
build=1
update_corpus=0
jobs=2
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --time) seconds="$2"; shift 2 ;;
    --long) seconds=150; shift ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --update-corpus) update_corpus=1; shift ;;
    --jobs) jobs="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

if [ "$build" = 1 ]; then
  cmake -S "$top" -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_COMPILER=clang++-14 -DPARLEY_BUILD_FUZZ=ON \
    -DPARLEY_SANITIZE=address,undefined -DPARLEY_BUILD_TESTS=OFF \
    -DPARLEY_BUILD_BENCH=OFF -DPARLEY_BUILD_EXAMPLES=OFF >/dev/null
  nice cmake --build "$build_dir" -j "$jobs" --target "${targets[@]}"
fi

# Known engine bugs: name, target, reproducer (under repro/), description.
# The fuzzers steer around them (PARLEY_FUZZ_AVOID) so they keep finding
# others; each reproducer must still fail until the bug is fixed.
avoid=""
known=()
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  known+=("$line")
  avoid="${avoid:+$avoid,}$(awk '{print $1}' <<<"$line")"
done < "$here/known_engine_bugs.txt"

out="$build_dir/fuzz-runs/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
if [ -z "${ASAN_SYMBOLIZER_PATH:-}" ] && [ -x /usr/bin/llvm-symbolizer-14 ]; then
  export ASAN_SYMBOLIZER_PATH=/usr/bin/llvm-symbolizer-14
fi
# A shorter allocation stack (default 30) halves the allocator's cost here.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:symbolize=1:malloc_context_size=10${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

status=0
summary=()
for t in "${targets[@]}"; do
  bin="$build_dir/tests/fuzz/$t"
  corpus="$here/corpus/$t"
  work="$out/$t-corpus"
  mkdir -p "$work" "$corpus"
  echo "== $t: ${seconds}s over $(ls "$corpus" | wc -l) corpus inputs"
  rc=0
  PARLEY_FUZZ_AVOID="$avoid" "$bin" "$work" "$corpus" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
    -print_final_stats=1 -artifact_prefix="$out/$t-" \
    >"$out/$t.log" 2>&1 || rc=$?
  runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$out/$t.log")
  rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "$out/$t.log")
  found=$(awk '/stat::new_units_added/ {print $2}' "$out/$t.log")
  if [ "$rc" != 0 ]; then
    status=1
    echo "!! $t FAILED (exit $rc); log: $out/$t.log"
    grep -E "fuzz check failed|ERROR: |runtime error|SUMMARY|Test unit written" "$out/$t.log" | head -20 || true
    summary+=("$(printf '%-20s FAILED  see %s' "$t" "$out/$t.log")")
  else
    summary+=("$(printf '%-20s ok  %10s runs  %7s exec/s  %5s new units' "$t" "${runs:-?}" "${rate:-?}" "${found:-?}")")
  fi
  if [ "$update_corpus" = 1 ] && [ "$rc" = 0 ]; then
    PARLEY_FUZZ_AVOID="$avoid" "$bin" -merge=1 "$corpus" "$work" >"$out/$t-merge.log" 2>&1
    echo "   corpus/$t now holds $(ls "$corpus" | wc -l) inputs"
  fi
done

# Every known bug must still reproduce, without the steering.
for line in "${known[@]}"; do
  read -r name t repro desc <<<"$line"
  [[ " ${targets[*]} " == *" $t "* ]] || continue
  if "$build_dir/tests/fuzz/$t" "$here/repro/$repro" >"$out/known-$name.log" 2>&1; then
    status=1
    summary+=("$(printf 'known bug %-14s NO LONGER REPRODUCES: remove it from known_engine_bugs.txt' "$name")")
  else
    summary+=("$(printf 'known bug %-14s still open (%s)' "$name" "$desc")")
  fi
done

echo "== fuzz summary (${seconds}s per target; logs in $out)"
printf '   %s\n' "${summary[@]}"
exit $status
