#include "client/hessian_accumulator.h"

#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/safetensors.h"

namespace nvfp4cal {
namespace {

template <typename T>
std::vector<uint8_t> ToBytes(const std::vector<T>& values) {
  std::vector<uint8_t> bytes(values.size() * sizeof(T));
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

}  // namespace

HessianAccumulator::HessianAccumulator(int64_t in_features, bool keep_full_matrix)
    : in_(in_features), full_(keep_full_matrix) {
  if (in_ > 0 && in_ % 16 == 0) {
    blocks_.assign(static_cast<size_t>(in_ * 16), 0.0);
    if (full_) matrix_.assign(static_cast<size_t>(in_ * in_), 0.0);
  }
}

absl::Status HessianAccumulator::AddBatch(const void* activations, DType dtype, int64_t tokens) {
  if (in_ <= 0 || in_ % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("HessianAccumulator: in_features = ", in_,
                                                   " must be a positive multiple of 16"));
  }
  if (tokens < 0 || (tokens > 0 && activations == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("HessianAccumulator: ", tokens, " tokens",
                     activations == nullptr ? " with null data" : ""));
  }
  // Convert and check the whole batch first, so a bad value adds nothing.
  std::vector<float> x(static_cast<size_t>(tokens * in_));
  for (int64_t t = 0; t < tokens; ++t) {
    LoadAsFloat(activations, dtype, t * in_, static_cast<int>(in_),
                &x[static_cast<size_t>(t * in_)]);
    for (int64_t i = 0; i < in_; ++i) {
      const float v = x[static_cast<size_t>(t * in_ + i)];
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("HessianAccumulator: activation (token ", t, ", feature ", i, ") is ", v));
      }
    }
  }
  for (const float v : x) amax_ = std::fabs(v) > amax_ ? std::fabs(v) : amax_;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = &x[static_cast<size_t>(t * in_)];
    for (int64_t j = 0; j < in_ / 16; ++j) {
      double* block = &blocks_[static_cast<size_t>(j * 256)];
      const float* xj = row + j * 16;
      for (int a = 0; a < 16; ++a) {
        const double xa = xj[a];
        for (int b = 0; b < 16; ++b) block[a * 16 + b] += xa * static_cast<double>(xj[b]);
      }
    }
    if (full_) {
      for (int64_t a = 0; a < in_; ++a) {
        const double xa = row[a];
        if (xa == 0.0) continue;
        double* out = &matrix_[static_cast<size_t>(a * in_)];
        for (int64_t b = 0; b < in_; ++b) out[b] += xa * static_cast<double>(row[b]);
      }
    }
  }
  tokens_ += tokens;
  return absl::OkStatus();
}

std::vector<float> HessianAccumulator::Blocks(bool divide_by_tokens) const {
  const double scale = divide_by_tokens && tokens_ > 0 ? 1.0 / static_cast<double>(tokens_) : 1.0;
  std::vector<float> out(blocks_.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(blocks_[i] * scale);
  return out;
}

absl::StatusOr<std::vector<float>> HessianAccumulator::FullMatrix(bool divide_by_tokens) const {
  if (!full_) {
    return absl::FailedPreconditionError(
        "HessianAccumulator: created without keep_full_matrix; only Blocks() are available");
  }
  const double scale = divide_by_tokens && tokens_ > 0 ? 1.0 / static_cast<double>(tokens_) : 1.0;
  std::vector<float> out(matrix_.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(matrix_[i] * scale);
  return out;
}

absl::Status WriteHessiansFile(const std::string& path, const std::vector<NamedHessian>& hessians,
                               bool divide_by_tokens,
                               const std::vector<std::pair<std::string, std::string>>& aliases,
                               const std::vector<std::pair<std::string, float>>& output_amax) {
  std::vector<SafetensorsTensorData> tensors;
  std::map<std::string, std::string> metadata;
  for (const NamedHessian& h : hessians) {
    if (h.hessian == nullptr || h.hessian->num_tokens() == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("Hessian '", h.name, "' has no tokens accumulated"));
    }
    const int64_t in = h.hessian->in_features();
    SafetensorsTensorData t;
    t.spec.name = h.name;
    t.spec.dtype = SafetensorsDType::kF32;
    if (h.hessian->keeps_full_matrix()) {
      t.spec.shape = {in, in};
      t.bytes = ToBytes(*h.hessian->FullMatrix(divide_by_tokens));
    } else {
      t.spec.shape = {in / 16, 16, 16};
      t.bytes = ToBytes(h.hessian->Blocks(divide_by_tokens));
    }
    metadata["tokens." + h.name] = std::to_string(h.hessian->num_tokens());
    tensors.push_back(std::move(t));
    if (absl::EndsWith(h.name, ".hessian")) {
      SafetensorsTensorData amax;
      amax.spec.name = absl::StrCat(h.name.substr(0, h.name.size() - 8), ".input_amax");
      amax.spec.dtype = SafetensorsDType::kF32;
      amax.bytes = ToBytes(std::vector<float>{h.hessian->input_amax()});
      tensors.push_back(std::move(amax));
    }
  }
  std::set<std::string> names;
  for (const NamedHessian& h : hessians) names.insert(h.name);
  for (const auto& [alias, target] : aliases) {
    if (names.count(alias) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": alias '", alias,
                       "' is also the name of a Hessian written (the entry would win)"));
    }
    if (names.count(target) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": alias '", alias, "' names '", target,
                       "', which is not one of the Hessians written"));
    }
    metadata[alias] = target;
  }
  std::set<std::string> outputs;
  for (const auto& [module, amax] : output_amax) {
    if (!(amax >= 0.0f) || !std::isfinite(amax)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": output amax of '", module,
                                                     "' = ", amax, " must be finite and >= 0"));
    }
    if (!outputs.insert(module).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": output amax of '", module, "' given twice"));
    }
    SafetensorsTensorData t;
    t.spec.name = module + ".output_amax";
    t.spec.dtype = SafetensorsDType::kF32;
    t.bytes = ToBytes(std::vector<float>{amax});
    tensors.push_back(std::move(t));
  }
  return WriteSafetensorsFile(path, tensors, metadata);
}

}  // namespace nvfp4cal
