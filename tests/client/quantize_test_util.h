// Helpers shared by the quantize pipeline tests (quantize_test.cc, quantize_hessians_test.cc,
// quantize_experts_test.cc): running the pipeline in-process with the CPU kernels, an observer
// that records what it hears, and tiny models and Hessians files written by the tests.
#ifndef NVFP4CAL_TESTS_CLIENT_QUANTIZE_TEST_UTIL_H_
#define NVFP4CAL_TESTS_CLIENT_QUANTIZE_TEST_UTIL_H_

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "client/local_quantizer.h"
#include "client/quantize_checkpoint.h"
#include "client/safetensors.h"
#include "gtest/gtest.h"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "tests/client/test_util.h"

namespace nvfp4cal::testing {

// Collects observer messages.
class RecordingObserver : public QuantizeObserver {
 public:
  void OnStart(int64_t tensors, int64_t bytes) override {
    tensors_ = tensors;
    bytes_ = bytes;
  }
  void OnTensorDone(const std::string&, int64_t bytes) override {
    ++done_;
    done_bytes_ += bytes;
  }
  void OnMessage(const std::string& line) override { messages.push_back(line); }
  std::vector<std::string> messages;
  int64_t tensors_ = 0, bytes_ = 0, done_ = 0, done_bytes_ = 0;
};

inline absl::StatusOr<QuantizeReport> RunPipeline(const QuantizeOptions& options,
                                                  QuantizeObserver* observer = nullptr) {
  std::unique_ptr<Quantizer> quantizer = MakeLocalQuantizer(MakeCpuScaleSearch({}), "test cpu");
  return QuantizeCheckpoint(options, quantizer.get(), observer);
}

// Writes a one-layer model with the given q/k/v weights [rows, cols] bf16.
inline void WriteTinyModel(const std::string& dir, int64_t cols,
                           const std::vector<std::string>& leaves, float value_scale = 1.0f) {
  std::filesystem::create_directories(dir);
  WriteAll(dir + "/config.json", "{\"model_type\": \"llama\"}");
  std::vector<SafetensorsTensorData> tensors;
  int seed = 1;
  for (const std::string& leaf : leaves) {
    SafetensorsTensorData t;
    t.spec = {"model.layers.0.self_attn." + leaf + ".weight", SafetensorsDType::kBF16, {32, cols}};
    std::vector<uint16_t> bits(static_cast<size_t>(32 * cols));
    for (size_t i = 0; i < bits.size(); ++i) {
      const float v =
          value_scale * static_cast<float>(static_cast<int>((i * 37 + seed) % 23) - 11) / 64.0f;
      uint32_t b;
      std::memcpy(&b, &v, 4);
      bits[i] = static_cast<uint16_t>(b >> 16);
    }
    ++seed;
    t.bytes.resize(bits.size() * 2);
    std::memcpy(t.bytes.data(), bits.data(), t.bytes.size());
    tensors.push_back(std::move(t));
  }
  ASSERT_TRUE(WriteSafetensorsFile(dir + "/model.safetensors", tensors, {}).ok());
}

inline SafetensorsTensorData IdentityBlocks(const std::string& name, int64_t cols,
                                            float diag = 1.0f) {
  std::vector<float> blocks(static_cast<size_t>(cols * 16), 0.0f);
  for (int64_t j = 0; j < cols / 16; ++j) {
    for (int a = 0; a < 16; ++a) blocks[static_cast<size_t>(j * 256 + a * 17)] = diag;
  }
  SafetensorsTensorData t{{name, SafetensorsDType::kF32, {cols / 16, 16, 16}}, {}};
  t.bytes.resize(blocks.size() * 4);
  std::memcpy(t.bytes.data(), blocks.data(), t.bytes.size());
  return t;
}

inline SafetensorsTensorData Scalar(const std::string& name, float value) {
  SafetensorsTensorData t{{name, SafetensorsDType::kF32, {}}, std::vector<uint8_t>(4)};
  std::memcpy(t.bytes.data(), &value, 4);
  return t;
}

}  // namespace nvfp4cal::testing

#endif  // NVFP4CAL_TESTS_CLIENT_QUANTIZE_TEST_UTIL_H_
