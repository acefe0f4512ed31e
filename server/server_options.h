// ServerOptions: everything nvfp4cal-server can be configured with, in one plain struct.
//
// main.cc fills it from flags; tests fill it directly. Limits here are advertised by
// GetServerInfo and enforced with RESOURCE_EXHAUSTED messages that name them.
//
//   nvfp4cal::server::ServerOptions options;
//   options.address = "127.0.0.1:0";   // port 0: pick a free port
//   options.metrics_address = "";      // no metrics endpoint
//   nvfp4cal::server::CalibrationServer server(options);
#ifndef NVFP4CAL_SERVER_SERVER_OPTIONS_H_
#define NVFP4CAL_SERVER_SERVER_OPTIONS_H_

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace nvfp4cal::server {

// Longest name or other string a client sends (tensor and Hessian names, method names, client
// names, job ids, page tokens): names are kept for a session's life and echoed in messages.
inline constexpr int64_t kMaxNameBytes = 1024;

// Limits on what one client can make the server hold or do.
struct ServiceLimits {
  // Largest gRPC message received; clients keep chunks well below it.
  int64_t max_receive_message_bytes = 16 << 20;
  // Largest gRPC message sent (result chunks are smaller than the weight chunks they answer).
  int64_t max_send_message_bytes = 16 << 20;
  // Largest rows * cols of one tensor (bounds outputs and Hessians).
  int64_t max_tensor_elements = int64_t{1} << 31;
  // Largest tensor buffered whole when the header has no global_amax.
  int64_t max_buffered_tensor_bytes = int64_t{1} << 30;
  // Hessian blocks one session may keep (several tensors may share each).
  int64_t max_session_hessian_bytes = int64_t{256} << 20;
  // Full Hessians (method gptq, cols * cols * 4 bytes each) all sessions together may hold:
  // they are large (822 MB for 14336 inputs), so they are admitted against this server-wide
  // budget when the header defining one arrives. Prepared gptq plans count as in use too.
  int64_t max_full_hessian_bytes = int64_t{8} << 30;
  // Full Hessians one session may hold, so that one client cannot take the whole budget; the
  // client library starts a new session when the next one would not fit.
  int64_t max_session_full_hessian_bytes = int64_t{4} << 30;
  // Flow-control window: weight items of one stream in the scheduler before reading pauses.
  // 32 (1 MiB chunks: 32 MiB per stream): with 8, one loopback server took 7.57 s for the
  // Llama-3-8B-shaped example against 5.85 s with 32 (H100 machine, 3 client streams).
  int max_inflight_chunks_per_stream = 32;
  // Results (codes and scales) of one stream quantized but not yet taken by its client: reading
  // pauses above it, so a client that never reads holds at most this plus its in-flight items'
  // results.
  int64_t max_unsent_result_bytes_per_stream = int64_t{64} << 20;
  // Bytes of tensor names one session keeps for its duplicate-name check (each name counts its
  // length plus kNameEntryOverheadBytes); a whole checkpoint's names take well under 1 MiB.
  int64_t max_session_tensor_name_bytes = int64_t{16} << 20;
  // A Quantize stream with nothing of its own in the scheduler that neither sends a message nor
  // takes a result for this long ends with DEADLINE_EXCEEDED, freeing what it held (stream slot,
  // Hessians, full-Hessian budget). Zero: never.
  absl::Duration stream_idle_timeout = absl::Minutes(5);
  // Quantize streams open at once; more answer RESOURCE_EXHAUSTED.
  int max_concurrent_streams = 256;
  // Rows per scheduler work item; larger chunks, buffered tensors and jobs are split.
  int64_t max_rows_per_item = 1024;
  // Largest codes + scales payload of one ResultChunk; an item's result is split into rows
  // that fit (gptq items can be whole tensors; clients accept 16 MiB messages by default).
  int64_t max_result_chunk_bytes = int64_t{4} << 20;
  // Async jobs kept in memory (queued, running and finished). At the limit a new job makes the
  // oldest finished one forgotten; when every kept job is unfinished SubmitJob answers
  // RESOURCE_EXHAUSTED. Bounds the memory jobs hold: about max_jobs * request size.
  int max_jobs = 256;
  // Largest SubmitJob request (header, Hessian and weights); bigger tensors belong in a
  // Quantize stream. gRPC's own max_receive_message_bytes applies first.
  int64_t max_job_request_bytes = 8 << 20;
  // How long a finished job (and its result) stays fetchable before it is forgotten.
  absl::Duration job_retention = absl::Minutes(10);

  // Codes and scales of one ResultChunk at most: max_result_chunk_bytes, within what
  // max_send_message_bytes leaves after the message's other fields.
  int64_t ResultPayloadBytes() const {
    return std::min(max_result_chunk_bytes, max_send_message_bytes - kMessageOverheadBytes);
  }
  // Room a response message needs beside its payload (names of at most 1 KiB, numbers,
  // statistics).
  static constexpr int64_t kMessageOverheadBytes = 16 << 10;
  // Per name kept by a session, beside its bytes (hash-set entry and string header).
  static constexpr int64_t kNameEntryOverheadBytes = 64;
  // What the longest name counts.
  static constexpr int64_t kMaxNameBytesEntry = kMaxNameBytes + kNameEntryOverheadBytes;
};

// Scheduler and device settings.
struct DeviceOptions {
  // "auto" (CUDA when a device is usable, else CPU), "cpu" or "cuda" (every GPU, one scheduler
  // worker each; Start fails when there is none).
  std::string device = "auto";
  // CPU scheduler workers when no GPU is used; each runs batches with the CPU backend.
  int cpu_workers = 1;
  // Scheduler workers per GPU, each with its own CUDA stream and workspace: one worker's copies
  // and host-side work overlap another's kernels (one worker left the GPU idle between
  // batches: 2.07x the in-process time for the 8B-shaped checkpoint on an H100, see
  // docs/performance.md).
  int cuda_workers_per_device = 3;
  // Threads the CPU backend uses inside one batch; 0 = every hardware thread.
  int cpu_threads_per_worker = 0;
  // Work items waiting over all streams and jobs; more answer RESOURCE_EXHAUSTED at once.
  int64_t max_queued_items = 4096;
  // Memory one batch may use on its device (the CUDA backend needs at least 16 MiB).
  int64_t memory_budget_bytes = int64_t{1} << 30;
  // Items in one batch at most.
  int max_items_per_batch = 64;
};

// Keepalive (HTTP/2 pings) so that dead clients free their streams and proxies keep idle
// connections open.
struct KeepaliveOptions {
  // Interval between server pings on an idle connection.
  int64_t time_ms = 60'000;
  // Time to wait for a ping ack before closing the connection.
  int64_t timeout_ms = 20'000;
  // Smallest interval at which a client may ping without data (faster is a GOAWAY).
  int64_t min_client_ping_interval_ms = 10'000;
  // Whether clients may ping while they have no call open.
  bool permit_without_calls = true;
};

// Transport security and authentication (docs/security.md). Everything empty: plaintext, no
// token required.
struct SecurityOptions {
  // PEM certificate chain and private key of the server; both set: the gRPC port speaks TLS.
  std::string tls_cert_path;
  std::string tls_key_path;
  // PEM CA bundle client certificates are verified against (mTLS); needs TLS.
  std::string tls_client_ca_path;
  // With a client CA: refuse connections without a client certificate (otherwise one is
  // verified when presented).
  bool tls_require_client_cert = false;
  // File of accepted bearer tokens (one per line); set: every Calibrator call needs
  // "authorization: Bearer <token>". Health and reflection never need one.
  std::string auth_token_file;
  // Extra plaintext listen address serving grpc.health.v1 only (and reflection of it), for
  // Kubernetes probes, which speak neither TLS nor tokens; empty: none.
  std::string health_address;

  bool tls() const { return !tls_cert_path.empty() || !tls_key_path.empty(); }
};

struct ServerOptions {
  // gRPC listen address, host:port; port 0 picks a free port; empty: no port, in-process
  // channels only (CalibrationServer::InProcessChannel).
  std::string address = "0.0.0.0:50051";
  // Prometheus endpoint host:port; empty disables it; port 0 picks a free port.
  std::string metrics_address = "0.0.0.0:9400";
  // How long a drain (SIGTERM) waits for in-flight work before cancelling it.
  absl::Duration drain_timeout = absl::Seconds(30);
  ServiceLimits limits;
  DeviceOptions devices;
  KeepaliveOptions keepalive;
  SecurityOptions security;
  // Freed memory the process keeps mapped for reuse, MiB (KeepFreedMemoryForReuse,
  // common/freed_memory.h), in [0, 2047]; 0 = the C library's defaults. Process-wide: the
  // binary applies it before any thread starts; CalibrationServer itself does not.
  int64_t keep_freed_memory_mib = 1024;
};

// OK when every option is in its range; else INVALID_ARGUMENT naming the flag, the range and
// the value (e.g. "--max_queued_items = 0 is out of range [1, 1073741824]"). Run by
// CalibrationServer::Start before anything starts, so nvfp4cal-server exits 1 on nonsense.
absl::Status ValidateServerOptions(const ServerOptions& options);

// OK when `address` (flag `flag`) is host:port with a port in [0, 65535] (or a unix: path).
absl::Status CheckListenAddress(const char* flag, const std::string& address);

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_SERVER_OPTIONS_H_
