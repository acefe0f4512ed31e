#include "server/calibration_server.h"

#include <chrono>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace nvfp4cal::server {
namespace {

// Host part of host:port (IPv6 in brackets kept as is).
std::string HostOf(const std::string& address) {
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}

}  // namespace

CalibrationServer::CalibrationServer(const ServerOptions& options) : options_(options) {}

CalibrationServer::~CalibrationServer() { Drain(); }

absl::Status CalibrationServer::Start() {
  absl::StatusOr<DeviceSetup> devices = SetUpDevices(options_.devices);
  if (!devices.ok()) return devices.status();
  backend_ = devices->backend;
  device_selection_ = devices->selection;
  executor_ = std::move(devices->executor);
  if (executor_wrapper_) executor_ = executor_wrapper_(std::move(executor_));
  SchedulerOptions scheduler;
  scheduler.num_workers = static_cast<int>(devices->workers.size());
  scheduler.max_queued_items = options_.devices.max_queued_items;
  scheduler.memory_budget_bytes = options_.devices.memory_budget_bytes;
  scheduler.max_items_per_batch = options_.devices.max_items_per_batch;
  scheduler_ = std::make_unique<Scheduler>(scheduler, executor_.get());
  JobManagerOptions jobs;
  jobs.limits = options_.limits;
  jobs_ = std::make_unique<JobManager>(jobs, scheduler_.get(), &metrics_);
  service_ = std::make_unique<CalibratorService>(options_, scheduler_.get(), jobs_.get(), &metrics_,
                                                 backend_, devices->workers);

  if (!options_.metrics_address.empty()) {
    std::vector<int> cuda_devices;
    for (const WorkerDevice& w : devices->workers) {
      if (w.cuda_device >= 0) cuda_devices.push_back(w.cuda_device);
    }
    metrics_.ExposeDeviceMemory(std::move(cuda_devices));
    if (absl::Status s = metrics_.Serve(options_.metrics_address); !s.ok()) return s;
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options_.address, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(service_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(options_.limits.max_receive_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options_.limits.max_send_message_bytes));
  const KeepaliveOptions& keepalive = options_.keepalive;
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(keepalive.time_ms));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, static_cast<int>(keepalive.timeout_ms));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             static_cast<int>(keepalive.min_client_ping_interval_ms));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS,
                             keepalive.permit_without_calls ? 1 : 0);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port == 0) {
    server_.reset();
    return absl::UnavailableError(
        absl::StrCat("--address = \"", options_.address, "\": cannot listen"));
  }
  address_ = absl::StrCat(HostOf(options_.address), ":", port);
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  health->SetServingStatus(kReadinessService, false);  // starting
  health->SetServingStatus(kLivenessService, true);
  health->SetServingStatus(kReadinessService, true);
  return absl::OkStatus();
}

void CalibrationServer::Drain() {
  absl::MutexLock lock(&drain_mu_);
  if (drained_) return;
  drained_ = true;
  if (server_ != nullptr) {
    // Draining first: a client that sees NOT_SERVING can rely on new work being refused.
    service_->StartDraining();
    server_->GetHealthCheckService()->SetServingStatus(kReadinessService, false);
    const auto deadline =
        std::chrono::system_clock::now() +
        std::chrono::microseconds(absl::ToInt64Microseconds(options_.drain_timeout));
    // Stops accepting calls, waits for in-flight ones until the deadline, then cancels them.
    server_->Shutdown(deadline);
    server_->Wait();
    // Accepted jobs nobody watches get what is left of the same deadline.
    jobs_->WaitUntilIdle(absl::FromChrono(deadline));
    jobs_->CancelAll(absl::UnavailableError("the server shut down before the job finished"));
  }
  if (scheduler_ != nullptr) scheduler_->Shutdown();
}

std::string CalibrationServer::DescribeConfig() const {
  const ServiceLimits& l = options_.limits;
  const DeviceOptions& d = options_.devices;
  const KeepaliveOptions& k = options_.keepalive;
  // Only %s and %d: Abseil 20220623 has no %v (it formats the whole string as empty).
  return absl::StrFormat(
      "address = %s\nmetrics_address = %s\ndrain_timeout = %s\ndevice = %s (backend %s)\n"
      "device_selection = %s\n"
      "cpu_workers = %d\ncpu_threads_per_worker = %d\nmax_queued_items = %d\n"
      "memory_budget_bytes = %d\nmax_items_per_batch = %d\nmax_receive_message_bytes = %d\n"
      "max_send_message_bytes = %d\nmax_tensor_elements = %d\nmax_buffered_tensor_bytes = %d\n"
      "max_session_hessian_bytes = %d\nmax_inflight_chunks_per_stream = %d\n"
      "max_concurrent_streams = %d\nmax_rows_per_item = %d\nkeepalive_time_ms = %d\n"
      "keepalive_timeout_ms = %d\nkeepalive_min_client_ping_interval_ms = %d\n"
      "keepalive_permit_without_calls = %s\nmax_jobs = %d\nmax_job_request_bytes = %d\n"
      "job_retention = %s\n",
      options_.address, options_.metrics_address.empty() ? "(disabled)" : options_.metrics_address,
      absl::FormatDuration(options_.drain_timeout), d.device, backend_,
      device_selection_.empty() ? "(not started)" : device_selection_, d.cpu_workers,
      d.cpu_threads_per_worker, d.max_queued_items, d.memory_budget_bytes, d.max_items_per_batch,
      l.max_receive_message_bytes, l.max_send_message_bytes, l.max_tensor_elements,
      l.max_buffered_tensor_bytes, l.max_session_hessian_bytes, l.max_inflight_chunks_per_stream,
      l.max_concurrent_streams, l.max_rows_per_item, k.time_ms, k.timeout_ms,
      k.min_client_ping_interval_ms, k.permit_without_calls ? "true" : "false", l.max_jobs,
      l.max_job_request_bytes, absl::FormatDuration(l.job_retention));
}

}  // namespace nvfp4cal::server
