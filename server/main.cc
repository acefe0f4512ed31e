// nvfp4cal-server: the calibration service binary.
//
//   nvfp4cal-server --address=0.0.0.0:50051 --metrics_address=0.0.0.0:9400 --device=auto
//
// Logs its effective configuration, prints "listening on HOST:PORT" once serving, and on
// SIGTERM or SIGINT drains (readiness NOT_SERVING, no new work, in-flight work gets
// --drain_timeout) and exits 0. SIGHUP re-reads --auth_token_file. Exit code 1: bad flags or
// start-up failure.
#include <csignal>
#include <cstdint>
#include <iostream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/time.h"
#include "common/freed_memory.h"
#include "server/calibration_server.h"

namespace {
const nvfp4cal::server::ServerOptions kDefaults;
}  // namespace

ABSL_FLAG(std::string, address, kDefaults.address,
          "gRPC listen address host:port; port 0 picks a free port");
ABSL_FLAG(std::string, metrics_address, kDefaults.metrics_address,
          "Prometheus /metrics listen address host:port; empty disables it");
ABSL_FLAG(std::string, device, kDefaults.devices.device,
          "auto|cpu|cuda: where quantization runs (auto: CUDA when a GPU is usable, else CPU; "
          "cuda: every GPU, --cuda_workers_per_device workers each, exit 1 when there is none)");
ABSL_FLAG(absl::Duration, drain_timeout, kDefaults.drain_timeout,
          "On SIGTERM, how long in-flight work may take before it is cancelled");
ABSL_FLAG(int, cpu_workers, kDefaults.devices.cpu_workers, "Scheduler workers on the CPU backend");
ABSL_FLAG(int, cuda_workers_per_device, kDefaults.devices.cuda_workers_per_device,
          "Scheduler workers per GPU (each its own stream and --memory_budget_bytes workspace), "
          "so that one worker's copies overlap another's kernels");
ABSL_FLAG(int, cpu_threads_per_worker, kDefaults.devices.cpu_threads_per_worker,
          "Threads of the CPU backend per batch; 0 = all hardware threads");
ABSL_FLAG(int64_t, max_queued_items, kDefaults.devices.max_queued_items,
          "Scheduler work items waiting over all streams; more answer RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, memory_budget_bytes, kDefaults.devices.memory_budget_bytes,
          "Device memory one batch may use");
ABSL_FLAG(int, max_items_per_batch, kDefaults.devices.max_items_per_batch,
          "Items per batch at most");
ABSL_FLAG(int64_t, max_receive_message_bytes, kDefaults.limits.max_receive_message_bytes,
          "Largest gRPC message received");
ABSL_FLAG(int64_t, max_send_message_bytes, kDefaults.limits.max_send_message_bytes,
          "Largest gRPC message sent");
ABSL_FLAG(int64_t, max_tensor_elements, kDefaults.limits.max_tensor_elements,
          "Largest rows * cols of one tensor");
ABSL_FLAG(int64_t, max_buffered_tensor_bytes, kDefaults.limits.max_buffered_tensor_bytes,
          "Largest tensor buffered whole when no global_amax is sent");
ABSL_FLAG(int64_t, max_session_hessian_bytes, kDefaults.limits.max_session_hessian_bytes,
          "Hessian blocks one session may keep");
ABSL_FLAG(int64_t, max_full_hessian_bytes, kDefaults.limits.max_full_hessian_bytes,
          "Full Hessians (method gptq, cols^2 * 4 bytes each) all sessions together may hold");
ABSL_FLAG(int64_t, max_session_full_hessian_bytes, kDefaults.limits.max_session_full_hessian_bytes,
          "Full Hessians (method gptq) one session may hold");
ABSL_FLAG(int, max_inflight_chunks_per_stream, kDefaults.limits.max_inflight_chunks_per_stream,
          "Flow-control window: scheduler items per stream before reading pauses");
ABSL_FLAG(int64_t, max_unsent_result_bytes_per_stream,
          kDefaults.limits.max_unsent_result_bytes_per_stream,
          "Results of one stream not yet read by its client; reading pauses above it");
ABSL_FLAG(int64_t, max_session_tensor_name_bytes, kDefaults.limits.max_session_tensor_name_bytes,
          "Tensor names one session keeps (each name's bytes + 64); more: RESOURCE_EXHAUSTED");
ABSL_FLAG(absl::Duration, stream_idle_timeout, kDefaults.limits.stream_idle_timeout,
          "A stream with nothing in the scheduler that sends no message and reads no result for "
          "this long ends with DEADLINE_EXCEEDED; 0 = never");
ABSL_FLAG(int, max_concurrent_streams, kDefaults.limits.max_concurrent_streams,
          "Quantize streams open at once");
ABSL_FLAG(int64_t, max_rows_per_item, kDefaults.limits.max_rows_per_item,
          "Rows per scheduler work item");
ABSL_FLAG(int64_t, max_result_chunk_bytes, kDefaults.limits.max_result_chunk_bytes,
          "Largest codes + scales payload of one ResultChunk message (results are split)");
ABSL_FLAG(int, max_jobs, kDefaults.limits.max_jobs,
          "Async jobs kept (queued, running, finished); the oldest finished make room");
ABSL_FLAG(int64_t, max_job_request_bytes, kDefaults.limits.max_job_request_bytes,
          "Largest SubmitJob request");
ABSL_FLAG(absl::Duration, job_retention, kDefaults.limits.job_retention,
          "How long a finished job stays fetchable");
ABSL_FLAG(int64_t, keepalive_time_ms, kDefaults.keepalive.time_ms,
          "Interval between keepalive pings on idle connections");
ABSL_FLAG(int64_t, keepalive_timeout_ms, kDefaults.keepalive.timeout_ms,
          "Time to wait for a keepalive ping ack");
ABSL_FLAG(int64_t, keepalive_min_client_ping_interval_ms,
          kDefaults.keepalive.min_client_ping_interval_ms,
          "Smallest interval at which clients may ping without data");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the server; with --tls_key the gRPC port speaks TLS");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle for client certificates (mTLS): presented ones are verified");
ABSL_FLAG(bool, tls_require_client_cert, false,
          "With --tls_client_ca: refuse clients without a valid certificate");
ABSL_FLAG(std::string, auth_token_file, "",
          "File of accepted bearer tokens, one per line ('#' comments); set: every Calibrator "
          "call needs 'authorization: Bearer <token>'. Re-read on SIGHUP");
ABSL_FLAG(std::string, health_address, "",
          "Extra plaintext host:port serving only grpc.health.v1 (Kubernetes probes, which "
          "speak neither TLS nor tokens); empty: none");
ABSL_FLAG(int64_t, keep_freed_memory_mib, kDefaults.keep_freed_memory_mib,
          "Freed memory (received messages, results) the process keeps mapped for reuse, MiB "
          "[0, 2047]: buffers below 64 MiB then come from the heap and its free top returns to "
          "the kernel only beyond this, instead of every 1 MiB message faulting in fresh pages "
          "(on an 8B-sized upload this halved the gRPC threads' system time); 0 = the C "
          "library's defaults");
ABSL_FLAG(bool, keepalive_permit_without_calls, kDefaults.keepalive.permit_without_calls,
          "Whether clients may ping with no call open");

namespace {

nvfp4cal::server::ServerOptions OptionsFromFlags() {
  nvfp4cal::server::ServerOptions o;
  o.address = absl::GetFlag(FLAGS_address);
  o.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  o.drain_timeout = absl::GetFlag(FLAGS_drain_timeout);
  o.devices.device = absl::GetFlag(FLAGS_device);
  o.devices.cpu_workers = absl::GetFlag(FLAGS_cpu_workers);
  o.devices.cuda_workers_per_device = absl::GetFlag(FLAGS_cuda_workers_per_device);
  o.devices.cpu_threads_per_worker = absl::GetFlag(FLAGS_cpu_threads_per_worker);
  o.devices.max_queued_items = absl::GetFlag(FLAGS_max_queued_items);
  o.devices.memory_budget_bytes = absl::GetFlag(FLAGS_memory_budget_bytes);
  o.devices.max_items_per_batch = absl::GetFlag(FLAGS_max_items_per_batch);
  o.limits.max_receive_message_bytes = absl::GetFlag(FLAGS_max_receive_message_bytes);
  o.limits.max_send_message_bytes = absl::GetFlag(FLAGS_max_send_message_bytes);
  o.limits.max_tensor_elements = absl::GetFlag(FLAGS_max_tensor_elements);
  o.limits.max_buffered_tensor_bytes = absl::GetFlag(FLAGS_max_buffered_tensor_bytes);
  o.limits.max_session_hessian_bytes = absl::GetFlag(FLAGS_max_session_hessian_bytes);
  o.limits.max_full_hessian_bytes = absl::GetFlag(FLAGS_max_full_hessian_bytes);
  o.limits.max_session_full_hessian_bytes = absl::GetFlag(FLAGS_max_session_full_hessian_bytes);
  o.limits.max_inflight_chunks_per_stream = absl::GetFlag(FLAGS_max_inflight_chunks_per_stream);
  o.limits.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  o.limits.max_unsent_result_bytes_per_stream =
      absl::GetFlag(FLAGS_max_unsent_result_bytes_per_stream);
  o.limits.max_session_tensor_name_bytes = absl::GetFlag(FLAGS_max_session_tensor_name_bytes);
  o.limits.stream_idle_timeout = absl::GetFlag(FLAGS_stream_idle_timeout);
  o.limits.max_rows_per_item = absl::GetFlag(FLAGS_max_rows_per_item);
  o.limits.max_result_chunk_bytes = absl::GetFlag(FLAGS_max_result_chunk_bytes);
  o.limits.max_jobs = absl::GetFlag(FLAGS_max_jobs);
  o.limits.max_job_request_bytes = absl::GetFlag(FLAGS_max_job_request_bytes);
  o.limits.job_retention = absl::GetFlag(FLAGS_job_retention);
  o.keepalive.time_ms = absl::GetFlag(FLAGS_keepalive_time_ms);
  o.keepalive.timeout_ms = absl::GetFlag(FLAGS_keepalive_timeout_ms);
  o.keepalive.min_client_ping_interval_ms =
      absl::GetFlag(FLAGS_keepalive_min_client_ping_interval_ms);
  o.keepalive.permit_without_calls = absl::GetFlag(FLAGS_keepalive_permit_without_calls);
  o.security.tls_cert_path = absl::GetFlag(FLAGS_tls_cert);
  o.security.tls_key_path = absl::GetFlag(FLAGS_tls_key);
  o.security.tls_client_ca_path = absl::GetFlag(FLAGS_tls_client_ca);
  o.security.tls_require_client_cert = absl::GetFlag(FLAGS_tls_require_client_cert);
  o.security.auth_token_file = absl::GetFlag(FLAGS_auth_token_file);
  o.security.health_address = absl::GetFlag(FLAGS_health_address);
  o.keep_freed_memory_mib = absl::GetFlag(FLAGS_keep_freed_memory_mib);
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("nvfp4cal calibration service (gRPC): see docs/server.md");
  absl::ParseCommandLine(argc, argv);

  // Block the stop signals in every thread (gRPC's included); one sigwait below receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  const nvfp4cal::server::ServerOptions options = OptionsFromFlags();
  if (options.address.empty()) {
    std::cerr << "nvfp4cal-server: --address must not be empty\n";
    return 1;
  }
  // Before anything starts: nonsense limits would otherwise make every request fail or hang.
  if (absl::Status valid = nvfp4cal::server::ValidateServerOptions(options); !valid.ok()) {
    std::cerr << "nvfp4cal-server: " << valid.message() << "\n";
    return 1;
  }
  // Process-wide, so before any thread starts.
  if (options.keep_freed_memory_mib > 0 &&
      !nvfp4cal::KeepFreedMemoryForReuse(options.keep_freed_memory_mib << 20)) {
    std::cerr << "nvfp4cal-server: --keep_freed_memory_mib: this C library has no such setting; "
                 "its defaults stay\n";
  }
  nvfp4cal::server::CalibrationServer server(options);
  std::cerr << "nvfp4cal-server " << nvfp4cal::server::kServerVersion
            << " effective configuration:\n";
  absl::Status started = server.Start();
  std::cerr << server.DescribeConfig() << std::flush;
  if (!started.ok()) {
    std::cerr << "nvfp4cal-server: cannot start: " << started << "\n";
    return 1;
  }
  std::cout << "listening on " << server.address() << std::endl;
  if (!server.health_address().empty()) {
    std::cout << "health on " << server.health_address() << std::endl;
  }
  if (server.metrics_port() != 0) {
    std::cout << "metrics on port " << server.metrics_port() << std::endl;
  }

  int signal = 0;
  while (sigwait(&stop_signals, &signal) == 0 && signal == SIGHUP) {
    // The file name and the count only: tokens never reach the log.
    const absl::Status reloaded = server.ReloadTokens();
    if (reloaded.ok()) {
      std::cerr << "nvfp4cal-server: SIGHUP: reloaded --auth_token_file" << std::endl;
    } else {
      std::cerr << "nvfp4cal-server: SIGHUP: tokens unchanged: " << reloaded << std::endl;
    }
  }
  std::cerr << "nvfp4cal-server: signal " << signal << ", draining (up to "
            << absl::FormatDuration(absl::GetFlag(FLAGS_drain_timeout)) << ")" << std::endl;
  server.Drain();
  std::cerr << "nvfp4cal-server: stopped after " << server.DescribeBatches() << std::endl;
  return 0;
}
