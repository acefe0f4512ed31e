// absl::Status <-> grpc::Status, in one place for the server (what it answers) and the client
// library (what it reports). The codes are the same numbers in both (gRPC's canonical codes).
//
//   reactor->Finish(nvfp4cal::ToGrpcStatus(absl::InvalidArgumentError("header.rows = 0 ...")));
//   absl::Status s = nvfp4cal::FromGrpc(status, "server 10.0.0.5:50051");
#ifndef NVFP4CAL_PROTO_GRPC_STATUS_H_
#define NVFP4CAL_PROTO_GRPC_STATUS_H_

#include <string>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"

namespace nvfp4cal {

// The status sent to a client: the same code and message.
grpc::Status ToGrpcStatus(const absl::Status& status);

// A gRPC status as absl::Status with the same code, the message prefixed by `context` and ": ".
absl::Status FromGrpc(const grpc::Status& status, const std::string& context);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_PROTO_GRPC_STATUS_H_
