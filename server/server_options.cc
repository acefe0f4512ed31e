#include "server/server_options.h"

#include <algorithm>
#include <climits>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "common/freed_memory.h"

namespace nvfp4cal::server {
namespace {

absl::Status OutOfRange(const char* flag, int64_t value, int64_t min, int64_t max) {
  return absl::InvalidArgumentError(
      absl::StrFormat("--%s = %d is out of range [%d, %d]", flag, value, min, max));
}

absl::Status CheckRange(const char* flag, int64_t value, int64_t min, int64_t max) {
  if (value < min || value > max) return OutOfRange(flag, value, min, max);
  return absl::OkStatus();
}

absl::Status CheckDuration(const char* flag, absl::Duration value, absl::Duration max) {
  if (value < absl::ZeroDuration() || value > max) {
    return absl::InvalidArgumentError(absl::StrFormat("--%s = %s is out of range [0s, %s]", flag,
                                                      absl::FormatDuration(value),
                                                      absl::FormatDuration(max)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckListenAddress(const char* flag, const std::string& address) {
  if (absl::StartsWith(address, "unix:") || absl::StartsWith(address, "unix-abstract:")) {
    return absl::OkStatus();
  }
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--%s = \"%s\" is not host:port (e.g. 0.0.0.0:50051, [::]:50051; port 0 picks one)", flag,
        address));
  }
  const std::string port = address.substr(colon + 1);
  int value = 0;
  const bool digits = !port.empty() && port.size() <= 5 &&
                      std::all_of(port.begin(), port.end(), absl::ascii_isdigit);
  if (!digits || !absl::SimpleAtoi(port, &value) || value > 65535) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--%s = \"%s\": port \"%s\" is not a number in [0, 65535]", flag, address, port));
  }
  return absl::OkStatus();
}

absl::Status ValidateServerOptions(const ServerOptions& o) {
  constexpr int64_t kIntMax = INT_MAX;
  constexpr int64_t kKiB = 1 << 10;
  constexpr int64_t kMiB = 1 << 20;
  constexpr int64_t kTiB = int64_t{1} << 40;
  const absl::Duration kDay = absl::Hours(24);
  const ServiceLimits& l = o.limits;
  const DeviceOptions& d = o.devices;
  const KeepaliveOptions& k = o.keepalive;
  // The address may be empty only for in-process servers (tests); main.cc refuses it.
  if (!o.address.empty()) {
    if (absl::Status s = CheckListenAddress("address", o.address); !s.ok()) return s;
  }
  if (!o.metrics_address.empty()) {
    if (absl::Status s = CheckListenAddress("metrics_address", o.metrics_address); !s.ok()) {
      return s;
    }
  }
  if (!o.security.health_address.empty()) {
    if (absl::Status s = CheckListenAddress("health_address", o.security.health_address); !s.ok()) {
      return s;
    }
  }
  const absl::Status checks[] = {
      CheckDuration("drain_timeout", o.drain_timeout, kDay),
      CheckRange("cpu_workers", d.cpu_workers, 1, 1024),
      CheckRange("cuda_workers_per_device", d.cuda_workers_per_device, 1, 16),
      CheckRange("cpu_threads_per_worker", d.cpu_threads_per_worker, 0, 4096),
      CheckRange("max_queued_items", d.max_queued_items, 1, int64_t{1} << 30),
      CheckRange("memory_budget_bytes", d.memory_budget_bytes, kMiB, kTiB),
      CheckRange("max_items_per_batch", d.max_items_per_batch, 1, 1 << 20),
      CheckRange("max_receive_message_bytes", l.max_receive_message_bytes, 64 * kKiB, kIntMax),
      CheckRange("max_send_message_bytes", l.max_send_message_bytes, 64 * kKiB, kIntMax),
      CheckRange("max_tensor_elements", l.max_tensor_elements, 16, kTiB),
      CheckRange("max_buffered_tensor_bytes", l.max_buffered_tensor_bytes, 0, kTiB),
      CheckRange("max_session_hessian_bytes", l.max_session_hessian_bytes, kKiB, kTiB),
      CheckRange("max_full_hessian_bytes", l.max_full_hessian_bytes, 0, kTiB),
      CheckRange("max_session_full_hessian_bytes", l.max_session_full_hessian_bytes, 0, kTiB),
      CheckRange("max_inflight_chunks_per_stream", l.max_inflight_chunks_per_stream, 1, 1 << 16),
      CheckRange("max_unsent_result_bytes_per_stream", l.max_unsent_result_bytes_per_stream, 1,
                 kTiB),
      CheckRange("max_session_tensor_name_bytes", l.max_session_tensor_name_bytes,
                 ServiceLimits::kMaxNameBytesEntry, kTiB),
      CheckDuration("stream_idle_timeout", l.stream_idle_timeout, kDay),
      CheckRange("max_concurrent_streams", l.max_concurrent_streams, 1, 1 << 20),
      CheckRange("max_rows_per_item", l.max_rows_per_item, 1, int64_t{1} << 31),
      CheckRange("max_result_chunk_bytes", l.max_result_chunk_bytes, 1, kIntMax),
      CheckRange("max_jobs", l.max_jobs, 1, 1 << 20),
      CheckRange("max_job_request_bytes", l.max_job_request_bytes, kKiB, kIntMax),
      CheckDuration("job_retention", l.job_retention, 30 * kDay),
      CheckRange("keep_freed_memory_mib", o.keep_freed_memory_mib, 0, kMaxKeptFreedBytes / kMiB),
      CheckRange("keepalive_time_ms", k.time_ms, 1, kIntMax),
      CheckRange("keepalive_timeout_ms", k.timeout_ms, 1, kIntMax),
      CheckRange("keepalive_min_client_ping_interval_ms", k.min_client_ping_interval_ms, 0,
                 kIntMax),
  };
  for (const absl::Status& s : checks) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace nvfp4cal::server
