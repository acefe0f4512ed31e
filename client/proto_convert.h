// Conversions between the kernel library's types and the nvfp4cal.v1 protobuf messages, for
// the client's Quantize sessions.
//
//   v1::TensorHeader header;
//   header.set_dtype(nvfp4cal::ToProto(DType::kBFloat16));
//   nvfp4cal::FillMethod(params, header.mutable_method());
//   TensorStats stats = nvfp4cal::StatsFromSummary(summary, params);
#ifndef NVFP4CAL_CLIENT_PROTO_CONVERT_H_
#define NVFP4CAL_CLIENT_PROTO_CONVERT_H_

#include <string>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "nvfp4cal/v1/calibrator.pb.h"

namespace nvfp4cal {

// A gRPC status as absl::Status with the same code, the message prefixed by `context`.
absl::Status FromGrpc(const grpc::Status& status, const std::string& context);

// The wire dtype of a weight dtype.
v1::DType ToProto(DType dtype);

// Every parameter set explicitly (gptq's too for method gptq), so that servers use exactly the
// caller's values.
void FillMethod(const SearchParams& params, v1::MethodConfig* method);

// TensorStats of a server's TensorSummary (method and parameters from `params`), with gptq's
// statistics.
TensorStats StatsFromSummary(const v1::TensorSummary& summary, const SearchParams& params);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_PROTO_CONVERT_H_
