#include "server/proto_codec.h"

#include "absl/strings/str_format.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/proto_buffer_reader.h"

namespace nvfp4cal::server {

absl::Status ParseProto(grpc::ByteBuffer* buffer, std::string_view what,
                        google::protobuf::MessageLite* message) {
  message->Clear();
  const size_t size = buffer->Length();
  bool parsed = false;
  {
    grpc::ProtoBufferReader reader(buffer);
    parsed = reader.status().ok() && message->ParseFromZeroCopyStream(&reader);
  }
  if (parsed) return absl::OkStatus();
  message->Clear();
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s (%d bytes) is not a valid %s: malformed protobuf wire format or a string field that is "
      "not UTF-8",
      what, size, message->GetTypeName()));
}

grpc::ByteBuffer SerializeProto(const google::protobuf::MessageLite& message) {
  grpc::ByteBuffer buffer;
  bool own_buffer = false;
  // Fails only for messages over 2 GiB, which the service never builds (results are chunked).
  grpc::SerializationTraits<google::protobuf::MessageLite>::Serialize(message, &buffer, &own_buffer)
      .IgnoreError();
  return buffer;
}

}  // namespace nvfp4cal::server
