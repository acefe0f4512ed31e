// Protobuf messages to and from gRPC's raw byte buffers, for the service's raw callback methods.
//
// The Calibrator service takes its requests as bytes and parses them here, so that a message
// that is not valid protobuf (or carries a string field that is not UTF-8) ends the call with
// INVALID_ARGUMENT naming the message, counted and logged like any other error. With gRPC's
// typed handlers such a message ends a stream as if the client had half-closed (OK, the rest
// dropped) and a unary call with UNIMPLEMENTED and no message, before the service sees it.
//
//   v1::GetJobRequest request;
//   absl::Status parsed = ParseProto(&raw_request, "GetJobRequest", &request);
//   if (!parsed.ok()) return Finish(parsed);   // INVALID_ARGUMENT
//   *raw_response = SerializeProto(job);
#ifndef NVFP4CAL_SERVER_PROTO_CODEC_H_
#define NVFP4CAL_SERVER_PROTO_CODEC_H_

#include <string_view>

#include "absl/status/status.h"
#include "google/protobuf/message_lite.h"
#include "grpcpp/support/byte_buffer.h"

namespace nvfp4cal::server {

// Parses `buffer` into `message` (cleared first). INVALID_ARGUMENT "<what> (N bytes) is not a
// valid nvfp4cal.v1.<type> ..." when the bytes are not a valid message.
absl::Status ParseProto(grpc::ByteBuffer* buffer, std::string_view what,
                        google::protobuf::MessageLite* message);

// The wire bytes of `message`.
grpc::ByteBuffer SerializeProto(const google::protobuf::MessageLite& message);

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_PROTO_CODEC_H_
