// gRPC statuses as absl::Status for the client library (the kernel types' conversions to and
// from the messages are in proto/wire_codec.h, shared with the server).
//
//   absl::Status s = nvfp4cal::FromGrpc(status, "server 10.0.0.5:50051");
#ifndef NVFP4CAL_CLIENT_PROTO_CONVERT_H_
#define NVFP4CAL_CLIENT_PROTO_CONVERT_H_

#include <string>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"

namespace nvfp4cal {

// A gRPC status as absl::Status with the same code, the message prefixed by `context`.
absl::Status FromGrpc(const grpc::Status& status, const std::string& context);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_PROTO_CONVERT_H_
