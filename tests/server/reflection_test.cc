// Server reflection of the real nvfp4cal-server binary, asked the way grpcurl asks: the
// registered services, and the descriptor of nvfp4cal.v1.Calibrator with all its methods.
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "reflection_client.grpc.pb.h"
#include "tests/server/server_process.h"

namespace nvfp4cal::server {
namespace {

namespace reflection = ::grpc::reflection::v1alpha;
using ::nvfp4cal::server::testing::ServerProcess;
using ::testing::Contains;
using ::testing::ElementsAre;

TEST(ServerBinary, ReflectionListsTheCalibratorAndDescribesItsMethods) {
  ServerProcess server(
      {NVFP4CAL_SERVER_BINARY, "--address=127.0.0.1:0", "--metrics_address=", "--device=cpu"});
  const std::string address = server.ReadLineStartingWith("listening on ");
  ASSERT_FALSE(address.empty()) << "server did not print its address";
  // The client, its channel and its call end before SIGTERM: a connection still open would
  // make the server's drain wait for it.
  {
    // A channel of its own connections, closed when it is destroyed.
    grpc::ChannelArguments arguments;
    arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    auto stub = reflection::ServerReflection::NewStub(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), arguments));
    grpc::ClientContext context;
    auto stream = stub->ServerReflectionInfo(&context);
    reflection::ServerReflectionResponse response;

    reflection::ServerReflectionRequest list;
    list.set_list_services("");
    ASSERT_TRUE(stream->Write(list));
    ASSERT_TRUE(stream->Read(&response));
    ASSERT_TRUE(response.has_list_services_response()) << response.DebugString();
    std::vector<std::string> services;
    for (const reflection::ServiceResponse& s : response.list_services_response().service()) {
      services.push_back(s.name());
    }
    EXPECT_THAT(services, Contains("nvfp4cal.v1.Calibrator"));
    EXPECT_THAT(services, Contains("grpc.health.v1.Health"));
    EXPECT_THAT(services, Contains("grpc.reflection.v1alpha.ServerReflection"));

    reflection::ServerReflectionRequest symbol;
    symbol.set_file_containing_symbol("nvfp4cal.v1.Calibrator");
    ASSERT_TRUE(stream->Write(symbol));
    ASSERT_TRUE(stream->Read(&response));
    ASSERT_TRUE(response.has_file_descriptor_response()) << response.DebugString();
    std::vector<std::string> methods;
    bool quantize_is_bidi = false;
    for (const std::string& bytes : response.file_descriptor_response().file_descriptor_proto()) {
      google::protobuf::FileDescriptorProto file;
      ASSERT_TRUE(file.ParseFromString(bytes));
      if (file.package() != "nvfp4cal.v1") continue;
      for (const google::protobuf::ServiceDescriptorProto& service : file.service()) {
        if (service.name() != "Calibrator") continue;
        for (const google::protobuf::MethodDescriptorProto& method : service.method()) {
          methods.push_back(method.name());
          if (method.name() == "Quantize") {
            quantize_is_bidi = method.client_streaming() && method.server_streaming();
          }
        }
      }
    }
    EXPECT_THAT(methods, ElementsAre("Quantize", "SubmitJob", "GetJob", "WatchJob", "CancelJob",
                                     "ListJobs", "GetServerInfo"));
    EXPECT_TRUE(quantize_is_bidi);

    reflection::ServerReflectionRequest unknown;
    unknown.set_file_containing_symbol("nvfp4cal.v1.NoSuchService");
    ASSERT_TRUE(stream->Write(unknown));
    ASSERT_TRUE(stream->Read(&response));
    ASSERT_TRUE(response.has_error_response()) << response.DebugString();
    EXPECT_EQ(response.error_response().error_code(), grpc::StatusCode::NOT_FOUND);

    ASSERT_TRUE(stream->WritesDone());
    EXPECT_TRUE(stream->Finish().ok());
  }
  server.Signal(SIGTERM);
  EXPECT_EQ(server.Wait(), 0);
}

// The plaintext health port (--health_address) serves grpc.health.v1 only, as docs/security.md
// says: no reflection of the Calibrator. (Before: it served reflection of the whole API.)
TEST(ServerBinary, HealthPortServesNoReflection) {
  ServerProcess server({NVFP4CAL_SERVER_BINARY, "--address=127.0.0.1:0",
                        "--metrics_address=", "--device=cpu", "--health_address=127.0.0.1:0"});
  ASSERT_FALSE(server.ReadLineStartingWith("listening on ").empty());
  const std::string health = server.ReadLineStartingWith("health on ");
  ASSERT_FALSE(health.empty()) << "server did not print its health address";
  {
    grpc::ChannelArguments arguments;
    arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    auto stub = reflection::ServerReflection::NewStub(
        grpc::CreateCustomChannel(health, grpc::InsecureChannelCredentials(), arguments));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    auto stream = stub->ServerReflectionInfo(&context);
    reflection::ServerReflectionRequest list;
    list.set_list_services("");
    stream->Write(list);
    stream->WritesDone();
    reflection::ServerReflectionResponse response;
    EXPECT_FALSE(stream->Read(&response)) << response.DebugString();
    EXPECT_EQ(stream->Finish().error_code(), grpc::UNIMPLEMENTED);
  }
  server.Signal(SIGTERM);
  EXPECT_EQ(server.Wait(), 0);
}

}  // namespace
}  // namespace nvfp4cal::server
