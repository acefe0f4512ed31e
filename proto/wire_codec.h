// The one place where the kernel library's types and the nvfp4cal.v1 messages meet: dtypes,
// method parameters and statistics, each direction next to its inverse (round-trip tested in
// tests/server/wire_codec_test.cc). Used by the client library (what it sends) and the server
// (what it parses and answers).
//
//   v1::TensorHeader header;
//   header.set_dtype(nvfp4cal::DTypeToProto(DType::kBFloat16));
//   nvfp4cal::SearchParamsToProto(params, header.mutable_method());
//   absl::StatusOr<SearchParams> back = nvfp4cal::SearchParamsFromProto(header.method(), "header");
#ifndef NVFP4CAL_PROTO_WIRE_CODEC_H_
#define NVFP4CAL_PROTO_WIRE_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "nvfp4cal/v1/calibrator.pb.h"

namespace nvfp4cal {

// The wire dtype of a weight dtype.
v1::DType DTypeToProto(DType dtype);
// The weight dtype of a wire dtype; INVALID_ARGUMENT naming `field` ("header.dtype") for
// DTYPE_UNSPECIFIED or an unknown value.
absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, const std::string& field);

// Every parameter set explicitly (gptq's too for method gptq), so that the receiver uses
// exactly the sender's values.
void SearchParamsToProto(const SearchParams& params, v1::MethodConfig* method);
// The parameters of a MethodConfig (unset fields keep SearchParams' defaults), validated
// (ValidateParams); errors name the fields under `message` ("header" gives
// "header.method.beta_step ..."). gptq parameters with another method are an error.
absl::StatusOr<SearchParams> SearchParamsFromProto(const v1::MethodConfig& method,
                                                   const std::string& message);

// The statistics of a tensor (or a sum over row ranges) with the method and parameters.
void StatsToProto(const TensorStats& stats, v1::TensorStatistics* out);
// TensorStats of a server's TensorSummary: the method and parameters from `params` (what the
// client asked for), the global amax and scale from the summary, every statistic from its
// `stats`.
TensorStats StatsFromProto(const v1::TensorSummary& summary, const SearchParams& params);

// The bytes of a serialized QuantizeRequest carrying a WeightChunk (or a HessianChunk) whose
// `data` holds `data_bytes` bytes, up to those bytes: prefix + data is exactly what
// SerializeAsString gives for the message with the data in it (the data field is the chunk's
// last, the chunk the request's only field). A sender passes the data as a slice of its own
// memory after the prefix instead of copying it into the message and again into the wire
// buffer (client/server_stream.cc).
std::string WeightChunkRequestPrefix(int64_t row_begin, int64_t num_rows, size_t data_bytes);
std::string HessianChunkRequestPrefix(int64_t element_offset, size_t data_bytes);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_PROTO_WIRE_CODEC_H_
