// CalibrationServer: one running nvfp4cal server (gRPC service, scheduler, health, reflection,
// metrics) with its lifecycle: Start, then Drain.
//
// Used by main.cc and by the in-process loopback tests. Start picks the devices (--device, see
// device_setup.h), starts one scheduler worker per device, the job manager, the metrics endpoint
// and the gRPC server.
//
//   ServerOptions options;
//   options.address = "127.0.0.1:0";
//   CalibrationServer server(options);
//   absl::Status started = server.Start();   // readiness SERVING once this returns OK
//   std::cout << "listening on " << server.address() << "\n";
//   ...
//   server.Drain();   // readiness NOT_SERVING, refuse new work, finish in-flight, stop
#ifndef NVFP4CAL_SERVER_CALIBRATION_SERVER_H_
#define NVFP4CAL_SERVER_CALIBRATION_SERVER_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "server/calibrator_service.h"
#include "server/device_setup.h"
#include "server/full_hessian_budget.h"
#include "server/job_manager.h"
#include "server/metrics.h"
#include "server/scheduler.h"
#include "server/server_options.h"
#include "server/token_authenticator.h"

namespace nvfp4cal::server {

// Health service names.
inline constexpr char kLivenessService[] = "";
inline constexpr char kReadinessService[] = "nvfp4cal.v1.Calibrator";

class CalibrationServer {
 public:
  // Wraps the executor the devices got, before the scheduler uses it.
  using ExecutorWrapper =
      std::function<std::unique_ptr<BatchExecutor>(std::unique_ptr<BatchExecutor> devices)>;

  explicit CalibrationServer(const ServerOptions& options);
  // Drains if still running.
  ~CalibrationServer();

  // For tests: runs every batch through `wrapper(real executor)`, e.g. a gate that holds
  // batches or an injected device failure. Call before Start.
  void set_executor_wrapper(ExecutorWrapper wrapper) { executor_wrapper_ = std::move(wrapper); }

  // Picks the devices, starts the scheduler, job manager, metrics endpoint and gRPC server.
  // Errors: INVALID_ARGUMENT for inconsistent security options, NOT_FOUND for unreadable
  // certificate, key, CA or token files; those of SetUpDevices (unknown --device;
  // FAILED_PRECONDITION for --device=cuda without a usable GPU), UNAVAILABLE when a listen address
  // cannot be bound.
  absl::Status Start();

  // A channel to this server inside the process (no network; tests and fuzzers). Call after a
  // successful Start.
  std::shared_ptr<grpc::Channel> InProcessChannel();

  // The bound gRPC address host:port (the real port when 0 was asked for); empty when
  // options.address is empty (in-process channels only).
  std::string address() const { return address_; }
  // The bound plaintext health address host:port, empty when security.health_address is empty.
  std::string health_address() const { return health_address_; }
  // The bound metrics port, 0 when disabled.
  int metrics_port() const { return metrics_.port(); }
  // "cpu" or "cuda".
  const std::string& backend() const { return backend_; }
  // Which backend --device chose and why (set by Start).
  const std::string& device_selection() const { return device_selection_; }
  // Bytes of full Hessians (method gptq) and gptq plans the sessions and jobs hold now.
  int64_t full_hessian_bytes_in_use() const { return full_hessians_.in_use_bytes(); }
  // The scheduler's counters (batches run and the items in them; also after Drain); zeros
  // before a successful Start.
  SchedulerStats scheduler_stats() const {
    return scheduler_ != nullptr ? scheduler_->Stats() : SchedulerStats{};
  }
  // "N batches of M work items (on average K per batch, holding B MiB)" (the items'
  // memory_bytes: weights, outputs, Hessians), for the stop log.
  std::string DescribeBatches() const;

  // Readiness NOT_SERVING, new streams/tensors/jobs UNAVAILABLE, in-flight calls and unfinished
  // jobs get up to options.drain_timeout to finish, then are cancelled; then the scheduler
  // stops. Idempotent; returns once everything stopped.
  void Drain();

  // Re-reads security.auth_token_file (nvfp4cal-server calls it on SIGHUP). On error the
  // previous tokens stay in force; FAILED_PRECONDITION when no token file is configured.
  absl::Status ReloadTokens();

  // The effective configuration as "key = value" lines, for the start-up log.
  std::string DescribeConfig() const;

 private:
  // Sets a health status on the main server and the health-only server.
  void SetServing(const char* service, bool serving);

  ServerOptions options_;
  ExecutorWrapper executor_wrapper_;
  std::string backend_;
  std::string device_selection_;
  std::string address_;
  ServerMetrics metrics_;
  // Full Hessians and gptq plans of Quantize sessions and jobs (limits.max_full_hessian_bytes);
  // declared before everything that holds them.
  FullHessianBudget full_hessians_;
  std::unique_ptr<BatchExecutor> executor_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<JobManager> jobs_;
  std::unique_ptr<CalibratorService> service_;
  std::unique_ptr<grpc::Server> server_;
  // Answers whatever the health port does not serve (everything but grpc.health.v1) with
  // UNIMPLEMENTED; declared before health_server_, which must go first.
  std::unique_ptr<grpc::CallbackGenericService> health_fallback_;
  // Plaintext server of the health service alone (security.health_address).
  std::unique_ptr<grpc::Server> health_server_;
  std::string health_address_;
  // Null when no token file is configured.
  std::unique_ptr<TokenAuthenticator> authenticator_;
  absl::Mutex drain_mu_;
  bool drained_ = false;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_CALIBRATION_SERVER_H_
