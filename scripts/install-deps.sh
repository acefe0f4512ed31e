#!/usr/bin/env bash
# Installs every Debian 12 package nvfp4cal's build and tests need (with --build-only: the
# build's alone, as the image's build stage uses it). Runs apt-get update first.
# Uses sudo when not run as root. CUDA is optional: the build finds nvcc at /usr/local/cuda when
# the toolkit is installed, and builds the CPU backend alone otherwise.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libabsl-dev                                   # Abseil 20220623 (status, strings, flags)
  libprotobuf-dev protobuf-compiler             # Protobuf 3.21
  libgrpc++-dev protobuf-compiler-grpc          # gRPC 1.51 and its protoc plugin
  prometheus-cpp-dev                            # prometheus-cpp 1.0 (server metrics)
  libgtest-dev libgmock-dev googletest          # GoogleTest / GoogleMock
  libbenchmark-dev                              # Google Benchmark
  nlohmann-json3-dev                            # JSON for the client (safetensors headers, configs)
  libcli11-dev                                  # CLI11 2.1 (the CLI's argument parsing; headers)
  liblapack-dev                                 # LAPACK (dpotrf, dtrtri) for gptq's Hessian factor
)
test_packages=(
  python3-grpcio python3-grpc-tools python3-numpy  # Python client test of the server
  python3-torch python3-tqdm python3-protobuf   # the Python package (python/) and its tests
  clang-format                                  # formatting check (.clang-format)
  yamllint python3-yaml                         # offline checks of the deployment files
  openssl                                       # test certificates (TLS / mTLS tests)
  clang-14 libclang-rt-14-dev                   # sanitizer build and libFuzzer targets (tests)
  podman runc uidmap slirp4netns mmdebstrap     # the container image test (deploy/image-test.sh)
)
if [ "${1:-}" != --build-only ]; then packages+=("${test_packages[@]}"); fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
$sudo apt-get install -y --no-install-recommends "${packages[@]}"
