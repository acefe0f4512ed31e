// The weights' scan beside the quantizer: ScanModules (quantize_prepare.h) opens each unit when
// its global amax is known, and TaskGate / AwaitTask (quantizer.h) hand that to the quantizer.
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "client/hessians.h"
#include "client/local_quantizer.h"
#include "client/quantize_prepare.h"
#include "client/quantizer.h"
#include "client/result_writer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"
#include "nvfp4cal/kernels/gptq.h"
#include "tests/client/quantize_test_util.h"

namespace nvfp4cal::testing {
namespace {

using client_internal::PlanReadAhead;
using client_internal::PreparedModule;
using client_internal::ReadAhead;
using client_internal::ScanGroups;
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

// What ScanModules reported for each unit of `layer` (budget: 1 MiB; stopped() as given).
struct ScanOutcome {
  std::map<size_t, int> calls;
  std::map<size_t, absl::Status> status;
};
ScanOutcome Scan(Layer& layer, bool stopped, HessianStore* hessians = nullptr) {
  ScanOutcome out;
  ReadAhead read_ahead(1 << 20);
  ScanModules(
      &layer.prepared, ScanGroups(layer.prepared), hessians, &read_ahead, nullptr,
      [stopped] { return stopped; },
      [&](size_t i, const absl::Status& s) {
        ++out.calls[i];
        out.status[i] = s;
      });
  return out;
}

TEST(ScanModules, EachUnitOpensOnceWithItsFusedGroupsAmax) {
  Layer layer(7);
  const ScanOutcome scanned = Scan(layer, false);
  const std::map<size_t, int>& calls = scanned.calls;
  const std::map<size_t, absl::Status>& outcome = scanned.status;
  const std::vector<float>& a = layer.own_amax;
  const float qkv = std::max({a[0], a[1], a[2]});
  const float mlp = std::max(a[4], a[5]);
  const float expected[] = {qkv, qkv, qkv, a[3], mlp, mlp, a[6]};
  for (size_t i = 0; i < 7; ++i) {
    EXPECT_EQ(calls.at(i), 1) << i;
    EXPECT_TRUE(outcome.at(i).ok()) << i << ": " << outcome.at(i);
    EXPECT_EQ(layer.prepared[i].own_amax, a[i]) << i;
    EXPECT_EQ(layer.prepared[i].global_amax, expected[i]) << i;
    ASSERT_TRUE(layer.prepared[i].scan.has_value()) << i;
    EXPECT_EQ(layer.prepared[i].scan->amax(), a[i]) << i;
  }
}

TEST(ScanModules, AFailedScanFailsItsWholeGroupAndNoOtherUnit) {
  Layer layer(11);
  layer.weights[1][37] = Bf16(std::numeric_limits<float>::quiet_NaN());  // k: element (1, 5)
  const ScanOutcome scanned = Scan(layer, false);
  const std::map<size_t, int>& calls = scanned.calls;
  const std::map<size_t, absl::Status>& outcome = scanned.status;
  for (size_t i : {0, 1, 2}) {
    EXPECT_EQ(calls.at(i), 1);
    EXPECT_EQ(outcome.at(i).code(), absl::StatusCode::kInvalidArgument) << i;
    EXPECT_THAT(std::string(outcome.at(i).message()), HasSubstr("tensor 'layer.k.weight'")) << i;
    EXPECT_THAT(std::string(outcome.at(i).message()), HasSubstr("(1, 5) is nan")) << i;
  }
  for (size_t i : {3, 4, 5, 6}) {
    EXPECT_EQ(calls.at(i), 1);
    EXPECT_TRUE(outcome.at(i).ok()) << i << ": " << outcome.at(i);
  }
}

TEST(ScanModules, StoppedRunCancelsTheUnitsNotScannedAndStillOpensEveryOne) {
  Layer layer(13);
  const ScanOutcome scanned = Scan(layer, true);
  ASSERT_EQ(scanned.status.size(), 7u);
  for (const auto& [i, s] : scanned.status) {
    EXPECT_EQ(scanned.calls.at(i), 1) << i;
    EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << i;
  }
}

TEST(ScanGroups, FusedSiblingsTogetherWhereTheFirstOneIs) {
  Layer layer(3);  // q k v o gate up down
  using Groups = std::vector<std::vector<size_t>>;
  EXPECT_EQ(ScanGroups(layer.prepared), (Groups{{0, 1, 2}, {3}, {4, 5}, {6}}));
  // Name order puts o_proj between k_proj and q_proj: the group goes where k is.
  std::vector<PreparedModule> by_name;
  for (size_t i : {1, 3, 0, 2}) {
    PreparedModule m;
    m.plan = &layer.plans[i];
    by_name.push_back(std::move(m));
  }
  EXPECT_EQ(ScanGroups(by_name), (Groups{{0, 2, 3}, {1}}));
  // Experts of one fused pair form one group per expert.
  std::vector<PreparedModule> experts;
  for (int64_t e : {0, 1}) {
    for (size_t i : {4, 5}) {
      PreparedModule m;
      m.plan = &layer.plans[i];
      m.expert = e;
      experts.push_back(std::move(m));
    }
  }
  EXPECT_EQ(ScanGroups(experts), (Groups{{0, 1}, {2, 3}}));
}

TEST(ReadAhead, TicketsInOrderWithinTheBudgetAndALargerGroupAlone) {
  ReadAhead budget(100);
  auto never = [] { return false; };
  std::atomic<int> taken{0};
  // Ticket 1 waits for ticket 0 even though its bytes fit.
  std::thread second([&] {
    EXPECT_TRUE(budget.Acquire(1, 10, never));
    taken.fetch_add(1);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(60));
  EXPECT_EQ(taken.load(), 0);
  EXPECT_TRUE(budget.Acquire(0, 80, never));
  second.join();
  EXPECT_EQ(budget.held(), 90);
  // 90 + 20 > 100: ticket 2 waits for a release.
  std::thread third([&] {
    EXPECT_TRUE(budget.Acquire(2, 20, never));
    taken.fetch_add(1);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(60));
  EXPECT_EQ(taken.load(), 1);
  budget.Release(80);
  third.join();
  EXPECT_EQ(budget.held(), 30);
  // A group larger than the whole budget goes once nothing is held.
  budget.Release(30);
  EXPECT_TRUE(budget.Acquire(3, 500, never));
  EXPECT_EQ(budget.held(), 500);
  // Stopped: the ticket passes without taking anything, also while over the budget.
  std::atomic<bool> stop{false};
  std::thread stopped([&] { EXPECT_FALSE(budget.Acquire(4, 10, [&] { return stop.load(); })); });
  std::this_thread::sleep_for(std::chrono::milliseconds(60));
  stop.store(true);
  stopped.join();
  EXPECT_EQ(budget.held(), 500);
  EXPECT_FALSE(budget.Acquire(5, 0, [] { return true; }));
  budget.Release(500);
  EXPECT_TRUE(budget.Acquire(6, 100, never));
}

TEST(SafetensorsFile, ReadRangeEqualsTheMappedBytesAndRefusesOutsideRanges) {
  TempFolder dir("read_range");
  std::vector<SafetensorsTensorData> tensors(2);
  tensors[0].spec = {"a", SafetensorsDType::kU8, {3}};
  tensors[0].bytes = {1, 2, 3};
  tensors[1].spec = {"b", SafetensorsDType::kF32, {1000}};
  tensors[1].bytes.resize(4000);
  for (size_t i = 0; i < 4000; ++i) tensors[1].bytes[i] = static_cast<uint8_t>(i * 7 + 1);
  ASSERT_TRUE(WriteSafetensorsFile(dir / "t.safetensors", tensors, {}).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(dir / "t.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsTensor* b = (*file)->Find("b");
  ASSERT_NE(b, nullptr);
  std::vector<uint8_t> out(3000, 0);
  ASSERT_TRUE((*file)->ReadRange(b->data + 500, 3000, out.data()).ok());
  EXPECT_EQ(0, std::memcmp(out.data(), tensors[1].bytes.data() + 500, 3000));
  const SafetensorsTensor* a = (*file)->Find("a");
  ASSERT_TRUE((*file)->ReadRange(a->data, 3, out.data()).ok());
  EXPECT_EQ(out[0], 1);
  EXPECT_EQ(out[2], 3);
  // Past the end of the file, and a pointer that is not in the mapping.
  EXPECT_EQ((*file)->ReadRange(b->data + 3999, 2, out.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*file)->ReadRange(out.data(), 1, out.data()).code(),
            absl::StatusCode::kInvalidArgument);
  // The file cut short after it was opened: DATA_LOSS naming it and the offset (reading the
  // mapping there would raise SIGBUS instead).
  const int64_t b_offset = b->file_offset;
  std::filesystem::resize_file(dir / "t.safetensors", static_cast<uintmax_t>(b_offset + 1000));
  const absl::Status cut = (*file)->ReadRange(b->data + 500, 3000, out.data());
  EXPECT_EQ(cut.code(), absl::StatusCode::kDataLoss) << cut;
  EXPECT_THAT(std::string(cut.message()),
              HasSubstr("t.safetensors: cannot read 2500 bytes at offset "));
  EXPECT_THAT(std::string(cut.message()), HasSubstr("the file ends there"));
}

// A symmetric [n, n] fp32 Hessian with entries set by `edit`, as a file of one entry "h".
std::unique_ptr<HessianStore> FullHessianFile(const std::string& path, int64_t n,
                                              const std::function<void(float*)>& edit) {
  std::vector<float> h(static_cast<size_t>(n * n));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      h[static_cast<size_t>(r * n + c)] = r == c ? 4.0f : 1.0f / static_cast<float>(1 + r + c);
    }
  }
  edit(h.data());
  SafetensorsTensorData t{{"h", SafetensorsDType::kF32, {n, n}}, {}};
  t.bytes.resize(h.size() * 4);
  std::memcpy(t.bytes.data(), h.data(), t.bytes.size());
  EXPECT_TRUE(WriteSafetensorsFile(path, {t}, {}).ok());
  absl::StatusOr<std::unique_ptr<HessianStore>> store = HessianStore::Open(path);
  EXPECT_TRUE(store.ok()) << store.status();
  return store.ok() ? *std::move(store) : nullptr;
}

TEST(HessianStore, FullMatrixCheckNamesTheFirstDefectInRowBandOrder) {
  TempFolder dir("full_check");
  constexpr int64_t n = 256;  // four bands of 64 rows, checked on several threads
  auto at = [](float* h, int64_t r, int64_t c) -> float& { return h[r * n + c]; };
  // Defects in bands 3 and 1 (H[70, 200] differs from H[200, 70]), and a NaN in band 2: band
  // 1's comes first.
  std::unique_ptr<HessianStore> store = FullHessianFile(dir / "a.safetensors", n, [&](float* h) {
    at(h, 200, 230) = 9.0f;
    at(h, 70, 200) = 5.0f;
    at(h, 150, 160) = std::numeric_limits<float>::quiet_NaN();
  });
  ASSERT_NE(store, nullptr);
  absl::StatusOr<std::shared_ptr<const FullHessian>> full = store->Full("h", "m", n, 1e-3f);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(full.status().message()), HasSubstr("not symmetric: H[70, 200] = 5"));
  // Within a band, tiles in order: the NaN at [10, 190] (tile 2) after [20, 100] (tile 1).
  store = FullHessianFile(dir / "b.safetensors", n, [&](float* h) {
    at(h, 10, 190) = std::numeric_limits<float>::infinity();
    at(h, 20, 100) = 7.0f;
  });
  ASSERT_NE(store, nullptr);
  full = store->Full("h", "m", n, 1e-3f);
  EXPECT_THAT(std::string(full.status().message()), HasSubstr("not symmetric: H[20, 100] = 7"));
  // A clean matrix passes, and its blocks are its diagonal 16x16 blocks.
  store = FullHessianFile(dir / "c.safetensors", n, [](float*) {});
  ASSERT_NE(store, nullptr);
  full = store->Full("h", "m", n, 1e-3f);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ((*full)->data[1 * n + 1], 4.0f);
  absl::StatusOr<std::shared_ptr<const std::vector<float>>> blocks =
      store->Blocks("h", "m", n, 1e-3f);
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  EXPECT_EQ((**blocks)[256 + 0], 4.0f);                  // block 1, [0, 0] = H[16, 16]
  EXPECT_EQ((**blocks)[256 + 1], 1.0f / (1 + 16 + 17));  // block 1, [0, 1] = H[16, 17]
}

// A bf16 weight at an odd offset of its file (after a 3-byte tensor) is read into aligned memory
// and quantizes to the same bytes as the same weight at an aligned offset.
TEST(ScanModules, WeightsAtAnUnalignedOffsetGiveTheAlignedBytes) {
  TempFolder dir("unaligned");
  const std::string q = "model.layers.0.self_attn.q_proj.weight";
  SafetensorsTensorData weight{{q, SafetensorsDType::kBF16, {32, 64}}, {}};
  for (int i = 0; i < 32 * 64; ++i) {
    const uint16_t bits = Bf16(static_cast<float>(i % 29 - 14) / 8.0f);
    weight.bytes.push_back(static_cast<uint8_t>(bits & 0xff));
    weight.bytes.push_back(static_cast<uint8_t>(bits >> 8));
  }
  const SafetensorsTensorData odd{{"a.flags", SafetensorsDType::kU8, {3}}, {1, 2, 3}};
  auto run = [&](const std::string& name, const std::vector<SafetensorsTensorData>& tensors) {
    std::filesystem::create_directories(dir / name);
    WriteAll(dir / (name + "/config.json"), "{\"model_type\": \"llama\"}");
    EXPECT_TRUE(WriteSafetensorsFile(dir / (name + "/model.safetensors"), tensors, {}).ok());
    QuantizeOptions options;
    options.model_dir = dir / name;
    options.out_dir = dir / (name + "-out");
    options.params.method = Method::kMax;
    absl::StatusOr<QuantizeReport> report = RunPipeline(options);
    EXPECT_TRUE(report.ok()) << report.status();
  };
  run("aligned", {weight});
  run("unaligned", {odd, weight});
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> input =
      SafetensorsFile::Open(dir / "unaligned/model.safetensors");
  ASSERT_TRUE(input.ok()) << input.status();
  ASSERT_EQ(reinterpret_cast<uintptr_t>((*input)->Find(q)->data) % 2, 1u);  // really unaligned
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> a =
      SafetensorsFile::Open(dir / "aligned-out/model.safetensors");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> b =
      SafetensorsFile::Open(dir / "unaligned-out/model.safetensors");
  ASSERT_TRUE(a.ok() && b.ok());
  for (const std::string suffix : {"weight", "weight_scale", "weight_scale_2"}) {
    const std::string name = "model.layers.0.self_attn.q_proj." + suffix;
    const SafetensorsTensor* x = (*a)->Find(name);
    const SafetensorsTensor* y = (*b)->Find(name);
    ASSERT_TRUE(x != nullptr && y != nullptr) << name;
    ASSERT_EQ(x->num_bytes, y->num_bytes) << name;
    EXPECT_EQ(0, std::memcmp(x->data, y->data, static_cast<size_t>(x->num_bytes))) << name;
  }
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

TEST(HessianStore, FullIsReadOnceWhileExpectedAndDroppedAfterTheLastRelease) {
  TempFolder dir("full_uses");
  constexpr int64_t n = 64;
  std::unique_ptr<HessianStore> store = FullHessianFile(dir / "h.safetensors", n, [](float*) {});
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->ExpectFull("h", "q", n).ok());
  ASSERT_TRUE(store->ExpectFull("h", "k", n).ok());
  const absl::Status wrong = store->ExpectFull("h", "o", 32);
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(wrong.message()),
              HasSubstr("Hessian 'h' (for o): shape [64, 64] does not match in = 32"));
  // Concurrent first callers share one read.
  std::vector<std::shared_ptr<const FullHessian>> got(4);
  std::vector<std::thread> callers;
  for (size_t t = 0; t < got.size(); ++t) {
    callers.emplace_back([&, t] {
      absl::StatusOr<std::shared_ptr<const FullHessian>> full = store->Full("h", "q", n, 1e-3f);
      if (full.ok()) got[t] = *std::move(full);
    });
  }
  for (std::thread& t : callers) t.join();
  for (const auto& g : got) {
    ASSERT_NE(g, nullptr);
    EXPECT_EQ(g.get(), got[0].get());
  }
  EXPECT_EQ(got[0]->n, n);
  EXPECT_EQ(got[0]->data[5 * n + 5], 4.0f);
  EXPECT_EQ(got[0]->data[2 * n + 7], 1.0f / 10.0f);
  const std::weak_ptr<const FullHessian> weak = got[0];
  const float* address = got[0]->data.get();
  got.assign(1, nullptr);  // no caller holds it: the store does, for its second use
  store->ReleaseFull("h");
  EXPECT_FALSE(weak.expired());
  absl::StatusOr<std::shared_ptr<const FullHessian>> again = store->Full("h", "k", n, 1e-3f);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->data.get(), address);
  store->ReleaseFull("h");  // the last expected use: the store lets go, the holder keeps it
  EXPECT_FALSE(weak.expired());
  again = absl::CancelledError("dropped");
  EXPECT_TRUE(weak.expired());
  store->ReleaseFull("h");  // more releases than uses change nothing
  // Without expected uses every call reads a copy of its own.
  absl::StatusOr<std::shared_ptr<const FullHessian>> a = store->Full("h", "q", n, 1e-3f);
  absl::StatusOr<std::shared_ptr<const FullHessian>> b = store->Full("h", "q", n, 1e-3f);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE((*a).get(), (*b).get());
  EXPECT_EQ(std::memcmp((*a)->data.get(), (*b)->data.get(), n * n * sizeof(float)), 0);
}

TEST(HessianStore, FullMatricesReuseTheBuffersOfDroppedOnesAndKeepFewOfThem) {
  TempFolder dir("full_pool");
  constexpr int64_t n = 64;
  std::unique_ptr<HessianStore> store = FullHessianFile(dir / "h.safetensors", n, [](float*) {});
  ASSERT_NE(store, nullptr);
  const int64_t bytes = n * n * static_cast<int64_t>(sizeof(float));
  EXPECT_EQ(store->read_seconds(), 0.0);
  absl::StatusOr<std::shared_ptr<const FullHessian>> first = store->Full("h", "q", n, 1e-3f);
  ASSERT_TRUE(first.ok()) << first.status();
  const double read_once = store->read_seconds();
  EXPECT_GT(read_once, 0.0) << "the read is timed";
  const float* address = (*first)->data.get();
  EXPECT_EQ(store->matrix_pool().kept_bytes(), 0);
  first = absl::CancelledError("dropped");
  EXPECT_EQ(store->matrix_pool().kept_bytes(), bytes);
  // The next read of the same size goes into the same buffer, with the file's values.
  absl::StatusOr<std::shared_ptr<const FullHessian>> second = store->Full("h", "k", n, 1e-3f);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*second)->data.get(), address);
  EXPECT_GT(store->read_seconds(), read_once) << "each read adds its time";
  EXPECT_EQ(store->matrix_pool().kept_bytes(), 0);
  EXPECT_EQ((*second)->data[5 * n + 5], 4.0f);
  EXPECT_EQ((*second)->data[2 * n + 7], 1.0f / 10.0f);
  // Five held at once, then dropped: three of their buffers are kept, two freed.
  std::vector<std::shared_ptr<const FullHessian>> held;
  for (int k = 0; k < 5; ++k) {
    absl::StatusOr<std::shared_ptr<const FullHessian>> m = store->Full("h", "q", n, 1e-3f);
    ASSERT_TRUE(m.ok()) << m.status();
    held.push_back(*std::move(m));
  }
  held.clear();
  EXPECT_EQ(store->matrix_pool().kept_bytes(), MatrixPool::kKeptMatrices * bytes);
  // A matrix may outlive its store: its buffer then goes to the pool the matrix shares.
  std::shared_ptr<const FullHessian> kept = *std::move(second);
  store.reset();
  EXPECT_EQ(kept->data[5 * n + 5], 4.0f);
  kept.reset();
}

TEST(HessianStore, FullsErrorGoesToEveryCaller) {
  TempFolder dir("full_error");
  constexpr int64_t n = 32;
  std::unique_ptr<HessianStore> store = FullHessianFile(dir / "h.safetensors", n, [](float* h) {
    h[1 * n + 30] = -std::numeric_limits<float>::infinity();
  });
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->ExpectFull("h", "q", n).ok());  // the header is fine
  ASSERT_TRUE(store->ExpectFull("h", "k", n).ok());
  for (const char* module : {"q", "k"}) {
    absl::StatusOr<std::shared_ptr<const FullHessian>> full = store->Full("h", module, n, 1e-3f);
    EXPECT_EQ(full.status().code(), absl::StatusCode::kInvalidArgument);
    // The first reader's message, for both.
    EXPECT_THAT(std::string(full.status().message()),
                HasSubstr("Hessian 'h' (for q): non-finite value at [1, 30]"));
  }
}

// FullHessianFile's matrix as entry "h" of a file in `dir`; with `bad`, H[4, 9] = 3 (not
// symmetric).
std::unique_ptr<HessianStore> CleanOrAsymmetric(const TempFolder& dir, int64_t n, bool bad) {
  return FullHessianFile(dir / (bad ? "bad.safetensors" : "h.safetensors"), n, [bad, n](float* h) {
    if (bad) h[4 * n + 9] = 3.0f;
  });
}

TEST(ScanModules, GptqUnitsGetTheirFullHessianReadOnceAndItsBytesGoWithTheGroup) {
  TempFolder dir("scan_full");
  constexpr int64_t n = 32;  // Layer's cols
  for (const bool bad : {false, true}) {
    SCOPED_TRACE(bad ? "asymmetric" : "clean");
    std::unique_ptr<HessianStore> store = CleanOrAsymmetric(dir, n, bad);
    ASSERT_NE(store, nullptr);
    Layer layer(11);
    for (size_t i : {0, 1, 2, 6}) {  // q, k, v share "h"; down uses it too (another group)
      PreparedModule& m = layer.prepared[i];
      m.params.method = Method::kGptq;
      m.hessian_entry = "h";
      ASSERT_TRUE(store->ExpectFull("h", m.name, n).ok());
    }
    const std::vector<std::vector<size_t>> groups = ScanGroups(layer.prepared);
    // No unit has a file (its weights are in memory): only the Hessian counts, once, with the
    // last unit of the first group that reads it (v); 3 such groups fit.
    EXPECT_EQ(PlanReadAhead(groups, &layer.prepared), 3 * n * n * 4);
    for (size_t i = 0; i < 7; ++i) {
      EXPECT_EQ(layer.prepared[i].read_ahead_bytes, i == 2 ? n * n * 4 : 0) << i;
    }
    const ScanOutcome scanned = Scan(layer, false, store.get());
    for (size_t i = 0; i < 7; ++i) {
      const bool gptq = i <= 2 || i == 6;
      const absl::Status& s = scanned.status.at(i);
      if (bad && gptq) {
        EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << i;
        EXPECT_THAT(std::string(s.message()), HasSubstr("not symmetric: H[4, 9] = 3")) << i;
        EXPECT_EQ(layer.prepared[i].hessian_full, nullptr) << i;
        continue;
      }
      EXPECT_TRUE(s.ok()) << i << ": " << s;
      EXPECT_EQ(layer.prepared[i].hessian_full != nullptr, gptq) << i;
      if (gptq) {
        EXPECT_EQ(layer.prepared[i].hessian_full.get(), layer.prepared[0].hessian_full.get());
        EXPECT_EQ(layer.prepared[i].hessian_full->data[3 * n + 3], 4.0f);
      }
    }
  }
}

TEST(HessianStore, BlocksFromFullTellsTheLayoutByTheHeaderAlone) {
  TempFolder dir("blocks_layout");
  constexpr int64_t n = 32;
  std::vector<float> blocks(static_cast<size_t>(n * 16), 1.0f);
  blocks[3] = std::numeric_limits<float>::quiet_NaN();  // not read by BlocksFromFull
  SafetensorsTensorData blocked{{"b", SafetensorsDType::kF32, {n / 16, 16, 16}}, {}};
  blocked.bytes.resize(blocks.size() * 4);
  std::memcpy(blocked.bytes.data(), blocks.data(), blocked.bytes.size());
  SafetensorsTensorData half{{"f16", SafetensorsDType::kF16, {n, n}}, {}};
  half.bytes.resize(static_cast<size_t>(n * n * 2));
  std::vector<float> full(static_cast<size_t>(n * n), std::numeric_limits<float>::infinity());
  SafetensorsTensorData matrix{{"h", SafetensorsDType::kF32, {n, n}}, {}};
  matrix.bytes.resize(full.size() * 4);
  std::memcpy(matrix.bytes.data(), full.data(), matrix.bytes.size());
  ASSERT_TRUE(WriteSafetensorsFile(dir / "h.safetensors", {blocked, half, matrix}, {}).ok());
  absl::StatusOr<std::unique_ptr<HessianStore>> store = HessianStore::Open(dir / "h.safetensors");
  ASSERT_TRUE(store.ok()) << store.status();
  absl::StatusOr<bool> from_full = (*store)->BlocksFromFull("h", "m", n);
  ASSERT_TRUE(from_full.ok()) << from_full.status();
  EXPECT_TRUE(*from_full);  // its values are not read: all infinite
  from_full = (*store)->BlocksFromFull("b", "m", n);
  ASSERT_TRUE(from_full.ok()) << from_full.status();
  EXPECT_FALSE(*from_full);
  from_full = (*store)->BlocksFromFull("h", "m", 48);
  EXPECT_EQ(from_full.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(from_full.status().message()),
              HasSubstr("Hessian 'h' (for m): shape [32, 32] does not match in = 48"));
  from_full = (*store)->BlocksFromFull("f16", "m", n);
  EXPECT_THAT(std::string(from_full.status().message()), HasSubstr("dtype F16, expected F32"));
  from_full = (*store)->BlocksFromFull("none", "m", n);
  EXPECT_THAT(std::string(from_full.status().message()), HasSubstr("no such entry"));
  // Blocks reads them: the full matrix's and the blocks' defects show there.
  EXPECT_THAT(std::string((*store)->Blocks("h", "m", n, 1e-3f).status().message()),
              HasSubstr("non-finite value at [0, 0]"));
  EXPECT_THAT(std::string((*store)->Blocks("b", "m", n, 1e-3f).status().message()),
              HasSubstr("non-finite value in block 0 at [0, 3]"));
}

TEST(HessianStore, BlocksOfAFullMatrixAreCutOnceInScratchMemoryForConcurrentCallers) {
  TempFolder dir("blocks_once");
  constexpr int64_t n = 64;
  std::unique_ptr<HessianStore> store = FullHessianFile(dir / "h.safetensors", n, [](float*) {});
  ASSERT_NE(store, nullptr);
  std::atomic<int> taken{0};
  std::atomic<int> given{0};
  std::atomic<int64_t> given_bytes{0};
  const ScratchMemory scratch{
      [&](int64_t bytes) {
        ++taken;
        return std::unique_ptr<uint8_t[]>(new uint8_t[static_cast<size_t>(bytes)]);
      },
      [&](std::unique_ptr<uint8_t[]> buffer, int64_t bytes) {
        EXPECT_NE(buffer, nullptr);
        ++given;
        given_bytes += bytes;
      }};
  std::vector<std::shared_ptr<const std::vector<float>>> got(4);
  std::vector<std::thread> callers;
  for (size_t t = 0; t < got.size(); ++t) {
    callers.emplace_back([&, t] {
      absl::StatusOr<std::shared_ptr<const std::vector<float>>> blocks =
          store->Blocks("h", "q", n, 1e-3f, &scratch);
      if (blocks.ok()) got[t] = *std::move(blocks);
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(taken.load(), 1);
  EXPECT_EQ(given.load(), 1);
  EXPECT_EQ(given_bytes.load(), n * n * 4);
  for (const auto& g : got) {
    ASSERT_NE(g, nullptr);
    EXPECT_EQ(g.get(), got[0].get());
  }
  ASSERT_EQ(got[0]->size(), static_cast<size_t>(n * 16));
  // Block j, [a, b] = H[16 j + a, 16 j + b] (FullHessianFile: 4 on the diagonal, 1 / (1 + r + c)).
  for (int64_t j = 0; j < n / 16; ++j) {
    for (int64_t a = 0; a < 16; ++a) {
      for (int64_t b = 0; b < 16; ++b) {
        const int64_t r = 16 * j + a;
        const int64_t c = 16 * j + b;
        EXPECT_EQ((*got[0])[static_cast<size_t>(j * 256 + a * 16 + b)],
                  r == c ? 4.0f : 1.0f / static_cast<float>(1 + r + c));
      }
    }
  }
  // A defect: the scratch memory still goes back, and every caller gets the first one's error.
  store = FullHessianFile(dir / "bad.safetensors", n, [](float* h) { h[5 * n + 40] = 2.0f; });
  ASSERT_NE(store, nullptr);
  for (const char* module : {"q", "k"}) {
    absl::StatusOr<std::shared_ptr<const std::vector<float>>> blocks =
        store->Blocks("h", module, n, 1e-3f, &scratch);
    EXPECT_EQ(blocks.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(blocks.status().message()),
                HasSubstr("Hessian 'h' (for q): not symmetric: H[5, 40] = 2"));
  }
  EXPECT_EQ(taken.load(), 2);
  EXPECT_EQ(given.load(), 2);
}

TEST(HessianStore, ExpectedBlocksAreDroppedAfterTheLastRelease) {
  TempFolder dir("blocks_release");
  constexpr int64_t n = 32;
  std::unique_ptr<HessianStore> store = FullHessianFile(dir / "h.safetensors", n, [](float*) {});
  ASSERT_NE(store, nullptr);
  store->ExpectBlocks("h");
  store->ExpectBlocks("h");
  absl::StatusOr<std::shared_ptr<const std::vector<float>>> first =
      store->Blocks("h", "q", n, 1e-3f);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::weak_ptr<const std::vector<float>> weak = *first;
  const std::vector<float> values = **first;
  first = absl::CancelledError("let go");  // the store still holds them
  EXPECT_FALSE(weak.expired());
  store->ReleaseBlocks("h");  // one use left
  EXPECT_FALSE(weak.expired());
  absl::StatusOr<std::shared_ptr<const std::vector<float>>> second =
      store->Blocks("h", "k", n, 1e-3f);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->get(), weak.lock().get());  // shared, not extracted again
  store->ReleaseBlocks("h");  // the last: the store lets go, the holder keeps them
  EXPECT_FALSE(weak.expired());
  second = absl::CancelledError("let go");
  EXPECT_TRUE(weak.expired());
  store->ReleaseBlocks("h");  // more releases than uses change nothing
  // A later call extracts them again, the same values.
  absl::StatusOr<std::shared_ptr<const std::vector<float>>> again =
      store->Blocks("h", "q", n, 1e-3f);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(**again, values);
}

TEST(ScanModules, BlocksOfAFullMatrixComeFromTheScanOncePerEntryThroughThePool) {
  TempFolder dir("scan_blocks");
  constexpr int64_t n = 32;  // Layer's cols
  for (const bool bad : {false, true}) {
    SCOPED_TRACE(bad ? "asymmetric" : "clean");
    std::unique_ptr<HessianStore> store = CleanOrAsymmetric(dir, n, bad);
    ASSERT_NE(store, nullptr);
    Layer layer(12);
    for (size_t i : {0, 1, 2, 6}) {  // q, k, v share "h"; down uses it too (another group)
      PreparedModule& m = layer.prepared[i];
      m.hessian_entry = "h";
      absl::StatusOr<bool> from_full = store->BlocksFromFull("h", m.name, n);
      ASSERT_TRUE(from_full.ok()) << from_full.status();
      m.blocks_from_full = *from_full;
      ASSERT_TRUE(ScanReadsFullMatrix(m));
    }
    const std::vector<std::vector<size_t>> groups = ScanGroups(layer.prepared);
    // The temporary copy counts like gptq's matrix: once, with v (the first group's last unit).
    const int64_t budget = PlanReadAhead(groups, &layer.prepared);
    EXPECT_EQ(budget, 3 * n * n * 4);
    for (size_t i = 0; i < 7; ++i) {
      EXPECT_EQ(layer.prepared[i].read_ahead_bytes, i == 2 ? n * n * 4 : 0) << i;
    }
    ReadAhead read_ahead(budget);
    std::map<size_t, absl::Status> status;
    ScanModules(
        &layer.prepared, groups, store.get(), &read_ahead, nullptr, [] { return false; },
        [&](size_t i, const absl::Status& s) { status[i] = s; });
    // One read: one buffer of the matrix's size went back to the pool.
    EXPECT_EQ(read_ahead.pooled(), n * n * 4);
    for (size_t i = 0; i < 7; ++i) {
      const bool with = i <= 2 || i == 6;
      if (bad && with) {
        EXPECT_EQ(status.at(i).code(), absl::StatusCode::kInvalidArgument) << i;
        EXPECT_THAT(std::string(status.at(i).message()), HasSubstr("not symmetric: H[4, 9] = 3"))
            << i;
        EXPECT_EQ(layer.prepared[i].hessian_blocks, nullptr) << i;
        continue;
      }
      EXPECT_TRUE(status.at(i).ok()) << i << ": " << status.at(i);
      EXPECT_EQ(layer.prepared[i].hessian_blocks != nullptr, with) << i;
      if (with) {
        EXPECT_EQ(layer.prepared[i].hessian_blocks.get(), layer.prepared[0].hessian_blocks.get());
        EXPECT_EQ((*layer.prepared[i].hessian_blocks)[256 + 1], 1.0f / (1 + 16 + 17));
      }
    }
  }
}

TEST(ReadAhead, GivenBackBuffersAreReusedBySizeAndThePoolStaysWithinTheBudget) {
  ReadAhead read_ahead(1000);
  ASSERT_TRUE(read_ahead.Acquire(0, 600, [] { return false; }));
  std::unique_ptr<uint8_t[]> a = read_ahead.Take(400);
  std::unique_ptr<uint8_t[]> b = read_ahead.Take(200);
  const uint8_t* a_address = a.get();
  read_ahead.Give(std::move(a), 400);
  read_ahead.Give(std::move(b), 200);
  read_ahead.Release(600);
  EXPECT_EQ(read_ahead.pooled(), 600);
  // The same size comes back; another size is new.
  ASSERT_TRUE(read_ahead.Acquire(1, 700, [] { return false; }));
  std::unique_ptr<uint8_t[]> c = read_ahead.Take(400);
  EXPECT_EQ(c.get(), a_address);
  EXPECT_EQ(read_ahead.pooled(), 200);
  // 300 new bytes: held 700 + pooled 200 is within 1000, the pooled 200 stay.
  std::unique_ptr<uint8_t[]> d = read_ahead.Take(300);
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(read_ahead.pooled(), 200);
  read_ahead.Give(std::move(c), 400);
  read_ahead.Give(std::move(d), 300);
  read_ahead.Release(700);
  EXPECT_EQ(read_ahead.pooled(), 900);
  // A group of 900 in sizes the pool lacks: pooled buffers go until pooled + held <= 1000.
  ASSERT_TRUE(read_ahead.Acquire(2, 900, [] { return false; }));
  std::unique_ptr<uint8_t[]> e = read_ahead.Take(900);
  ASSERT_NE(e, nullptr);
  EXPECT_LE(read_ahead.pooled() + read_ahead.held(), 1000);
  EXPECT_EQ(read_ahead.pooled(), 0);
  e[899] = 7;                   // the whole size is usable
  read_ahead.Give(nullptr, 5);  // nothing to keep
  EXPECT_EQ(read_ahead.pooled(), 0);
}

// The pipeline frees a full Hessian after its last task and reads the next one into memory that
// may sit at the same address: in-process gptq plans must follow the Hessian (its key), not the
// address. Here two Hessians pass through one buffer, one after the other, with gated tasks.
TEST(LocalQuantizer, GptqPlansFollowTheHessianKeyNotTheMatrixAddress) {
  constexpr int64_t n = 32;
  constexpr int64_t rows = 16;
  std::vector<float> ha(n * n), hb(n * n);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      const float d = static_cast<float>(std::abs(r - c));
      ha[r * n + c] = r == c ? 4.0f : 1.0f / static_cast<float>(1 + r + c);
      hb[r * n + c] = r == c ? 6.0f : 1.0f / ((1.0f + d) * (1.0f + d));
    }
  }
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<uint16_t>> weights(4, std::vector<uint16_t>(rows * n));
  for (auto& w : weights) {
    for (uint16_t& x : w) x = Bf16(normal(rng));
  }
  SearchParams params;
  params.method = Method::kGptq;
  auto reference = [&](size_t t, const std::vector<float>& h) {
    GptqRequest request;
    request.weights = {weights[t].data(), DType::kBFloat16, rows, n};
    request.hessian = {h.data(), n};
    request.params = params;
    request.global_amax = 8.0f;
    absl::StatusOr<QuantizedTensor> r = CpuGptqQuantize(request, {});
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *std::move(r) : QuantizedTensor{};
  };
  // Tasks 0, 1 use Hessian "a"; 2, 3 use "b".
  const QuantizedTensor wrong = reference(2, ha);  // what a stale plan would give
  std::vector<QuantizedTensor> want;
  for (size_t t = 0; t < 4; ++t) want.push_back(reference(t, t < 2 ? ha : hb));
  ASSERT_NE(wrong.packed_codes, want[2].packed_codes);  // the Hessians lead to other codes

  std::vector<float> buffer(n * n);
  std::vector<TensorTask> tasks(4);
  std::vector<std::unique_ptr<TaskGate>> gates;
  for (size_t t = 0; t < 4; ++t) {
    tasks[t].name = "t" + std::to_string(t);
    tasks[t].weights = {weights[t].data(), DType::kBFloat16, rows, n};
    tasks[t].params = params;
    tasks[t].global_amax = 8.0f;
    tasks[t].hessian_key = t < 2 ? "a" : "b";
    tasks[t].full_hessian = {nullptr, n};
    gates.push_back(std::make_unique<TaskGate>());
    tasks[t].ready = gates.back().get();
  }
  std::vector<QuantizedTensor> got(4);
  absl::Mutex mu;
  int done = 0;
  std::thread feeder([&] {
    for (size_t first : {size_t{0}, size_t{2}}) {
      std::memcpy(buffer.data(), (first == 0 ? ha : hb).data(), buffer.size() * sizeof(float));
      for (size_t t = first; t < first + 2; ++t) {
        tasks[t].full_hessian.data = buffer.data();
        gates[t]->Open(absl::OkStatus());
      }
      // The next Hessian goes into the buffer once this one's tasks are done with it.
      absl::MutexLock lock(&mu);
      const int target = static_cast<int>(first) + 2;
      auto finished = [&] {
        mu.AssertHeld();
        return done >= target;
      };
      mu.Await(absl::Condition(&finished));
    }
  });
  std::unique_ptr<Quantizer> quantizer =
      MakeLocalQuantizer(MakeCpuScaleSearch({}), "in-process cpu", 1);
  const absl::Status status =
      quantizer->QuantizeAll(tasks, [&](size_t t, QuantizedTensor result) -> absl::Status {
        absl::MutexLock lock(&mu);
        got[t] = std::move(result);
        ++done;
        return absl::OkStatus();
      });
  feeder.join();
  ASSERT_TRUE(status.ok()) << status;
  for (size_t t = 0; t < 4; ++t) {
    EXPECT_EQ(got[t].packed_codes, want[t].packed_codes) << t;
    EXPECT_EQ(got[t].scales, want[t].scales) << t;
  }
}

}  // namespace
namespace {

// An 8 x 64 tensor "w" of normal bf16 weights (in *weights) for method mse.
TensorTask SmallMseTask(uint32_t seed, std::vector<uint16_t>* weights) {
  constexpr int64_t rows = 8, cols = 64;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  weights->resize(rows * cols);
  for (uint16_t& x : *weights) x = Bf16(normal(rng));
  TensorTask task;
  task.name = "w";
  task.weights = {weights->data(), DType::kBFloat16, rows, cols};
  task.params.method = Method::kMse;
  task.global_amax = 8.0f;
  return task;
}

}  // namespace

// The in-process quantizer runs one worker on the caller's thread: it names its own threads
// (nvf-quantize) but never the caller's, whose name may be the process's (the main thread's is
// what ps, top and pkill see).
TEST(LocalQuantizer, TheCallersThreadKeepsItsName) {
  std::vector<uint16_t> weights;
  const TensorTask task = SmallMseTask(4, &weights);
  ASSERT_EQ(pthread_setname_np(pthread_self(), "caller-thread"), 0);
  std::unique_ptr<Quantizer> quantizer = MakeLocalQuantizer(MakeCpuScaleSearch({}), "cpu", 1);
  const absl::Status status = quantizer->QuantizeAll(
      absl::MakeConstSpan(&task, 1), [](size_t, QuantizedTensor) { return absl::OkStatus(); });
  ASSERT_TRUE(status.ok()) << status;
  char name[16] = {};
  ASSERT_EQ(pthread_getname_np(pthread_self(), name, sizeof(name)), 0);
  EXPECT_STREQ(name, "caller-thread");
}

// The CLI's in-process backend starts on its own thread: calls wait for it, a bad device name is
// refused at once, and a failed start is QuantizeAll's error.
TEST(LocalQuantizer, StartedInTheBackgroundGivesTheSameBytesAndReportsAFailedStart) {
  std::vector<uint16_t> weights;
  const TensorTask task = SmallMseTask(9, &weights);
  auto run = [&](Quantizer& q, QuantizedTensor* out) {
    return q.QuantizeAll(absl::MakeConstSpan(&task, 1),
                         [&](size_t, QuantizedTensor r) -> absl::Status {
                           *out = std::move(r);
                           return absl::OkStatus();
                         });
  };
  QuantizedTensor want, got;
  std::unique_ptr<Quantizer> direct = MakeLocalQuantizer(MakeCpuScaleSearch({}), "cpu", 1);
  const absl::Status direct_status = run(*direct, &want);
  ASSERT_TRUE(direct_status.ok()) << direct_status;

  LocalQuantizerOptions options;
  options.device = "gpu";
  EXPECT_EQ(StartLocalQuantizer(options).status().message(),
            "--device = \"gpu\" is not one of auto, cpu, cuda");
  options.device = "cpu";
  options.cpu_threads = 1;
  absl::StatusOr<std::unique_ptr<Quantizer>> cpu = StartLocalQuantizer(options);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(run(**cpu, &got).ok());
  EXPECT_EQ(got.packed_codes, want.packed_codes);
  EXPECT_EQ(got.scales, want.scales);
  EXPECT_EQ((*cpu)->Describe(), "in-process cpu");

  std::string reason;
  if (CudaDeviceAvailable(&reason)) return;  // the failed start needs a machine without a GPU
  options.device = "cuda";
  const absl::Status direct_error = MakeLocalQuantizer(options).status();
  ASSERT_FALSE(direct_error.ok());
  absl::StatusOr<std::unique_ptr<Quantizer>> cuda = StartLocalQuantizer(options);
  ASSERT_TRUE(cuda.ok()) << cuda.status();  // the start itself runs behind
  EXPECT_EQ(run(**cuda, &got), direct_error);
  EXPECT_THAT((*cuda)->Describe(), HasSubstr("not started: "));
}

TEST(ResultWriter, WritesInFlightStayWithinTheBoundAndALargerOneRunsAlone) {
  absl::Mutex mu;
  int64_t in_flight = 0;  // bytes of the writes running now
  int running = 0, most_running = 0, ran = 0;
  bool over_bound = false;
  auto job = [&](int64_t bytes) {
    return [&, bytes]() -> absl::Status {
      {
        absl::MutexLock lock(&mu);
        in_flight += bytes;
        ++running;
        most_running = std::max(most_running, running);
        // Within the bound, or a larger write alone.
        if (in_flight > 100 && running > 1) over_bound = true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      absl::MutexLock lock(&mu);
      in_flight -= bytes;
      --running;
      ++ran;
      return absl::OkStatus();
    };
  };
  ResultWriter writer(3, 100);
  for (int k = 0; k < 40; ++k) {
    const int64_t bytes = k == 20 ? 500 : 30;
    ASSERT_TRUE(writer.Submit(bytes, job(bytes)).ok());
  }
  EXPECT_TRUE(writer.Finish().ok());
  absl::MutexLock lock(&mu);
  EXPECT_EQ(ran, 40);
  EXPECT_FALSE(over_bound);
  EXPECT_LE(most_running, 3);
  EXPECT_GE(most_running, 2);  // 30-byte writes fit three at a time
}

TEST(ResultWriter, TheFirstFailureStopsSubmissionsAndQueuedWritesStillRun) {
  ResultWriter writer(1, 1 << 20);
  std::atomic<int> ran{0};
  absl::Notification release;
  // The first write waits, so that the next two queue behind it; the second fails.
  ASSERT_TRUE(writer
                  .Submit(1,
                          [&] {
                            release.WaitForNotification();
                            ++ran;
                            return absl::OkStatus();
                          })
                  .ok());
  ASSERT_TRUE(writer
                  .Submit(1,
                          [&] {
                            ++ran;
                            return absl::DataLossError("disk full");
                          })
                  .ok());
  ASSERT_TRUE(writer
                  .Submit(1,
                          [&] {
                            ++ran;
                            return absl::InternalError("later");
                          })
                  .ok());
  release.Notify();
  // Once the failure is in, Submit refuses and returns it.
  absl::Status refused;
  for (int k = 0; k < 2000 && refused.ok(); ++k) {
    refused = writer.Submit(1, [] { return absl::OkStatus(); });
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(refused, absl::DataLossError("disk full"));
  EXPECT_EQ(writer.Finish(), absl::DataLossError("disk full"));
  EXPECT_GE(ran.load(), 3);  // the writes queued before the failure ran
}

}  // namespace nvfp4cal::testing
