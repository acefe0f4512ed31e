// CUDA backend against the CPU reference (NUMERICS §7). Skips, with the reason, when no CUDA
// device is present (and in builds without CUDA).
#include "nvfp4cal/kernels/cuda_scale_search.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#if defined(NVFP4CAL_HAVE_CUDA)
#include <cuda_runtime.h>
#endif
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"
#include "nvfp4cal/kernels/internal/block_search.h"
#include "nvfp4cal/kernels/scale_search.h"

namespace nvfp4cal {
namespace {

constexpr Method kMethods[] = {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss};

class CudaScaleSearchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string reason;
    if (!CudaDeviceAvailable(&reason)) GTEST_SKIP() << "no CUDA device: " << reason;
    absl::StatusOr<std::unique_ptr<CudaScaleSearch>> gpu = MakeCudaScaleSearch({});
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = *std::move(gpu);
    CudaScaleSearchOptions full;
    full.search = CudaSearchAlgorithm::kFull;
    absl::StatusOr<std::unique_ptr<CudaScaleSearch>> gpu_full = MakeCudaScaleSearch(full);
    ASSERT_TRUE(gpu_full.ok()) << gpu_full.status();
    gpu_full_ = *std::move(gpu_full);
    CudaScaleSearchOptions events;
    events.search = CudaSearchAlgorithm::kEvents;
    absl::StatusOr<std::unique_ptr<CudaScaleSearch>> gpu_events = MakeCudaScaleSearch(events);
    ASSERT_TRUE(gpu_events.ok()) << gpu_events.status();
    gpu_events_ = *std::move(gpu_events);
    cpu_ = MakeCpuScaleSearch({});
    std::printf("[ device    ] %s\n", gpu_->DeviceDescription().c_str());
  }
  std::unique_ptr<CudaScaleSearch> gpu_;         // pruned search with tile queues (the default)
  std::unique_ptr<CudaScaleSearch> gpu_full_;    // every candidate evaluated
  std::unique_ptr<CudaScaleSearch> gpu_events_;  // event-driven search
  std::unique_ptr<ScaleSearch> cpu_;
};

// A tensor whose blocks are all of one hard kind (NUMERICS §7).
enum class Kind {
  kTypical,
  kSaturated,
  kZeroBlocks,
  kSubnormalScales,
  kTinyG,
  kHugeG,
  kIllConditioned,
  kBoundaryQuotients  // w / q exactly on (or one ulp beside) an E2M1 rounding boundary
};

struct HardTensor {
  std::vector<float> w;
  std::vector<float> h;
  int64_t rows;
  int64_t cols;
};

HardTensor MakeHardTensor(Kind kind, int64_t rows, int64_t cols, uint64_t seed) {
  HardTensor t{
      MakeExampleWeights(rows, cols, seed),
      MakeExampleHessianBlocks(cols / 16, seed + 1, kind == Kind::kIllConditioned ? 30.0f : 1.0f),
      rows, cols};
  ExampleRng rng(seed + 2);
  double scale = 1.0;
  if (kind == Kind::kTinyG) scale = 1e-28;
  if (kind == Kind::kHugeG) scale = 1e28;
  float amax = 0.0f;
  for (float& v : t.w) {
    v = BFloat16ToFloat(FloatToBFloat16(static_cast<float>(v * scale)));
    amax = std::fmax(amax, std::fabs(v));
  }
  for (int64_t b = 0; b < rows * cols / 16; ++b) {
    float* block = t.w.data() + b * 16;
    const double u = rng.Uniform();
    if (kind == Kind::kSaturated && u < 0.5) {
      for (int i = 0; i < 4; ++i) block[rng.NextU64() % 16] = (i % 2 ? -amax : amax);
    } else if (kind == Kind::kZeroBlocks && u < 0.3) {
      std::fill(block, block + 16, 0.0f);
    } else if (kind == Kind::kSubnormalScales && u < 0.5) {
      for (int i = 0; i < 16; ++i) block[i] *= 1.0f / 4096.0f;
    } else if (kind == Kind::kBoundaryQuotients && u < 0.7) {
      // Four elements whose quotient by a sweep or DSS quantization scale near the block's own
      // scale is a rounding boundary of E2M1, or its fp32 neighbour: the GPU's reciprocal
      // products must fall back to the divisions there.
      const float s2 = GlobalScaleFromAmax(amax);
      float block_amax = 0.0f;
      for (int i = 0; i < 16; ++i) block_amax = std::fmax(block_amax, std::fabs(block[i]));
      const int k_max = MaxMethodScaleByte(block_amax, amax) - 1;
      const float boundaries[] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
      for (int n = 0; n < 4; ++n) {
        const int k = std::clamp(k_max + static_cast<int>(rng.NextU64() % 4) - 2, 0, 125);
        const float f = ScaleCandidateValue(k);
        const float q =
            rng.Uniform() < 0.5
                ? f * s2
                : DssQuantScale(DssBeta(static_cast<int>(rng.NextU64() % 21) - 10, 0.05f), amax, f);
        float v = boundaries[rng.NextU64() % 7] * q;
        const int nudge = static_cast<int>(rng.NextU64() % 3) - 1;
        if (nudge != 0) v = std::nextafter(v, nudge > 0 ? 2.0f * v : 0.0f);
        if (v <= amax) block[rng.NextU64() % 16] = rng.Uniform() < 0.5 ? v : -v;
      }
    }
  }
  if (kind == Kind::kZeroBlocks) std::fill(t.h.begin(), t.h.begin() + 256, 0.0f);  // unused input
  return t;
}

QuantizeRequest RequestFor(const HardTensor& t, Method m) {
  QuantizeRequest r;
  r.weights = {t.w.data(), DType::kFloat32, t.rows, t.cols};
  r.hessians = {t.h.data(), t.cols / 16};
  r.params.method = m;
  return r;
}

// A bf16 tensor [rows, cols] with its Hessian blocks (cols / 16 of them).
QuantizeRequest Bf16RequestFor(const std::vector<uint16_t>& w, int64_t rows, int64_t cols,
                               const std::vector<float>& h, Method m) {
  QuantizeRequest r;
  r.weights = {w.data(), DType::kBFloat16, rows, cols};
  r.hessians = {h.data(), cols / 16};
  r.params.method = m;
  return r;
}

// Canonical objective of (codes, scale) of one block in error units, as the CPU defines it.
float CanonicalObjective(const float* w, const float* h, const uint8_t* packed, uint8_t scale,
                         float global_scale, bool hessian) {
  ScaledBlock b{};
  PrepareScaledBlock(w, 0.0f, global_scale, &b);
  const float d_unit = DecodeE4M3(scale) * b.global_scale_unit;
  float e[16];
  for (int i = 0; i < 16; ++i) {
    const uint8_t code = i % 2 ? UnpackE2M1High(packed[i / 2]) : UnpackE2M1Low(packed[i / 2]);
    e[i] = b.w_unit[i] - DecodeE2M1(code) * d_unit;
  }
  return hessian ? BlockHessianError(h, e) : BlockSquaredError(e);
}

// Compares per block; differences must be near-ties of the canonical objective. Returns the
// number of blocks whose choice differs.
int64_t CompareWithCpu(const HardTensor& t, Method m, const QuantizedTensor& cpu,
                       const QuantizedTensor& gpu) {
  EXPECT_EQ(FloatBits(cpu.global_scale), FloatBits(gpu.global_scale));
  int64_t differ = 0;
  const int64_t blocks_per_row = t.cols / 16;
  for (int64_t b = 0; b < t.rows * blocks_per_row; ++b) {
    if (cpu.scales[b] == gpu.scales[b] &&
        std::memcmp(&cpu.packed_codes[b * 8], &gpu.packed_codes[b * 8], 8) == 0) {
      continue;
    }
    ++differ;
    const float* w = t.w.data() + b * 16;
    const float* h = t.h.data() + (b % blocks_per_row) * 256;
    const bool hessian = MethodNeedsHessian(m);
    const float a = CanonicalObjective(w, h, &cpu.packed_codes[b * 8], cpu.scales[b],
                                       cpu.global_scale, hessian);
    const float g = CanonicalObjective(w, h, &gpu.packed_codes[b * 8], gpu.scales[b],
                                       gpu.global_scale, hessian);
    EXPECT_LE(std::fabs(a - g), 1e-6f * std::fmax(std::fabs(a), std::fabs(g)))
        << MethodName(m) << " block " << b << ": not a near-tie (" << a << " vs " << g << ")";
  }
  return differ;
}

TEST_F(CudaScaleSearchTest, AgreesWithCpuOnAMillionBlocksPerMethodIncludingHardCases) {
  const Kind kinds[] = {
      Kind::kTypical, Kind::kSaturated, Kind::kZeroBlocks,     Kind::kSubnormalScales,
      Kind::kTinyG,   Kind::kHugeG,     Kind::kIllConditioned, Kind::kBoundaryQuotients};
  for (CudaScaleSearch* backend : {gpu_.get(), gpu_full_.get(), gpu_events_.get()})
    for (Method m : kMethods) {
      int64_t blocks = 0;
      int64_t differ = 0;
      for (size_t k = 0; k < std::size(kinds); ++k) {
        const HardTensor t = MakeHardTensor(kinds[k], 576, 4096, 100 + k);
        absl::StatusOr<QuantizedTensor> cpu = cpu_->Quantize(RequestFor(t, m));
        absl::StatusOr<QuantizedTensor> gpu = backend->Quantize(RequestFor(t, m));
        ASSERT_TRUE(cpu.ok()) << cpu.status();
        ASSERT_TRUE(gpu.ok()) << gpu.status();
        differ += CompareWithCpu(t, m, *cpu, *gpu);
        blocks += t.rows * t.cols / 16;
        EXPECT_EQ(cpu->stats.num_blocks, gpu->stats.num_blocks);
        EXPECT_EQ(cpu->stats.blocks_scale_changed, gpu->stats.blocks_scale_changed);
        EXPECT_EQ(cpu->stats.blocks_beta_not_one, gpu->stats.blocks_beta_not_one);
        EXPECT_EQ(cpu->stats.zero_hessian_blocks, gpu->stats.zero_hessian_blocks);
        EXPECT_NEAR(cpu->stats.objective_after, gpu->stats.objective_after,
                    1e-9 * std::fabs(cpu->stats.objective_after));
      }
      std::printf(
          "[ agreement ] %s search, %s: %lld blocks, %lld near-tie differences\n",
          backend == gpu_.get() ? "pruned" : (backend == gpu_full_.get() ? "full" : "event"),
          std::string(MethodName(m)).c_str(), static_cast<long long>(blocks),
          static_cast<long long>(differ));
      EXPECT_GE(blocks, 1000000);
    }
}

TEST_F(CudaScaleSearchTest, DssGridsInsideAndBeyondTheQueueMatchCpu) {
  // Default grid (63 candidates), a finer one that still fits the pruned kernel's queue (3 x 41)
  // and a wide one that does not (7 x 201: the per-row fallback), on hard kinds.
  struct Grid {
    int neighbours;
    float beta_step;
  };
  const Grid grids[] = {{1, 0.05f}, {1, 0.025f}, {3, 0.005f}};
  for (const Grid& g : grids) {
    for (Kind kind :
         {Kind::kTypical, Kind::kSaturated, Kind::kIllConditioned, Kind::kBoundaryQuotients}) {
      const HardTensor t = MakeHardTensor(kind, 200, 512, 500 + static_cast<uint64_t>(kind));
      QuantizeRequest r = RequestFor(t, Method::kDss);
      r.params.scale_neighbours = g.neighbours;
      r.params.beta_step = g.beta_step;
      absl::StatusOr<QuantizedTensor> cpu = cpu_->Quantize(r);
      absl::StatusOr<QuantizedTensor> gpu = gpu_->Quantize(r);
      ASSERT_TRUE(cpu.ok()) << cpu.status();
      ASSERT_TRUE(gpu.ok()) << gpu.status();
      EXPECT_EQ(CompareWithCpu(t, Method::kDss, *cpu, *gpu), 0)
          << "neighbours " << g.neighbours << " beta_step " << g.beta_step;
      EXPECT_EQ(cpu->stats.blocks_beta_not_one, gpu->stats.blocks_beta_not_one);
      EXPECT_EQ(cpu->stats.blocks_offset_not_zero, gpu->stats.blocks_offset_not_zero);
    }
  }
}

TEST_F(CudaScaleSearchTest, AllZeroTensorWritesItsScalesAndCodesAfterOtherWork) {
  // g = 0: s2 = 0, every code 0 and the method's all-zero scale byte (NUMERICS §3), written
  // even when the device workspace still holds an earlier tensor's results.
  const HardTensor busy = MakeHardTensor(Kind::kTypical, 256, 512, 600);
  HardTensor zero = MakeHardTensor(Kind::kTypical, 256, 512, 601);
  std::fill(zero.w.begin(), zero.w.end(), 0.0f);
  for (CudaScaleSearch* backend : {gpu_.get(), gpu_full_.get()}) {
    for (Method m : kMethods) {
      ASSERT_TRUE(backend->Quantize(RequestFor(busy, m)).ok());
      absl::StatusOr<QuantizedTensor> cpu = cpu_->Quantize(RequestFor(zero, m));
      absl::StatusOr<QuantizedTensor> gpu = backend->Quantize(RequestFor(zero, m));
      ASSERT_TRUE(cpu.ok()) << cpu.status();
      ASSERT_TRUE(gpu.ok()) << gpu.status();
      EXPECT_EQ(cpu->scales, gpu->scales) << MethodName(m);
      EXPECT_EQ(cpu->packed_codes, gpu->packed_codes) << MethodName(m);
      EXPECT_EQ(gpu->scales[0], m == Method::kMax ? 0x7E : 0x01) << MethodName(m);
    }
  }
}

TEST_F(CudaScaleSearchTest, LargeTensorChunkedByTheMemoryBudgetMatchesCpu) {
  const int64_t rows = 28672;
  const int64_t cols = 8192;
  const std::vector<uint16_t> w = MakeExampleWeightsBf16(rows, cols, 7);
  const std::vector<float> h = MakeExampleHessianBlocks(cols / 16, 8);
  absl::StatusOr<std::unique_ptr<CudaScaleSearch>> small =
      MakeCudaScaleSearch({0, int64_t{64} << 20, nullptr});
  ASSERT_TRUE(small.ok()) << small.status();
  for (Method m : {Method::kLocalHessian, Method::kDss}) {
    const QuantizeRequest r = Bf16RequestFor(w, rows, cols, h, m);
    absl::StatusOr<QuantizedTensor> cpu = cpu_->Quantize(r);
    absl::StatusOr<QuantizedTensor> gpu = (*small)->Quantize(r);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    EXPECT_GT((*small)->LastCallTiming().launches, 1) << "the 64 MiB budget must force chunks";
    EXPECT_EQ(cpu->scales, gpu->scales);
    EXPECT_EQ(cpu->packed_codes, gpu->packed_codes);
    // The default 1 GiB budget would hold the 470 MB of weights in one launch; a launch's
    // workspace (and its page-locked host mirror) stops at 256 MiB.
    absl::StatusOr<QuantizedTensor> capped = gpu_->Quantize(r);
    ASSERT_TRUE(capped.ok()) << capped.status();
    EXPECT_GE(gpu_->LastCallTiming().launches, 2) << "launches stop at 256 MiB";
    EXPECT_EQ(cpu->scales, capped->scales);
    EXPECT_EQ(cpu->packed_codes, capped->packed_codes);
    EXPECT_EQ(cpu->stats.num_blocks, capped->stats.num_blocks);
  }
}

// The fallback when page-locked memory cannot be had: the same launches through a pageable
// mirror give the same bytes (several launches: 50 MB of weights under the smallest budget,
// 16 MiB).
TEST_F(CudaScaleSearchTest, PageableMirrorGivesTheBytesOfThePinnedOne) {
  const int64_t rows = 6144;
  const int64_t cols = 4096;
  const std::vector<uint16_t> w = MakeExampleWeightsBf16(rows, cols, 11);
  const std::vector<float> h = MakeExampleHessianBlocks(cols / 16, 12);
  CudaScaleSearchOptions pageable;
  pageable.memory_budget_bytes = int64_t{16} << 20;
  pageable.pinned_mirror = false;
  absl::StatusOr<std::unique_ptr<CudaScaleSearch>> gpu = MakeCudaScaleSearch(pageable);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  for (Method m : {Method::kDss, Method::kMse}) {
    const QuantizeRequest r = Bf16RequestFor(w, rows, cols, h, m);
    absl::StatusOr<QuantizedTensor> pinned = gpu_->Quantize(r);
    absl::StatusOr<QuantizedTensor> paged = (*gpu)->Quantize(r);
    absl::StatusOr<QuantizedTensor> cpu = cpu_->Quantize(r);
    ASSERT_TRUE(pinned.ok()) << pinned.status();
    ASSERT_TRUE(paged.ok()) << paged.status();
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    EXPECT_GT((*gpu)->LastCallTiming().launches, 1) << MethodName(m);
    EXPECT_EQ(paged->packed_codes, pinned->packed_codes) << MethodName(m);
    EXPECT_EQ(paged->scales, pinned->scales) << MethodName(m);
    EXPECT_EQ(paged->scales, cpu->scales) << MethodName(m);
    EXPECT_EQ(paged->stats.num_blocks, pinned->stats.num_blocks) << MethodName(m);
  }
}

TEST_F(CudaScaleSearchTest, BatchOfMixedShapesEqualsOneByOne) {
  struct Item {
    int64_t rows, cols;
    Method method;
    DType dtype;
  };
  const Item items[] = {{300, 512, Method::kDss, DType::kBFloat16},
                        {17, 4096, Method::kLocalHessian, DType::kFloat32},
                        {1024, 256, Method::kMse, DType::kFloat16},
                        {5, 16, Method::kMax, DType::kBFloat16},
                        {129, 512, Method::kDss, DType::kBFloat16}};
  std::vector<std::vector<uint16_t>> half;
  std::vector<std::vector<float>> full;
  std::vector<std::vector<float>> hessians;
  std::vector<QuantizeRequest> requests;
  for (size_t i = 0; i < std::size(items); ++i) {
    const Item& it = items[i];
    std::vector<float> f = MakeExampleWeights(it.rows, it.cols, 200 + i);
    std::vector<uint16_t> hb(f.size());
    for (size_t e = 0; e < f.size(); ++e) {
      hb[e] = it.dtype == DType::kFloat16 ? FloatToFloat16(f[e]) : FloatToBFloat16(f[e]);
    }
    half.push_back(std::move(hb));
    full.push_back(std::move(f));
    // Items 0 and 4 share one Hessian (same input), as q/k/v do.
    if (i == 4) {
      hessians.push_back(hessians[0]);
    } else {
      hessians.push_back(MakeExampleHessianBlocks(it.cols / 16, 300 + i));
    }
  }
  for (size_t i = 0; i < std::size(items); ++i) {
    QuantizeRequest r;
    const bool f32 = items[i].dtype == DType::kFloat32;
    r.weights = {f32 ? static_cast<const void*>(full[i].data()) : half[i].data(), items[i].dtype,
                 items[i].rows, items[i].cols};
    r.hessians = {(i == 4 ? hessians[0] : hessians[i]).data(), items[i].cols / 16};
    r.params.method = items[i].method;
    requests.push_back(r);
  }
  // One by one on the CPU; all at once on the GPU, in row ranges (two slices per tensor).
  std::vector<QuantizedTensor> expected;
  for (const QuantizeRequest& r : requests) {
    absl::StatusOr<QuantizedTensor> q = cpu_->Quantize(r);
    ASSERT_TRUE(q.ok()) << q.status();
    expected.push_back(*std::move(q));
  }
  std::vector<std::vector<uint8_t>> codes(requests.size()), scales(requests.size());
  std::vector<TensorStats> stats(2 * requests.size());
  std::vector<CudaScaleSearch::Slice> slices;
  for (size_t i = 0; i < requests.size(); ++i) {
    const int64_t rows = items[i].rows, cols = items[i].cols;
    codes[i].resize(rows * cols / 2);
    scales[i].resize(rows * cols / 16);
    const int64_t split = rows / 2;
    for (int part = 0; part < 2; ++part) {
      const int64_t b = part == 0 ? 0 : split, e = part == 0 ? split : rows;
      if (b == e) continue;
      slices.push_back(CudaScaleSearch::Slice{
          &requests[i], expected[i].global_amax, b, e,
          RowRangeOutput{absl::MakeSpan(codes[i]).subspan(b * cols / 2, (e - b) * cols / 2),
                         absl::MakeSpan(scales[i]).subspan(b * cols / 16, (e - b) * cols / 16)},
          &stats[2 * i + part]});
    }
  }
  ASSERT_TRUE(gpu_->QuantizeBatch(slices).ok());
  EXPECT_EQ(gpu_->LastCallTiming().launches, 1);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(codes[i], expected[i].packed_codes) << "tensor " << i;
    EXPECT_EQ(scales[i], expected[i].scales) << "tensor " << i;
    EXPECT_EQ(stats[2 * i].num_blocks + stats[2 * i + 1].num_blocks, expected[i].stats.num_blocks);
  }
}

#if defined(NVFP4CAL_HAVE_CUDA)
TEST_F(CudaScaleSearchTest, AllocationFailureIsResourceExhaustedAndTheBackendRecovers) {
  const HardTensor t = MakeHardTensor(Kind::kTypical, 8192, 1024, 9);  // 32 MiB of fp32
  absl::StatusOr<std::unique_ptr<CudaScaleSearch>> fresh = MakeCudaScaleSearch({});
  ASSERT_TRUE(fresh.ok());
  // Hold nearly all free device memory, so the backend's workspace cannot be allocated.
  std::vector<void*> held;
  for (size_t chunk = size_t{1} << 30; chunk >= (size_t{1} << 20);) {
    void* p = nullptr;
    if (cudaMalloc(&p, chunk) == cudaSuccess) {
      held.push_back(p);
    } else {
      (void)cudaGetLastError();
      chunk /= 2;
    }
  }
  absl::StatusOr<QuantizedTensor> failed = (*fresh)->Quantize(RequestFor(t, Method::kMse));
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kResourceExhausted) << failed.status();
  for (void* p : held) cudaFree(p);
  absl::StatusOr<QuantizedTensor> retried = (*fresh)->Quantize(RequestFor(t, Method::kMse));
  ASSERT_TRUE(retried.ok()) << retried.status();
  absl::StatusOr<QuantizedTensor> cpu = cpu_->Quantize(RequestFor(t, Method::kMse));
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(retried->scales, cpu->scales);
}
#endif

TEST_F(CudaScaleSearchTest, ValidatedSlicesSkipOnlyTheDataScans) {
  HardTensor t = MakeHardTensor(Kind::kTypical, 64, 256, 11);
  const QuantizeRequest request = RequestFor(t, Method::kDss);
  absl::StatusOr<QuantizedTensor> cpu = cpu_->Quantize(request);
  ASSERT_TRUE(cpu.ok());
  absl::StatusOr<ValidatedRequest> validated = ValidateQuantizeRequest(request);
  ASSERT_TRUE(validated.ok());
  const ValidatedRows rows = validated->AllRows();
  std::vector<uint8_t> codes(cpu->packed_codes.size()), scales(cpu->scales.size());
  TensorStats stats;
  CudaScaleSearch::Slice slice =
      CudaScaleSearch::Slice::Of(rows, {absl::MakeSpan(codes), absl::MakeSpan(scales)}, &stats);
  ASSERT_TRUE(gpu_->QuantizeBatch(absl::MakeConstSpan(&slice, 1)).ok());
  EXPECT_EQ(codes, cpu->packed_codes);
  EXPECT_EQ(scales, cpu->scales);
  // A slice that is not exactly its validated rows is refused.
  CudaScaleSearch::Slice changed = slice;
  changed.global_amax = cpu->global_amax * 0.5f;
  EXPECT_EQ(gpu_->QuantizeBatch(absl::MakeConstSpan(&changed, 1)).code(),
            absl::StatusCode::kInvalidArgument);
  changed = slice;
  changed.row_end = t.rows / 2;
  EXPECT_EQ(gpu_->QuantizeBatch(absl::MakeConstSpan(&changed, 1)).code(),
            absl::StatusCode::kInvalidArgument);
  // Without the rows everything is checked: g below the weights' amax is caught.
  changed = slice;
  changed.validated = nullptr;
  changed.global_amax = cpu->global_amax * 0.5f;
  EXPECT_EQ(gpu_->QuantizeBatch(absl::MakeConstSpan(&changed, 1)).code(),
            absl::StatusCode::kInvalidArgument);
  // Output sizes are always checked.
  changed = slice;
  changed.output.scales = changed.output.scales.subspan(1);
  EXPECT_EQ(gpu_->QuantizeBatch(absl::MakeConstSpan(&changed, 1)).code(),
            absl::StatusCode::kInvalidArgument);
  // QuantizeValidatedRows takes the same path.
  std::vector<uint8_t> codes2(codes.size()), scales2(scales.size());
  TensorStats stats2;
  ASSERT_TRUE(
      gpu_->QuantizeValidatedRows(rows, {absl::MakeSpan(codes2), absl::MakeSpan(scales2)}, &stats2)
          .ok());
  EXPECT_EQ(codes2, cpu->packed_codes);
}

TEST_F(CudaScaleSearchTest, SharedPruningTablesAreUploadedAndGiveTheComputedTablesBytes) {
  // A server computes a Hessian's pruning tables once (SharedHessianPruning) and every launch
  // uploads them instead of computing its own: the bytes and statistics must not change.
  for (Kind kind : {Kind::kTypical, Kind::kIllConditioned, Kind::kZeroBlocks}) {
    const HardTensor t = MakeHardTensor(kind, 256, 1024, 40 + static_cast<uint64_t>(kind));
    const SharedHessianPruning pruning =
        ComputeSharedHessianPruning(BlockHessiansView{t.h.data(), t.cols / 16});
    for (Method m : {Method::kLocalHessian, Method::kDss}) {
      const QuantizeRequest computed = RequestFor(t, m);
      QuantizeRequest shared = computed;
      pruning.AttachTo(&shared);
      absl::StatusOr<QuantizedTensor> a = gpu_->Quantize(computed);
      absl::StatusOr<QuantizedTensor> b = gpu_->Quantize(shared);
      ASSERT_TRUE(a.ok() && b.ok()) << a.status() << " " << b.status();
      EXPECT_EQ(a->packed_codes, b->packed_codes) << MethodName(m);
      EXPECT_EQ(a->scales, b->scales) << MethodName(m);
      EXPECT_EQ(FloatBits(static_cast<float>(a->stats.objective_after)),
                FloatBits(static_cast<float>(b->stats.objective_after)));
    }
  }
  // The given tables are the ones the kernel reads: bounds that claim every block's precision
  // is enormous prune the true optimum away, so the choice changes (a contract violation no
  // caller makes; here it shows that the launch did not compute its own).
  const HardTensor t = MakeHardTensor(Kind::kTypical, 64, 256, 47);
  const SharedHessianPruning pruning =
      ComputeSharedHessianPruning(BlockHessiansView{t.h.data(), t.cols / 16});
  std::vector<HessianBlockBounds> wrong = *pruning.bounds;
  for (HessianBlockBounds& b : wrong)
    std::fill(std::begin(b.precision), std::end(b.precision), 1e30f);
  QuantizeRequest request = RequestFor(t, Method::kLocalHessian);
  absl::StatusOr<QuantizedTensor> right = gpu_->Quantize(request);
  pruning.AttachTo(&request);
  request.hessian_bounds = wrong.data();
  absl::StatusOr<QuantizedTensor> pruned_away = gpu_->Quantize(request);
  ASSERT_TRUE(right.ok() && pruned_away.ok());
  EXPECT_NE(right->scales, pruned_away->scales);
}

TEST_F(CudaScaleSearchTest, ValidationErrorsLaunchNothing) {
  HardTensor t = MakeHardTensor(Kind::kTypical, 8, 64, 10);
  t.w[5] = std::nanf("");
  absl::StatusOr<QuantizedTensor> r = gpu_->Quantize(RequestFor(t, Method::kDss));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gpu_->LastCallTiming().launches, 0);
}

}  // namespace
}  // namespace nvfp4cal
