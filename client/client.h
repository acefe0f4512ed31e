// nvfp4cal::Client: the C++ client of nvfp4cal-server's Quantize stream.
//
// Thread-safe (every call has its own streams; the channels are shared), blocking and async.
// It chunks Hessians and weight rows under the limits each server advertises in GetServerInfo,
// sets deadlines, retries UNAVAILABLE (unreachable, draining) with exponential backoff, and
// spreads tensors over several server addresses: round robin, one Quantize session per address,
// idle sessions stealing queued tensors of busier ones, and the unfinished tensors of a failed
// server going to the others. An address given k times gets k sessions at once; when the server
// refuses some of them for its max_concurrent_streams, the others of that address take their
// tensors.
// Tensors sharing a Hessian (q/k/v, gate/up) travel together so that a session sends the
// Hessian once. Method gptq sends the full Hessian (TensorTask::full_hessian, upper triangle by
// default) and starts a new session when the next one would exceed the server's
// max_session_full_hessian_bytes. Results are the kernel library's bytes (the server runs
// kernels/).
//
//   nvfp4cal::ClientOptions options;
//   options.addresses = {"gpu-0:50051", "gpu-1:50051"};
//   absl::StatusOr<std::unique_ptr<nvfp4cal::Client>> client = nvfp4cal::Client::Create(options);
//   absl::Status done = (*client)->QuantizeTensors(tasks, [](size_t i, nvfp4cal::QuantizedTensor r)
//   {
//     ...;   // called from the client's threads, once per task
//     return absl::OkStatus();
//   });
//   absl::StatusOr<nvfp4cal::QuantizedTensor> one = (*client)->Quantize(task);
#ifndef NVFP4CAL_CLIENT_CLIENT_H_
#define NVFP4CAL_CLIENT_CLIENT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/quantizer.h"
#include "client/trace.h"
#include "nvfp4cal/v1/calibrator.grpc.pb.h"

namespace nvfp4cal {

// Expands every "dns:///host:port" entry into one "ip:port" entry per address the name
// resolves to (a Kubernetes headless Service resolves to every ready pod), so that tensors are
// spread over all of them; other entries, and names that do not resolve, are kept as given.
std::vector<std::string> ExpandServerAddresses(const std::vector<std::string>& addresses);

// The bearer token of a token file: its first line that is neither blank nor a '#' comment,
// trimmed. NOT_FOUND for an unreadable file, INVALID_ARGUMENT when there is no token (the
// message never contains the token).
absl::StatusOr<std::string> ReadBearerTokenFile(const std::string& path);

struct ClientOptions {
  // Server addresses "host:port" (any gRPC target). Tensors are spread over all of them; a
  // "dns:///name:port" entry counts once per resolved address (ExpandServerAddresses). Every
  // entry is a connection with its own session, so an address given k times is worked on by k
  // sessions at once. A session that its server refuses for max_concurrent_streams
  // (RESOURCE_EXHAUSTED, before any result) leaves its tensors to the other sessions of that
  // address and ends; the last one of the address retries it like UNAVAILABLE (the server counts
  // a stream until it has released it, which can be after the client saw its end).
  std::vector<std::string> addresses;
  // TLS: off by default (plain text). With use_tls, the PEM files below (empty: system roots /
  // no client certificate).
  bool use_tls = false;
  std::string tls_root_certs_path;
  std::string tls_client_cert_path;
  std::string tls_client_key_path;
  // Bearer token sent as "authorization: Bearer <token>" on every call; empty: none. Meant for
  // TLS connections (over plaintext anyone on the path can read it).
  std::string bearer_token;
  // Deadline of each Quantize stream and GetServerInfo call; zero = no deadline for streams
  // (a whole checkpoint may take long) and 30 s for GetServerInfo.
  absl::Duration timeout = absl::ZeroDuration();
  // Attempts per tensor when its server answers UNAVAILABLE (unreachable, draining) before the
  // call fails; each retry waits initial_backoff * 2^(n-1), at most max_backoff.
  int max_attempts = 4;
  absl::Duration initial_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(5);
  // Target size of a weight or Hessian chunk; capped at a quarter of the server's
  // max_receive_message_bytes. DESIGN: chunks stay well under 4 MiB.
  int64_t chunk_bytes = int64_t{1} << 20;
  // With work stealing every session takes the next group of tensors, in the caller's order,
  // from one queue: faster servers do more, and the tensors go out in the order the caller
  // reads them. Without it, round robin gives each address every n-th group.
  bool work_stealing = true;
  // Method gptq: send each full Hessian as its upper triangle (HESSIAN_LAYOUT_FULL_UPPER, half
  // the bytes; the server mirrors it) rather than the whole matrix (HESSIAN_LAYOUT_FULL).
  // Either way the chunks are cut from TensorTask::full_hessian, never from a second copy.
  bool send_full_hessian_upper = true;
  // Session options sent to the servers.
  int priority = 0;
  std::string client_name = "nvfp4cal";
  // Receives the client's notes for the user, one line each ("note: server ADDR refused a
  // stream (max_concurrent_streams); going on with 2 streams to it"), from the client's threads,
  // possibly concurrently; empty: the notes are dropped.
  std::function<void(const std::string& line)> on_note;
  // When not null (`nvfp4cal quantize --trace`), on each stream's row its wait for a tensor's
  // weights ("wait for NAME", category quantize) and the tensor's sending, blocked writes
  // included ("send NAME", category send), and on a row per tensor the time from its last
  // chunk sent to its result ("NAME", category server). It must outlive the calls.
  Trace* trace = nullptr;
};

// What one QuantizeTensors call did, for logs and tests.
struct ClientCallStats {
  // Tensors whose result came from each address (ClientOptions::addresses order).
  std::vector<int64_t> tensors_per_address;
  // Sessions or connections that failed with UNAVAILABLE and were retried or given up (and
  // sessions refused for max_concurrent_streams by the last live session of an address).
  int64_t failed_attempts = 0;
  // Sessions refused for max_concurrent_streams while other sessions of the same address went
  // on: each left its tensors to them and ended (ClientOptions::addresses).
  int64_t streams_refused = 0;
};

class Client {
 public:
  // Creates a channel per address (no connection is made yet). INVALID_ARGUMENT for no
  // addresses or bad options; NOT_FOUND for unreadable TLS files.
  static absl::StatusOr<std::unique_ptr<Client>> Create(const ClientOptions& options);

  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const ClientOptions& options() const { return options_; }

  // GetServerInfo of addresses[index], retried on UNAVAILABLE like the streams.
  absl::StatusOr<v1::ServerInfo> GetServerInfo(size_t index);

  // Quantizes every task over all addresses and hands each result to `on_result` (called from
  // the client's threads, possibly concurrently for different tasks). Blocks until all are done
  // or the first error: a task's or the callback's error, or UNAVAILABLE (RESOURCE_EXHAUSTED for
  // refused streams) after max_attempts, naming the server and the tensor. On error the other
  // streams are cancelled.
  absl::Status QuantizeTensors(absl::Span<const TensorTask> tasks,
                               const QuantizeResultCallback& on_result,
                               ClientCallStats* stats = nullptr);

  // QuantizeTensors on a new thread; `tasks`, what they point to and `on_result` must outlive
  // the future.
  std::future<absl::Status> QuantizeTensorsAsync(absl::Span<const TensorTask> tasks,
                                                 QuantizeResultCallback on_result);

  // One tensor, blocking.
  absl::StatusOr<QuantizedTensor> Quantize(const TensorTask& task);

 private:
  class Call;
  explicit Client(ClientOptions options) : options_(std::move(options)) {}
  // Adds the bearer token (if any) to a call's metadata.
  void Authorize(grpc::ClientContext* context) const;

  ClientOptions options_;
  // One channel (connection) per address entry; Quantize streams open on the channel itself
  // (client_internal::ServerStream), the other calls through its stub.
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<v1::Calibrator::Stub>> stubs_;
  // Round-robin start of the next call, so concurrent calls begin on different servers.
  std::atomic<size_t> next_address_{0};
};

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_CLIENT_H_
