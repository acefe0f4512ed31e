#!/usr/bin/env bash
# Checks that every tracked C++ / CUDA source is formatted as .clang-format says (clang-format
# --dry-run --Werror); prints the files that are not and how to fix them. Exit 77 (a skip in
# ctest) when clang-format or git is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang-format >/dev/null || ! git rev-parse --git-dir >/dev/null 2>&1; then
  echo "format check skipped: needs clang-format (Debian package clang-format) and a git checkout"
  exit 77
fi
mapfile -t files < <(git ls-files '*.cc' '*.h' '*.cu' '*.cuh')
bad=()
for f in "${files[@]}"; do
  if ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then bad+=("$f"); fi
done
if [ ${#bad[@]} -gt 0 ]; then
  echo "not formatted as .clang-format says (${#bad[@]} of ${#files[@]} files):"
  printf '  %s\n' "${bad[@]}"
  echo "fix: clang-format -i ${bad[*]}"
  exit 1
fi
echo "format check: ${#files[@]} files formatted as .clang-format says"
