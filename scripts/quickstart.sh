#!/usr/bin/env bash
# Fresh Debian 12 machine to a first result: installs the dependencies, builds, and runs the
# kernels demo on built-in example data (a generated toy decoder layer quantized with every
# method; the statistics table of docs/numerics.md §4).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)"
./build/kernels/nvfp4cal-kernels-demo "$@"
