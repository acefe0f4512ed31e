#!/usr/bin/env bash
# Fresh Debian 12 machine to a first result: installs the dependencies, builds, writes the
# built-in example checkpoint (a small Llama-shaped model with Hessians; no network needed),
# quantizes it to NVFP4 with the default method (dss) and prints the per-layer statistics and a
# summary of the written checkpoint. Extra arguments go to `nvfp4cal quantize`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)"
rm -rf example example-nvfp4
./build/client/nvfp4cal example --out example
./build/client/nvfp4cal quantize --model example --hessians example/hessians.safetensors \
  --out example-nvfp4 "$@"
./build/client/nvfp4cal inspect example-nvfp4
