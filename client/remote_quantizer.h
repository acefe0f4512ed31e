// Remote Quantizer: the quantize pipeline's tensors go to nvfp4cal servers through
// nvfp4cal::Client (client.h). Output is byte-identical to the in-process Quantizer because
// the servers run the same kernels with the same global amax, Hessian blocks and parameters.
//
//   nvfp4cal::ClientOptions options;
//   options.addresses = {"127.0.0.1:50051", "127.0.0.1:50052"};
//   absl::StatusOr<std::unique_ptr<nvfp4cal::Quantizer>> q =
//       nvfp4cal::MakeRemoteQuantizer(options);
#ifndef NVFP4CAL_CLIENT_REMOTE_QUANTIZER_H_
#define NVFP4CAL_CLIENT_REMOTE_QUANTIZER_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "client/quantizer.h"

namespace nvfp4cal {

// Creates the client (no connection yet: an unreachable server shows up, after the retries, as
// QuantizeAll's UNAVAILABLE naming it).
absl::StatusOr<std::unique_ptr<Quantizer>> MakeRemoteQuantizer(const ClientOptions& options);

// "host:port,host:port" -> addresses; INVALID_ARGUMENT naming an empty or port-less entry.
absl::StatusOr<std::vector<std::string>> ParseServerList(const std::string& list);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_REMOTE_QUANTIZER_H_
