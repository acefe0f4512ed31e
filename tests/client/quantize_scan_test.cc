// The weights' scan beside the quantizer: ScanModules (quantize_prepare.h) opens each unit when
// its global amax is known, and TaskGate / AwaitTask (quantizer.h) hand that to the quantizer.
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "client/quantize_prepare.h"
#include "client/quantizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/client/quantize_test_util.h"

namespace nvfp4cal::testing {
namespace {

using client_internal::PreparedModule;
using client_internal::ScanModules;
using ::testing::HasSubstr;

TEST(TaskGate, WaitBlocksUntilOpenAndTheFirstOutcomeCounts) {
  TaskGate gate;
  std::atomic<bool> returned{false};
  absl::Status seen;
  std::thread waiter([&] {
    seen = gate.Wait();
    returned.store(true);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(returned.load());
  gate.Open(absl::InvalidArgumentError("first"));
  waiter.join();
  EXPECT_EQ(seen, absl::InvalidArgumentError("first"));
  gate.Open(absl::OkStatus());  // ignored
  EXPECT_EQ(gate.Wait(), absl::InvalidArgumentError("first"));

  TensorTask without_gate;
  EXPECT_TRUE(AwaitTask(without_gate).ok());
  TensorTask with_gate;
  with_gate.ready = &gate;
  EXPECT_EQ(AwaitTask(with_gate), absl::InvalidArgumentError("first"));
}

// bf16 bits of v (truncated: every value used here is exact in bf16).
uint16_t Bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return static_cast<uint16_t>(bits >> 16);
}

// Units of one decoder layer: q, k, v fused, o alone, gate and up fused, down alone; weights
// [rows, 32] bf16 with a known max |w| each.
struct Layer {
  std::vector<ModulePlan> plans;
  std::vector<std::vector<uint16_t>> weights;
  std::vector<float> own_amax;
  std::vector<PreparedModule> prepared;

  explicit Layer(uint32_t seed) {
    const char* names[] = {"q", "k", "v", "o", "gate", "up", "down"};
    const char* groups[] = {"qkv", "qkv", "qkv", "", "mlp", "mlp", ""};
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> level(-60, 60);
    plans.resize(7);
    for (size_t i = 0; i < 7; ++i) {
      ModulePlan& p = plans[i];
      p.module = std::string("layer.") + names[i];
      p.weight_name = p.module + ".weight";
      p.rows = 8 + 8 * static_cast<int64_t>(i);
      p.cols = 32;
      p.dtype = DType::kBFloat16;
      p.fused_group = groups[i];
      std::vector<uint16_t> w(static_cast<size_t>(p.rows * p.cols));
      float amax = 0.0f;
      for (uint16_t& x : w) {
        const float v = static_cast<float>(level(rng)) / 16.0f;
        amax = std::max(amax, std::fabs(v));
        x = Bf16(v);
      }
      weights.push_back(std::move(w));
      own_amax.push_back(amax);
    }
    for (size_t i = 0; i < 7; ++i) {
      PreparedModule m;
      m.plan = &plans[i];
      m.name = plans[i].module;
      m.weights = weights[i].data();
      prepared.push_back(std::move(m));
    }
  }
};

TEST(ScanModules, EachUnitOpensOnceWithItsFusedGroupsAmax) {
  Layer layer(7);
  std::map<size_t, int> calls;
  std::map<size_t, absl::Status> outcome;
  ScanModules(
      &layer.prepared, [] { return false; },
      [&](size_t i, const absl::Status& s) {
        ++calls[i];
        outcome[i] = s;
      });
  const std::vector<float>& a = layer.own_amax;
  const float qkv = std::max({a[0], a[1], a[2]});
  const float mlp = std::max(a[4], a[5]);
  const float expected[] = {qkv, qkv, qkv, a[3], mlp, mlp, a[6]};
  for (size_t i = 0; i < 7; ++i) {
    EXPECT_EQ(calls[i], 1) << i;
    EXPECT_TRUE(outcome[i].ok()) << i << ": " << outcome[i];
    EXPECT_EQ(layer.prepared[i].own_amax, a[i]) << i;
    EXPECT_EQ(layer.prepared[i].global_amax, expected[i]) << i;
    ASSERT_TRUE(layer.prepared[i].scan.has_value()) << i;
    EXPECT_EQ(layer.prepared[i].scan->amax(), a[i]) << i;
  }
}

TEST(ScanModules, AFailedScanFailsItsWholeGroupAndNoOtherUnit) {
  Layer layer(11);
  layer.weights[1][37] = Bf16(std::numeric_limits<float>::quiet_NaN());  // k: element (1, 5)
  std::map<size_t, absl::Status> outcome;
  std::map<size_t, int> calls;
  ScanModules(
      &layer.prepared, [] { return false; },
      [&](size_t i, const absl::Status& s) {
        ++calls[i];
        outcome[i] = s;
      });
  for (size_t i : {0, 1, 2}) {
    EXPECT_EQ(calls[i], 1);
    EXPECT_EQ(outcome[i].code(), absl::StatusCode::kInvalidArgument) << i;
    EXPECT_THAT(std::string(outcome[i].message()), HasSubstr("tensor 'layer.k.weight'")) << i;
    EXPECT_THAT(std::string(outcome[i].message()), HasSubstr("(1, 5) is nan")) << i;
  }
  for (size_t i : {3, 4, 5, 6}) {
    EXPECT_EQ(calls[i], 1);
    EXPECT_TRUE(outcome[i].ok()) << i << ": " << outcome[i];
  }
}

TEST(ScanModules, StoppedRunCancelsTheUnitsNotScannedAndStillOpensEveryOne) {
  Layer layer(13);
  std::map<size_t, absl::Status> outcome;
  ScanModules(
      &layer.prepared, [] { return true; },
      [&](size_t i, const absl::Status& s) { outcome[i] = s; });
  ASSERT_EQ(outcome.size(), 7u);
  for (const auto& [i, s] : outcome) EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << i;
}

// Wraps the CPU quantizer and checks, for every task it is handed, that the late fields are
// there once AwaitTask returns, and that the pipeline handed every task over at once.
class CheckingQuantizer : public Quantizer {
 public:
  CheckingQuantizer() : inner_(MakeLocalQuantizer(MakeCpuScaleSearch({}), "test cpu")) {}
  std::string Describe() const override { return "checking"; }
  absl::Status QuantizeAll(absl::Span<const TensorTask> tasks,
                           const QuantizeResultCallback& on_result) override {
    for (const TensorTask& t : tasks) {
      if (t.ready == nullptr) return absl::InternalError(t.name + " has no gate");
    }
    absl::Status done = inner_->QuantizeAll(tasks, on_result);
    for (const TensorTask& t : tasks) {
      if (!AwaitTask(t).ok()) continue;
      if (!t.weight_scan.has_value()) return absl::InternalError(t.name + " has no scan");
      amax_[t.name] = t.global_amax;
    }
    return done;
  }
  std::map<std::string, float> amax_;

 private:
  std::unique_ptr<Quantizer> inner_;
};

TEST(ScanModules, PipelineHandsTasksWithGatesAndTheirGroupsAmax) {
  TempFolder dir("scan_gates");
  WriteTinyModel(dir / "model", 64, {"q_proj", "k_proj", "v_proj", "o_proj"}, 1.0f);
  QuantizeOptions options;
  options.model_dir = dir / "model";
  options.out_dir = dir / "out";
  options.params.method = Method::kMax;
  CheckingQuantizer quantizer;
  absl::StatusOr<QuantizeReport> report = QuantizeCheckpoint(options, &quantizer, nullptr);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_GE(report->scan_seconds, 0.0);
  const std::string p = "model.layers.0.self_attn.";
  ASSERT_EQ(quantizer.amax_.size(), 4u);
  // WriteTinyModel's values: (k - 11) / 64 for k in [0, 22], so max |w| = 11/64 for each.
  for (const char* leaf : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
    EXPECT_EQ(quantizer.amax_.at(p + leaf + ".weight"), 11.0f / 64.0f) << leaf;
  }
}

}  // namespace
}  // namespace nvfp4cal::testing
