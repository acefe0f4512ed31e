// CalibrationServer: one running nvfp4cal server (gRPC service, scheduler, health, reflection,
// metrics) with its lifecycle: Start, then Drain.
//
// Used by main.cc and by the in-process loopback tests.
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

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "server/calibrator_service.h"
#include "server/kernel_executor.h"
#include "server/metrics.h"
#include "server/scheduler.h"
#include "server/server_options.h"

namespace nvfp4cal::server {

// Health service names.
inline constexpr char kLivenessService[] = "";
inline constexpr char kReadinessService[] = "nvfp4cal.v1.Calibrator";

class CalibrationServer {
 public:
  explicit CalibrationServer(const ServerOptions& options);
  // Drains if still running.
  ~CalibrationServer();

  // Picks the backend, starts the scheduler, metrics endpoint and gRPC server. Errors:
  // UNIMPLEMENTED for --device cuda (no CUDA backend in this build), UNAVAILABLE when a
  // listen address cannot be bound.
  absl::Status Start();

  // The bound gRPC address host:port (the real port when 0 was asked for).
  std::string address() const { return address_; }
  // The bound metrics port, 0 when disabled.
  int metrics_port() const { return metrics_.port(); }
  // "cpu" (or "cuda" once that backend exists).
  const std::string& backend() const { return backend_; }

  // Readiness NOT_SERVING, new streams/tensors UNAVAILABLE, in-flight calls get up to
  // options.drain_timeout to finish, then are cancelled; then the scheduler stops.
  // Idempotent; returns once everything stopped.
  void Drain();

  // The effective configuration as "key = value" lines, for the start-up log.
  std::string DescribeConfig() const;

 private:
  ServerOptions options_;
  std::string backend_;
  std::string address_;
  ServerMetrics metrics_;
  std::unique_ptr<KernelExecutor> executor_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<CalibratorService> service_;
  std::unique_ptr<grpc::Server> server_;
  absl::Mutex drain_mu_;
  bool drained_ = false;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_CALIBRATION_SERVER_H_
