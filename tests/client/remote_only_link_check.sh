#!/usr/bin/env bash
# Checks that a program linked against nvfp4cal::client alone (remote_only_link_check.cc) pays
# nothing for the in-process backends: its dynamic section (readelf -d) and its resolved
# libraries (ldd, when present) name neither the CUDA runtime / driver, cuBLAS, cuSOLVER nor
# LAPACK / BLAS, and it carries no dlopen name of cuBLAS / cuSOLVER (the CUDA gptq backend).
# The program is linked with --no-as-needed, so every shared library its link line names shows
# up as NEEDED: what is checked is the library's link interface, not what the linker dropped.
# Then the program is run (it talks gRPC to a port where nothing listens).
#
#   remote_only_link_check.sh BINARY                     pass: nothing forbidden, and it runs
#   remote_only_link_check.sh --expect-forbidden BINARY  self-test on a binary that links the
#                                                        in-process backends: pass when the
#                                                        check finds them (so it can fail)
#
# Exit 77 (a skip in ctest) when readelf (binutils) is missing.
set -euo pipefail

expect_forbidden=0
if [ "${1:-}" = --expect-forbidden ]; then
  expect_forbidden=1
  shift
fi
if [ $# -ne 1 ]; then
  echo "usage: $0 [--expect-forbidden] BINARY" >&2
  exit 2
fi
binary=$1
if ! command -v readelf >/dev/null; then
  echo "link check skipped: readelf not found (Debian package binutils)"
  exit 77
fi
if [ ! -f "$binary" ]; then
  echo "FAIL: $binary does not exist (not built?)"
  exit 1
fi

# Shared libraries of the in-process backends: CUDA runtime and driver, cuBLAS(Lt), cuSOLVER,
# LAPACK and the BLAS implementations Debian provides it with.
forbidden='^lib(cuda|cudart|cublas|cublasLt|cusolver|lapack|blas|cblas|openblas|mkl_)'

needed=$(readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\].*/\1/p')
echo "NEEDED by $(basename "$binary"): $(echo "$needed" | tr '\n' ' ')"
found=()
while read -r lib; do
  if [ -n "$lib" ] && [[ $lib =~ $forbidden ]]; then found+=("NEEDED $lib"); fi
done <<<"$needed"

if command -v ldd >/dev/null; then
  # Libraries pulled in by the NEEDED ones (transitively), as the loader resolves them.
  while read -r lib; do
    if [ -n "$lib" ] && [[ $lib =~ $forbidden ]]; then found+=("loaded (ldd) $lib"); fi
  done < <(ldd "$binary" | awk '{print $1}' | sed 's|.*/||')
else
  echo "note: ldd not found; transitive libraries not checked"
fi

for name in libcublas.so libcusolver.so; do
  if grep -aq "$name" "$binary"; then found+=("dlopen name $name in the binary"); fi
done

if [ "$expect_forbidden" = 1 ]; then
  if [ ${#found[@]} -eq 0 ]; then
    echo "FAIL: nothing forbidden found in $binary, which links the in-process backends:" \
         "the check could not fail"
    exit 1
  fi
  echo "ok: the check finds the in-process backends in $(basename "$binary"):"
  printf '  %s\n' "${found[@]}"
  exit 0
fi

if [ ${#found[@]} -gt 0 ]; then
  echo "FAIL: $(basename "$binary") links only nvfp4cal::client, yet needs the in-process" \
       "backends (nvfp4cal::client must not link CUDA, cuBLAS/cuSOLVER or LAPACK):"
  printf '  %s\n' "${found[@]}"
  exit 1
fi
echo "ok: no CUDA, cuBLAS/cuSOLVER or LAPACK/BLAS in $(basename "$binary")"
"$binary"
