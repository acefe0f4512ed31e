// CalibratorService: the nvfp4cal.v1.Calibrator gRPC service (callback API).
//
// Quantize streams are handled by one QuantizeSession reactor each; the async job methods map
// one to one onto a JobManager (WatchJob through a JobWatchReactor); GetServerInfo answers from
// the options and the devices the server runs on. Every RPC is counted in the metrics by method
// and status code.
//
// Every method is registered raw (bytes in, bytes out) and parses its messages itself
// (server/proto_codec.h): a message that is not valid protobuf ends the call with
// INVALID_ARGUMENT, counted and logged, where gRPC's typed handlers would answer UNIMPLEMENTED
// (unary) or end a stream as if the client had half-closed.
//
//   absl::StatusOr<DeviceSetup> devices = SetUpDevices(options.devices);
//   CalibratorService service(options, &scheduler, &jobs, &metrics, devices->backend,
//                             devices->workers);
//   grpc::ServerBuilder builder;
//   builder.RegisterService(&service);
//   ...
//   service.StartDraining();   // on SIGTERM: new streams, tensors and jobs answer UNAVAILABLE
#ifndef NVFP4CAL_SERVER_CALIBRATOR_SERVICE_H_
#define NVFP4CAL_SERVER_CALIBRATOR_SERVICE_H_

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "nvfp4cal/v1/calibrator.grpc.pb.h"
#include "server/device_setup.h"
#include "server/full_hessian_budget.h"
#include "server/job_manager.h"
#include "server/metrics.h"
#include "server/quantize_session.h"
#include "server/scheduler.h"
#include "server/server_options.h"
#include "server/stream_watchdog.h"
#include "server/token_authenticator.h"

namespace nvfp4cal::server {

// The server's version string.
inline constexpr char kServerVersion[] = "0.1.0";

// The generated service with every method in its raw callback form.
using RawCalibratorService =
    v1::Calibrator::WithRawCallbackMethod_Quantize<v1::Calibrator::WithRawCallbackMethod_SubmitJob<
        v1::Calibrator::WithRawCallbackMethod_GetJob<v1::Calibrator::WithRawCallbackMethod_WatchJob<
            v1::Calibrator::WithRawCallbackMethod_CancelJob<
                v1::Calibrator::WithRawCallbackMethod_ListJobs<
                    v1::Calibrator::WithRawCallbackMethod_GetServerInfo<
                        v1::Calibrator::Service>>>>>>>;

class CalibratorService final : public RawCalibratorService {
 public:
  // `scheduler`, `jobs` and `metrics` must outlive the service; `backend` is "cpu" or "cuda";
  // `devices` are the scheduler's workers. With an `authenticator` (outliving the service too)
  // every call must carry an accepted bearer token, else it ends UNAUTHENTICATED.
  // `full_hessians`: the server-wide budget of full Hessians (shared with the jobs).
  CalibratorService(const ServerOptions& options, Scheduler* scheduler, JobManager* jobs,
                    ServerMetrics* metrics, FullHessianBudget* full_hessians, std::string backend,
                    std::vector<WorkerDevice> devices,
                    const TokenAuthenticator* authenticator = nullptr);

  ~CalibratorService() override;

  using Raw = grpc::ByteBuffer;
  grpc::ServerBidiReactor<Raw, Raw>* Quantize(grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context, const Raw* request,
                                      Raw* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context, const Raw* request,
                                   Raw* response) override;
  grpc::ServerWriteReactor<Raw>* WatchJob(grpc::CallbackServerContext* context,
                                          const Raw* request) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context, const Raw* request,
                                      Raw* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context, const Raw* request,
                                     Raw* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context, const Raw* request,
                                          Raw* response) override;

  // New streams, new tensors of open streams and new jobs answer UNAVAILABLE from now on.
  void StartDraining() { draining_ = true; }
  // Open Quantize streams.
  int open_streams() const { return open_streams_.load(); }

  // The ServerInfo this service advertises.
  v1::ServerInfo Info() const;

 private:
  // Finishes a unary call with `status` and counts it.
  grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context, const char* method,
                                        absl::Time start, const absl::Status& status);
  // A unary call: authentication, then `raw_request` parsed as a Request, then
  // `handle(const Request&, const Caller&) -> absl::StatusOr<Response>`, whose response is
  // serialized into `raw_response`; counted under `method`.
  template <typename Request, typename Handler>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* context, const char* method,
                                  const Raw* raw_request, Raw* raw_response, Handler handle);
  // Parses a request of `method`; INVALID_ARGUMENT (counted and logged) when malformed.
  absl::Status ParseRequest(const grpc::CallbackServerContext* context, const char* method,
                            const Raw* raw_request, google::protobuf::MessageLite* request);

  // The caller (the default Caller when no token is required), or UNAUTHENTICATED when a token
  // is required and the call has no accepted one.
  absl::StatusOr<Caller> Authenticate(const grpc::CallbackServerContext* context) const;

  const ServerOptions options_;
  JobManager* const jobs_;
  const TokenAuthenticator* const authenticator_;
  ServerMetrics* const metrics_;
  const std::string backend_;
  const std::vector<WorkerDevice> devices_;
  std::atomic<bool> draining_{false};
  std::atomic<int> open_streams_{0};
  // Full Hessians of every session (limits.max_full_hessian_bytes); outlives the sessions,
  // which are all gone once the server drained.
  // Ends idle Quantize streams; null when limits.stream_idle_timeout is zero.
  std::unique_ptr<StreamWatchdog> watchdog_;
  SessionEnvironment environment_;
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_CALIBRATOR_SERVICE_H_
