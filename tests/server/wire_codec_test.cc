// proto/wire_codec.h and proto/grpc_status.h: every conversion against its inverse, on
// non-default values (so a field that is dropped or crossed over shows), and the errors a
// malformed MethodConfig gets.
#include "proto/wire_codec.h"

#include <random>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/grpc_status.h"

namespace nvfp4cal {
namespace {

using ::testing::HasSubstr;

TEST(WireCodec, DTypesRoundTripAndUnknownOnesAreNamed) {
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    absl::StatusOr<DType> back = DTypeFromProto(DTypeToProto(dtype), "header.dtype");
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, dtype);
  }
  EXPECT_NE(DTypeToProto(DType::kFloat16), DTypeToProto(DType::kBFloat16));
  for (int bad : {0, 99, -1}) {
    absl::StatusOr<DType> back = DTypeFromProto(static_cast<v1::DType>(bad), "header.dtype");
    ASSERT_FALSE(back.ok());
    EXPECT_EQ(back.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(back.status().message()),
                HasSubstr("header.dtype = " + std::to_string(bad)));
  }
}

SearchParams GptqParamsOffDefault() {
  SearchParams p;
  p.method = Method::kGptq;
  p.beta_step = 0.125f;
  p.beta_half_range = 0.375f;
  p.scale_neighbours = 2;
  p.symmetry_tolerance = 3e-3f;
  p.gptq.damping = 0.0625f;
  p.gptq.act_order = true;
  p.gptq.block_columns = 64;
  p.gptq.scale_objective = GptqScaleObjective::kGptqCost;
  p.gptq.scale_search = GptqScaleSearch::kDss;
  p.gptq.compare_local_hessian = true;
  return p;
}

void ExpectSameParams(const SearchParams& a, const SearchParams& b) {
  EXPECT_EQ(a.method, b.method);
  EXPECT_EQ(a.beta_step, b.beta_step);
  EXPECT_EQ(a.beta_half_range, b.beta_half_range);
  EXPECT_EQ(a.scale_neighbours, b.scale_neighbours);
  EXPECT_EQ(a.symmetry_tolerance, b.symmetry_tolerance);
  EXPECT_EQ(a.gptq.damping, b.gptq.damping);
  EXPECT_EQ(a.gptq.act_order, b.gptq.act_order);
  EXPECT_EQ(a.gptq.block_columns, b.gptq.block_columns);
  EXPECT_EQ(a.gptq.scale_objective, b.gptq.scale_objective);
  EXPECT_EQ(a.gptq.scale_search, b.gptq.scale_search);
  EXPECT_EQ(a.gptq.compare_local_hessian, b.gptq.compare_local_hessian);
}

TEST(WireCodec, SearchParamsRoundTripForEveryMethod) {
  for (Method method :
       {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss, Method::kGptq}) {
    SearchParams p = GptqParamsOffDefault();
    p.method = method;
    if (method != Method::kGptq) p.gptq = GptqParams{};  // the wire carries gptq's for gptq only
    v1::MethodConfig config;
    SearchParamsToProto(p, &config);
    absl::StatusOr<SearchParams> back = SearchParamsFromProto(config, "header");
    ASSERT_TRUE(back.ok()) << MethodName(method) << ": " << back.status();
    ExpectSameParams(*back, p);
    EXPECT_EQ(config.has_damping(), method == Method::kGptq);
  }
}

TEST(WireCodec, MalformedMethodConfigsAreNamed) {
  v1::MethodConfig config;
  config.set_name("dss");
  config.set_damping(0.1f);
  absl::StatusOr<SearchParams> gptq_only = SearchParamsFromProto(config, "header");
  ASSERT_FALSE(gptq_only.ok());
  EXPECT_THAT(std::string(gptq_only.status().message()),
              HasSubstr("header.method has gptq parameters"));
  config.Clear();
  config.set_name("local_hessian");
  config.set_compare_local_hessian(false);  // present, even false: still gptq's own
  EXPECT_THAT(std::string(SearchParamsFromProto(config, "header").status().message()),
              HasSubstr("compare_local_hessian) but name = \"local_hessian\""));
  config.Clear();
  config.set_name("gptq");  // unset: no comparison
  absl::StatusOr<SearchParams> plain = SearchParamsFromProto(config, "header");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->gptq.compare_local_hessian);
  config.Clear();
  config.set_name("gptq");
  config.set_scale_search("nonsense");
  absl::StatusOr<SearchParams> search = SearchParamsFromProto(config, "header");
  ASSERT_FALSE(search.ok());
  EXPECT_THAT(std::string(search.status().message()), HasSubstr("header.method."));
  config.Clear();
  config.set_name("dss");
  config.set_beta_step(-1.0f);
  absl::StatusOr<SearchParams> step = SearchParamsFromProto(config, "job");
  ASSERT_FALSE(step.ok());
  EXPECT_THAT(std::string(step.status().message()), HasSubstr("job.method."));
  config.Clear();
  config.set_name("no_such_method");
  EXPECT_FALSE(SearchParamsFromProto(config, "header").ok());
}

TEST(WireCodec, StatisticsRoundTrip) {
  TensorStats stats;
  InitTensorStats(GptqParamsOffDefault(), 3.5f, &stats);
  stats.num_blocks = 1234;
  stats.objective_before = 10.5;
  stats.objective_after = 7.25;
  stats.mse_before = 0.5;
  stats.mse_after = 0.375;
  stats.hessian_error_before = 11.0;
  stats.hessian_error_after = 6.0;
  stats.blocks_scale_changed = 17;
  stats.blocks_beta_not_one = 5;
  stats.blocks_offset_not_zero = 3;
  stats.zero_hessian_blocks = 2;
  stats.gptq.full_hessian_error = 4.5;
  stats.gptq.full_hessian_error_local_hessian = 5.5;
  stats.gptq.damping_relative = 0.02;
  stats.gptq.damping_increases = 1;
  stats.gptq.factor_seconds = 0.25;
  stats.gptq.quantize_seconds = 0.75;
  stats.gptq.compare_seconds = 0.125;
  v1::TensorSummary summary;
  summary.set_global_amax(stats.global_amax);
  summary.set_global_scale(stats.global_scale);
  StatsToProto(stats, summary.mutable_stats());
  EXPECT_EQ(summary.stats().method(), "gptq");
  absl::StatusOr<SearchParams> sent = SearchParamsFromProto(summary.stats().params(), "stats");
  ASSERT_TRUE(sent.ok()) << sent.status();
  ExpectSameParams(*sent, stats.params);
  const TensorStats back = StatsFromProto(summary, stats.params);
  EXPECT_EQ(back.method, stats.method);
  EXPECT_EQ(back.global_amax, stats.global_amax);
  EXPECT_EQ(back.global_scale, stats.global_scale);
  EXPECT_EQ(back.num_blocks, stats.num_blocks);
  EXPECT_EQ(back.objective_before, stats.objective_before);
  EXPECT_EQ(back.objective_after, stats.objective_after);
  EXPECT_EQ(back.mse_before, stats.mse_before);
  EXPECT_EQ(back.mse_after, stats.mse_after);
  EXPECT_EQ(back.hessian_error_before, stats.hessian_error_before);
  EXPECT_EQ(back.hessian_error_after, stats.hessian_error_after);
  EXPECT_EQ(back.blocks_scale_changed, stats.blocks_scale_changed);
  EXPECT_EQ(back.blocks_beta_not_one, stats.blocks_beta_not_one);
  EXPECT_EQ(back.blocks_offset_not_zero, stats.blocks_offset_not_zero);
  EXPECT_EQ(back.zero_hessian_blocks, stats.zero_hessian_blocks);
  EXPECT_EQ(back.gptq.full_hessian_error, stats.gptq.full_hessian_error);
  EXPECT_EQ(back.gptq.full_hessian_error_local_hessian,
            stats.gptq.full_hessian_error_local_hessian);
  EXPECT_EQ(back.gptq.damping_relative, stats.gptq.damping_relative);
  EXPECT_EQ(back.gptq.damping_increases, stats.gptq.damping_increases);
  EXPECT_EQ(back.gptq.factor_seconds, stats.gptq.factor_seconds);
  EXPECT_EQ(back.gptq.quantize_seconds, stats.gptq.quantize_seconds);
  EXPECT_EQ(back.gptq.compare_seconds, stats.gptq.compare_seconds);
}

// The prefixes against protobuf's own serialization of the whole message, on lengths and values
// at every varint width (1-byte and 2-byte lengths, 0 left out by proto3, negative int64 as 10
// bytes), and parsed back.
TEST(WireCodec, ChunkPrefixPlusDataIsTheSerializedRequest) {
  std::mt19937_64 random(7);
  const size_t lengths[] = {0, 1, 2, 100, 127, 128, 129, 16383, 16384, 16385, (1 << 20) + 3};
  const int64_t values[] = {0, 1, 127, 128, 300, int64_t{1} << 35, -1, -(int64_t{1} << 40)};
  for (size_t length : lengths) {
    std::string data(length, '\0');
    for (char& c : data) c = static_cast<char>(random());
    for (int64_t a : values) {
      for (int64_t b : {int64_t{0}, int64_t{1}, int64_t{4097}, a}) {
        v1::QuantizeRequest weights;
        weights.mutable_weights()->set_row_begin(a);
        weights.mutable_weights()->set_num_rows(b);
        weights.mutable_weights()->set_data(data);
        const std::string sent = WeightChunkRequestPrefix(a, b, length) + data;
        ASSERT_EQ(sent, weights.SerializeAsString()) << length << " " << a << " " << b;
        v1::QuantizeRequest back;
        ASSERT_TRUE(back.ParseFromString(sent));
        EXPECT_EQ(back.weights().row_begin(), a);
        EXPECT_EQ(back.weights().num_rows(), b);
        EXPECT_EQ(back.weights().data(), data);
      }
      v1::QuantizeRequest hessian;
      hessian.mutable_hessian()->set_element_offset(a);
      hessian.mutable_hessian()->set_data(data);
      const std::string sent = HessianChunkRequestPrefix(a, length) + data;
      ASSERT_EQ(sent, hessian.SerializeAsString()) << length << " " << a;
      v1::QuantizeRequest back;
      ASSERT_TRUE(back.ParseFromString(sent));
      EXPECT_TRUE(back.has_hessian());
      EXPECT_EQ(back.hessian().element_offset(), a);
      EXPECT_EQ(back.hessian().data(), data);
    }
  }
}

TEST(GrpcStatus, EveryCodeAndMessageRoundTrips) {
  for (int code = 1; code <= 16; ++code) {
    const absl::Status status(static_cast<absl::StatusCode>(code),
                              "message " + std::to_string(code));
    const grpc::Status wire = ToGrpcStatus(status);
    EXPECT_EQ(static_cast<int>(wire.error_code()), code);
    EXPECT_EQ(wire.error_message(), "message " + std::to_string(code));
    const absl::Status back = FromGrpc(wire, "server a:1");
    EXPECT_EQ(back.code(), status.code());
    EXPECT_EQ(back.message(), "server a:1: message " + std::to_string(code));
  }
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_TRUE(FromGrpc(grpc::Status::OK, "server a:1").ok());
}

}  // namespace
}  // namespace nvfp4cal
