# nvfp4cal image (CPU build of what exists today: the kernels library and its demo).
# The service binaries, CUDA runtime stage and probes come with the server and deploy work.
FROM debian:12 AS build
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN bash scripts/install-deps.sh && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DNVFP4CAL_CUDA=OFF \
      -DNVFP4CAL_BUILD_TESTS=OFF -DNVFP4CAL_BUILD_BENCH=OFF \
 && cmake --build build

FROM debian:12-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends \
      libabsl20220623 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 nvfp4cal
COPY --from=build /src/build/kernels/nvfp4cal-kernels-demo /usr/local/bin/
USER 10001
ENTRYPOINT ["/usr/local/bin/nvfp4cal-kernels-demo"]
