#!/usr/bin/env bash
# The one test command (README, .ci/run). Three steps:
#   1. Release build and every ctest test (GPU tests skip with the reason when no CUDA device is
#      present; the long soak variant, label soak_long, runs only when SOAK_LONG=1).
#   2. Sanitizer build (ASan + UBSan, LSan through ASan) of the kernel, server (in-process
#      loopback servers included), client parser and CLI tests and the fuzz replays, and a run
#      of them. The exhaustive numerics searches are left to step 1 (minutes under ASan; no
#      parsing or concurrency in them). Compiler: clang++-14 (it also builds the libFuzzer
#      targets); without clang steps 2 and 3 are skipped with the reason.
#   3. Fuzzing: every libFuzzer target for FUZZ_SECONDS from tests/fuzz/corpus (the targets run
#      side by side); a crash fails the step and leaves its reproducer in
#      $SAN_BUILD_DIR/fuzz/crashes (add it to tests/fuzz/regressions/<target> once fixed).
#      Executions per target are printed and written to $SAN_BUILD_DIR/fuzz/summary.txt.
#
# Environment: BUILD_DIR (default build), SAN_BUILD_DIR (default $BUILD_DIR-san),
# SANITIZERS=0 skips steps 2 and 3, FUZZ_SECONDS (default 30; 0 skips step 3), SOAK_LONG=1 adds
# the long soak test to step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build}
san_dir=${SAN_BUILD_DIR:-${build_dir}-san}
fuzz_seconds=${FUZZ_SECONDS:-30}
jobs=$(nproc)
start=$SECONDS

step() { echo; echo "==== $* ($((SECONDS - start)) s)"; }

step "1/3 build and test ($build_dir)"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build_dir" -j "$jobs"
if [ "${SOAK_LONG:-0}" = 1 ]; then
  ctest --test-dir "$build_dir" --output-on-failure -j "$jobs"
else
  ctest --test-dir "$build_dir" --output-on-failure -j "$jobs" -LE soak_long
fi

if [ "${SANITIZERS:-1}" = 0 ]; then
  echo "sanitizer build and fuzzing skipped: SANITIZERS=0"
  exit 0
fi

step "2/3 sanitizer build and test ($san_dir)"
compiler=""
for candidate in clang++-14 clang++; do
  if command -v "$candidate" >/dev/null; then
    resource=$("$candidate" -print-resource-dir)
    if [ -f "$resource/lib/linux/libclang_rt.fuzzer-x86_64.a" ] ||
       [ -f "$resource/lib/linux/libclang_rt.fuzzer-$(uname -m).a" ]; then
      compiler=$candidate
      break
    fi
  fi
done
if [ -z "$compiler" ]; then
  # GCC's sanitizer instrumentation changes the floating-point results of the vectorised CPU
  # kernels (bit-exactness tests fail; a plain GCC -O1 build passes), so its reports would be
  # mixed with false failures: the sanitizer step needs clang.
  echo "sanitizer build and fuzzing skipped: no clang++ with libFuzzer found" \
       "(Debian packages clang-14 and libclang-rt-14-dev; scripts/install-deps.sh installs them)"
  exit 0
fi
cmake -S . -B "$san_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_COMPILER=$compiler" \
  "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -g1" -DNVFP4CAL_CUDA=OFF -DNVFP4CAL_BUILD_BENCH=OFF \
  -DNVFP4CAL_SANITIZE=address,undefined -DNVFP4CAL_BUILD_FUZZERS=ON
san_targets=(kernels_test scheduler_test server_loopback_test server_job_api_test
  server_job_manager_test server_security_test server_fault_injection_test server_soak_test
  server_hostile_client_test server_session_protocol_test server_gptq_session_test
  safetensors_test client_cli_test client_cli_output_test
  client_quantize_test client_hessian_accumulator_test remote_only_link_check
  safetensors_fuzzer_replay validation_fuzzer_replay session_fuzzer_replay)
fuzz_targets=(safetensors validation session)
for t in "${fuzz_targets[@]}"; do san_targets+=("${t}_fuzzer"); done
cmake --build "$san_dir" -j "$jobs" --target "${san_targets[@]}"
export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# The Python package's tests (label python) need step 1's tools, which this build does not make;
# the Python-driven output checks (client_output_formats, bench_quality_reader: minutes of
# CLI runs under the sanitizers) repeat step 1's with nothing parsed that step 2's CLI tests
# and fuzz replays do not cover.
# Tests of targets not built here show up as <target>_NOT_BUILT; the exhaustive numerics
# searches (and the model-level comparisons built on them) and the format check (label style:
# the sources, not the build) run in step 1 only.
slow_numerics='EventSearch\.|CandidatePruning\.|LocalHessianSweep\.ChoiceIsTheExhaustive'
slow_numerics+='|DecoupledScaleSearch\.|OutputEqualsKernelsCalledDirectly|WeightsEqualKernels'
ctest --test-dir "$san_dir" --output-on-failure -j "$jobs" -LE 'gpu|deploy|image|python|soak_long|style' \
  -E "_NOT_BUILT|client_output_formats|bench_quality_reader|$slow_numerics"

if [ "$fuzz_seconds" = 0 ]; then
  echo "fuzzing skipped: FUZZ_SECONDS=0"
  exit 0
fi
step "3/3 fuzzing, ${fuzz_seconds} s per target"
fuzz_dir=$san_dir/fuzz
mkdir -p "$fuzz_dir/crashes"
pids=()
for t in "${fuzz_targets[@]}"; do
  mkdir -p "$fuzz_dir/corpus/$t"
  # The growing corpus lives in the build folder; the seeds and reproducers are read too.
  "$san_dir/tests/fuzz/${t}_fuzzer" -max_total_time="$fuzz_seconds" -print_final_stats=1 \
    -timeout=30 -rss_limit_mb=4096 -artifact_prefix="$fuzz_dir/crashes/$t-" \
    "$fuzz_dir/corpus/$t" "tests/fuzz/corpus/$t" "tests/fuzz/regressions/$t" \
    > "$fuzz_dir/$t.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!fuzz_targets[@]}"; do
  if ! wait "${pids[$i]}"; then
    failed=1
    echo "fuzz target ${fuzz_targets[$i]} FAILED; log $fuzz_dir/${fuzz_targets[$i]}.log:"
    tail -40 "$fuzz_dir/${fuzz_targets[$i]}.log"
  fi
done
{
  printf '%-12s %12s %10s %10s\n' target executions exec/s corpus
  for t in "${fuzz_targets[@]}"; do
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$fuzz_dir/$t.log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$fuzz_dir/$t.log")
    printf '%-12s %12s %10s %10s\n' "$t" "${runs:-?}" "${rate:-?}" \
      "$(find "$fuzz_dir/corpus/$t" -type f | wc -l)"
  done
} | tee "$fuzz_dir/summary.txt"
if [ "$failed" != 0 ]; then exit 1; fi
echo "all steps passed in $((SECONDS - start)) s"
