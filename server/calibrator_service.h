// CalibratorService: the nvfp4cal.v1.Calibrator gRPC service (callback API).
//
// Quantize streams are handled by one QuantizeSession reactor each; GetServerInfo answers from
// the options. The async job methods (SubmitJob, GetJob, WatchJob, CancelJob, ListJobs) are not
// implemented yet and answer UNIMPLEMENTED (the generated base class's behaviour).
//
//   CalibratorService service(options, &scheduler, &metrics, "cpu");
//   grpc::ServerBuilder builder;
//   builder.RegisterService(&service);
//   ...
//   service.StartDraining();   // on SIGTERM: new streams and tensors answer UNAVAILABLE
#ifndef NVFP4CAL_SERVER_CALIBRATOR_SERVICE_H_
#define NVFP4CAL_SERVER_CALIBRATOR_SERVICE_H_

#include <atomic>
#include <string>

#include "grpcpp/grpcpp.h"
#include "nvfp4cal/v1/calibrator.grpc.pb.h"
#include "server/metrics.h"
#include "server/quantize_session.h"
#include "server/scheduler.h"
#include "server/server_options.h"

namespace nvfp4cal::server {

// The server's version string.
inline constexpr char kServerVersion[] = "0.1.0";

class CalibratorService final : public v1::Calibrator::CallbackService {
 public:
  // `scheduler` and `metrics` must outlive the service; `backend` is "cpu" or "cuda".
  CalibratorService(const ServerOptions& options, Scheduler* scheduler, ServerMetrics* metrics,
                    std::string backend);

  grpc::ServerBidiReactor<v1::QuantizeRequest, v1::QuantizeResponse>* Quantize(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request,
                                          v1::ServerInfo* response) override;

  // New streams and new tensors of open streams answer UNAVAILABLE from now on.
  void StartDraining() { draining_ = true; }
  // Open Quantize streams.
  int open_streams() const { return open_streams_.load(); }

  // The ServerInfo this service advertises.
  v1::ServerInfo Info() const;

 private:
  const ServerOptions options_;
  ServerMetrics* const metrics_;
  const std::string backend_;
  std::atomic<bool> draining_{false};
  std::atomic<int> open_streams_{0};
  SessionEnvironment environment_;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_CALIBRATOR_SERVICE_H_
