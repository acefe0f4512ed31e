# syntax=docker/dockerfile:1
# nvfp4cal image: nvfp4cal-server (entrypoint) and the nvfp4cal CLI.
#
#   docker build -t nvfp4cal:0.1.0 .
#   docker run --gpus all -p 50051:50051 -p 9400:9400 nvfp4cal:0.1.0 --device=auto
#   docker build --build-arg BACKEND=cpu -t nvfp4cal:0.1.0-cpu .     # CPU backend only
#
# Base images. NVIDIA publishes CUDA images for Ubuntu, Rocky Linux and UBI only, not for
# Debian, and the binaries link Debian 12's gRPC 1.51 / Protobuf 3.21 / Abseil 20220623
# sonames, which Ubuntu's nvidia/cuda images do not carry. So both stages are Debian 12:
#   build:   debian:12 + scripts/install-deps.sh + nvcc and the CUDA runtime from NVIDIA's
#            Debian 12 apt repository (developer.download.nvidia.com/compute/cuda/repos/debian12).
#   runtime: debian:12-slim + Debian's runtime library packages + libcudart.so.13 copied from
#            the build stage. The GPU driver (libcuda.so) is not in the image: the NVIDIA
#            container toolkit mounts the host's driver into the container, selected by the
#            NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES variables set below (the same
#            variables nvidia/cuda images set). Without a GPU the server runs on the CPU backend
#            (--device=auto or --device=cpu).
# BACKEND=cpu compiles without CUDA (no NVIDIA repository needed); BACKEND=prebuilt takes the
# binaries from the build context (deploy/image-test.sh, which builds and runs this image).
# deploy/check.sh checks this file: the build stage runs scripts/install-deps.sh, the runtime
# packages provide every shared library of the built binaries, entrypoint flags exist, user and
# ports.

ARG CUDA_PKG_VERSION=13-0
ARG CUDA_VERSION=13.0
# Where the binaries come from: cuda (default; the CUDA and CPU backends, compiled in stage
# build-cuda), cpu (the CPU backend only, compiled in build-cpu; needs no NVIDIA repository) or
# prebuilt (bin/nvfp4cal-server, bin/nvfp4cal and lib/ of the build context, built on a Debian 12
# host; deploy/image-test.sh uses it). Every stage after the build stage is the same for all
# three; stages the chosen one does not use are skipped.
ARG BACKEND=cuda

# Toolchain: the packages of a development machine (scripts/install-deps.sh).
FROM debian:12 AS deps
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN bash scripts/install-deps.sh --build-only && rm -rf /var/lib/apt/lists/*

FROM deps AS build-cuda
ARG CUDA_PKG_VERSION
ARG CUDA_VERSION
# Compute capabilities compiled into the CUDA backend (90 = H100/H200).
ARG CUDA_ARCHITECTURES=90
# CUDA toolkit (compiler, runtime, cuBLAS and cuSOLVER for gptq) from NVIDIA's Debian 12
# repository.
ADD https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb /tmp/cuda-keyring.deb
RUN dpkg -i /tmp/cuda-keyring.deb && rm /tmp/cuda-keyring.deb \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      cuda-nvcc-${CUDA_PKG_VERSION} cuda-cudart-dev-${CUDA_PKG_VERSION} \
      libcublas-dev-${CUDA_PKG_VERSION} libcusolver-dev-${CUDA_PKG_VERSION} \
 && rm -rf /var/lib/apt/lists/*
COPY . .
# The image gets the CUDA runtime and what the CUDA gptq backend dlopens: cuBLAS, cuSOLVER and
# cuSOLVER's own dependencies.
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DNVFP4CAL_CUDA=ON -DCMAKE_CUDA_COMPILER=/usr/local/cuda-${CUDA_VERSION}/bin/nvcc \
      -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} \
      -DNVFP4CAL_BUILD_TESTS=OFF -DNVFP4CAL_BUILD_BENCH=OFF \
 && cmake --build build --target nvfp4cal-server nvfp4cal \
 && mkdir -p /out/bin /out/lib \
 && cp build/server/nvfp4cal-server build/client/nvfp4cal /out/bin/ \
 && cp -P /usr/local/cuda-${CUDA_VERSION}/targets/x86_64-linux/lib/libcudart.so.13* /out/lib/ \
 && for lib in libcublas.so.13 libcublasLt.so.13 libcusolver.so.12 libcusparse.so.12 \
               libnvJitLink.so.13; do \
      cp -P /usr/local/cuda-${CUDA_VERSION}/targets/x86_64-linux/lib/$lib* /out/lib/; done

FROM deps AS build-cpu
COPY . .
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DNVFP4CAL_CUDA=OFF \
      -DNVFP4CAL_BUILD_TESTS=OFF -DNVFP4CAL_BUILD_BENCH=OFF \
 && cmake --build build --target nvfp4cal-server nvfp4cal \
 && mkdir -p /out/bin /out/lib \
 && cp build/server/nvfp4cal-server build/client/nvfp4cal /out/bin/

FROM scratch AS build-prebuilt
COPY bin/nvfp4cal-server bin/nvfp4cal /out/bin/
COPY lib/ /out/lib/

FROM build-${BACKEND} AS build

FROM debian:12-slim AS runtime
# Runtime libraries of nvfp4cal-server and nvfp4cal (Debian 12 packages of the -dev packages in
# scripts/install-deps.sh); libc6, libgcc-s1, libstdc++6 and zlib1g come with the base image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libabsl20220623 libc-ares2 libcivetweb1 libgrpc++1.51 libgrpc29 \
      libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libprotobuf32 libre2-9 libssl3 \
      liblapack3 libblas3 libgfortran5 libquadmath0 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 nvfp4cal \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin nvfp4cal
COPY --from=build /out/lib/ /usr/local/lib/nvfp4cal/
COPY --from=build /out/bin/nvfp4cal-server /out/bin/nvfp4cal /usr/local/bin/
RUN echo /usr/local/lib/nvfp4cal > /etc/ld.so.conf.d/nvfp4cal.conf && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
# 50051: gRPC (Calibrator, grpc.health.v1.Health, reflection); 9400: Prometheus /metrics.
EXPOSE 50051 9400
# Kubernetes uses native gRPC probes (deploy/k8s); this check only tests that the gRPC port
# accepts connections, with bash's /dev/tcp (no extra tools in the image).
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/50051"]
# Exec form: the server is PID 1 and receives SIGTERM directly (drain, then exit 0).
ENTRYPOINT ["/usr/local/bin/nvfp4cal-server"]
CMD ["--address=0.0.0.0:50051", "--metrics_address=0.0.0.0:9400", "--device=auto"]
