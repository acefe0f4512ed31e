// A remote-only user of the library: nvfp4cal::Client and the remote Quantizer, linked against
// nvfp4cal::client alone (tests/client/CMakeLists.txt). remote_only_link_check.sh reads this
// binary's dynamic section: a remote-only program must need neither the CUDA runtime nor
// LAPACK / BLAS, and must not carry the CUDA gptq backend (which dlopens cuBLAS / cuSOLVER).
//
// The program itself asks a port where nothing listens for GetServerInfo, so that the gRPC
// path is linked and runs: it expects UNAVAILABLE or DEADLINE_EXCEEDED and exits 0 on that.
#include <iostream>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/remote_quantizer.h"

int main() {
  nvfp4cal::ClientOptions options;
  options.addresses = {"127.0.0.1:1"};  // port 1: nothing listens there
  options.timeout = absl::Seconds(5);
  options.max_attempts = 1;
  absl::StatusOr<std::unique_ptr<nvfp4cal::Quantizer>> quantizer =
      nvfp4cal::MakeRemoteQuantizer(options);
  if (!quantizer.ok()) {
    std::cerr << "MakeRemoteQuantizer: " << quantizer.status() << "\n";
    return 1;
  }
  absl::StatusOr<std::unique_ptr<nvfp4cal::Client>> client = nvfp4cal::Client::Create(options);
  if (!client.ok()) {
    std::cerr << "Client::Create: " << client.status() << "\n";
    return 1;
  }
  absl::StatusOr<nvfp4cal::v1::ServerInfo> info = (*client)->GetServerInfo(0);
  if (info.ok() ||
      (!absl::IsUnavailable(info.status()) && !absl::IsDeadlineExceeded(info.status()))) {
    std::cerr << "GetServerInfo of 127.0.0.1:1: expected UNAVAILABLE or DEADLINE_EXCEEDED, got "
              << (info.ok() ? "OK" : info.status().ToString()) << "\n";
    return 1;
  }
  std::cout << "remote client ran: GetServerInfo of 127.0.0.1:1 -> " << info.status() << "\n";
  return 0;
}
