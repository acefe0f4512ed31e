#include "server/calibrator_service.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nvfp4cal/kernels/scale_search.h"
#include "proto/grpc_status.h"
#include "server/job_watch_reactor.h"
#include "server/log.h"
#include "server/proto_codec.h"

namespace nvfp4cal::server {
namespace {

void AddParameter(v1::MethodInfo* method, const char* name, double min, double max,
                  bool max_inclusive, double default_value, const char* description) {
  v1::ParameterRange* range = method->add_parameters();
  range->set_name(name);
  range->set_min(min);
  range->set_max(max);
  range->set_max_inclusive(max_inclusive);
  range->set_default_value(default_value);
  range->set_description(description);
}

void AddChoice(v1::MethodInfo* method, const char* name, std::vector<std::string> values,
               const std::string& default_value, const char* description) {
  v1::ParameterRange* range = method->add_parameters();
  range->set_name(name);
  for (std::string& value : values) range->add_allowed_values(std::move(value));
  range->set_default_string(default_value);
  range->set_description(description);
}

// gptq's own parameters (docs/numerics.md §6), with the kernels' ranges (ValidateParams).
void AddGptqParameters(const SearchParams& defaults, v1::MethodInfo* m) {
  const GptqParams& gptq = defaults.gptq;
  AddParameter(m, "damping", 0.0, 10.0, true, gptq.damping,
               "Added to diag(H) before factorising, relative to mean(diag H); raised tenfold "
               "while H is not positive definite.");
  AddParameter(m, "act_order", 0, 1, true, gptq.act_order ? 1 : 0,
               "1: quantize 16-column groups in descending order of their Hessian diagonal.");
  AddParameter(m, "compare_local_hessian", 0, 1, true, gptq.compare_local_hessian ? 1 : 0,
               "1: also quantize with local_hessian and report tr(E H E^T) of both results "
               "(about a quarter more GPU time; codes unchanged).");
  AddParameter(m, "block_columns", 16, 8192, true, gptq.block_columns,
               "Lazy-batch width in columns; must be a multiple of 16.");
  AddChoice(m, "scale_objective",
            {std::string(GptqScaleObjectiveName(GptqScaleObjective::kHessianBlock)),
             std::string(GptqScaleObjectiveName(GptqScaleObjective::kGptqCost))},
            std::string(GptqScaleObjectiveName(gptq.scale_objective)),
            "How a group's FP8 scale is chosen: e^T H_j e of its 16x16 block, or the exact "
            "GPTQ cost of the group.");
  AddChoice(m, "scale_search",
            {std::string(GptqScaleSearchName(GptqScaleSearch::kSweep)),
             std::string(GptqScaleSearchName(GptqScaleSearch::kDss))},
            std::string(GptqScaleSearchName(gptq.scale_search)),
            "Scale candidates per group: the 126-scale sweep, or the sweep then the dss search "
            "(beta_step, beta_half_range, scale_neighbours).");
}

// WatchJob refused before it started (authentication, malformed request): finishes at once,
// deletes itself.
class RefusedWatch : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  RefusedWatch(ServerMetrics* metrics, const absl::Status& status, absl::Time start) {
    const grpc::Status result = ToGrpcStatus(status);
    metrics->RecordRequest("WatchJob", result.error_code(), absl::Now() - start);
    Finish(result);
  }
  void OnDone() override { delete this; }
};

}  // namespace

CalibratorService::CalibratorService(const ServerOptions& options, Scheduler* scheduler,
                                     JobManager* jobs, ServerMetrics* metrics,
                                     FullHessianBudget* full_hessians, std::string backend,
                                     std::vector<WorkerDevice> devices,
                                     const TokenAuthenticator* authenticator)
    : options_(options),
      jobs_(jobs),
      authenticator_(authenticator),
      metrics_(metrics),
      backend_(std::move(backend)),
      devices_(std::move(devices)) {
  environment_.scheduler = scheduler;
  environment_.metrics = metrics;
  environment_.limits = options.limits;
  environment_.draining = &draining_;
  environment_.open_streams = &open_streams_;
  environment_.authenticator = authenticator;
  environment_.full_hessians = full_hessians;
  if (options.limits.stream_idle_timeout > absl::ZeroDuration()) {
    watchdog_ = std::make_unique<StreamWatchdog>(options.limits.stream_idle_timeout);
    environment_.watchdog = watchdog_.get();
  }
  environment_.memory_budget_bytes = options.devices.memory_budget_bytes;
}

absl::StatusOr<Caller> CalibratorService::Authenticate(
    const grpc::CallbackServerContext* context) const {
  if (authenticator_ == nullptr) return Caller{};
  return authenticator_->Identify(context->client_metadata());
}

CalibratorService::~CalibratorService() = default;

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* CalibratorService::Quantize(
    grpc::CallbackServerContext* context) {
  return new QuantizeSession(environment_, context);
}

grpc::ServerUnaryReactor* CalibratorService::FinishUnary(grpc::CallbackServerContext* context,
                                                         const char* method, absl::Time start,
                                                         const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const grpc::Status result = ToGrpcStatus(status);
  // Counted before the client can see the status, so a scrape after the call includes it.
  metrics_->RecordRequest(method, result.error_code(), absl::Now() - start);
  reactor->Finish(result);
  return reactor;
}

absl::Status CalibratorService::ParseRequest(const grpc::CallbackServerContext* context,
                                             const char* method, const Raw* raw_request,
                                             google::protobuf::MessageLite* request) {
  grpc::ByteBuffer bytes(*raw_request);  // shares the slices
  absl::Status parsed = ParseProto(&bytes, absl::StrCat(method, " request"), request);
  if (!parsed.ok()) {
    metrics_->RecordMalformedMessage(method);
    LogLine(absl::StrCat(method, " from ", context->peer(), ": ", parsed.ToString()));
  }
  return parsed;
}

template <typename Request, typename Handler>
grpc::ServerUnaryReactor* CalibratorService::Unary(grpc::CallbackServerContext* context,
                                                   const char* method, const Raw* raw_request,
                                                   Raw* raw_response, Handler handle) {
  const absl::Time start = absl::Now();
  // Refused before anything of the request is looked at.
  absl::StatusOr<Caller> caller = Authenticate(context);
  absl::Status status = caller.status();
  Request request;
  if (status.ok()) status = ParseRequest(context, method, raw_request, &request);
  if (status.ok()) {
    auto response = handle(request, *caller);
    if (response.ok()) {
      *raw_response = SerializeProto(*response);
    } else {
      status = response.status();
    }
  }
  return FinishUnary(context, method, start, status);
}

grpc::ServerUnaryReactor* CalibratorService::SubmitJob(grpc::CallbackServerContext* context,
                                                       const Raw* request, Raw* response) {
  return Unary<v1::SubmitJobRequest>(
      context, "SubmitJob", request, response,
      [this](const v1::SubmitJobRequest& r, const Caller& caller) -> absl::StatusOr<v1::Job> {
        if (draining_) {
          return absl::UnavailableError("server is draining; no new jobs are accepted");
        }
        return jobs_->Submit(r, caller);
      });
}

grpc::ServerUnaryReactor* CalibratorService::GetJob(grpc::CallbackServerContext* context,
                                                    const Raw* request, Raw* response) {
  return Unary<v1::GetJobRequest>(context, "GetJob", request, response,
                                  [this](const v1::GetJobRequest& r, const Caller& caller) {
                                    return jobs_->Get(r.job_id(), r.include_result(), caller);
                                  });
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* CalibratorService::WatchJob(
    grpc::CallbackServerContext* context, const Raw* raw_request) {
  const absl::Time start = absl::Now();
  absl::StatusOr<Caller> caller = Authenticate(context);
  absl::Status status = caller.status();
  v1::WatchJobRequest request;
  if (status.ok()) status = ParseRequest(context, "WatchJob", raw_request, &request);
  if (!status.ok()) return new RefusedWatch(metrics_, status, start);
  return JobWatchReactor::Start(jobs_, metrics_, request.job_id(), *caller);
}

grpc::ServerUnaryReactor* CalibratorService::CancelJob(grpc::CallbackServerContext* context,
                                                       const Raw* request, Raw* response) {
  return Unary<v1::CancelJobRequest>(context, "CancelJob", request, response,
                                     [this](const v1::CancelJobRequest& r, const Caller& caller) {
                                       return jobs_->Cancel(r.job_id(), caller);
                                     });
}

grpc::ServerUnaryReactor* CalibratorService::ListJobs(grpc::CallbackServerContext* context,
                                                      const Raw* request, Raw* response) {
  return Unary<v1::ListJobsRequest>(context, "ListJobs", request, response,
                                    [this](const v1::ListJobsRequest& r, const Caller& caller) {
                                      return jobs_->List(r, caller);
                                    });
}

grpc::ServerUnaryReactor* CalibratorService::GetServerInfo(grpc::CallbackServerContext* context,
                                                           const Raw* request, Raw* response) {
  return Unary<v1::GetServerInfoRequest>(
      context, "GetServerInfo", request, response,
      [this](const v1::GetServerInfoRequest&, const Caller&) -> absl::StatusOr<v1::ServerInfo> {
        return Info();
      });
}

v1::ServerInfo CalibratorService::Info() const {
  v1::ServerInfo info;
  info.set_version(kServerVersion);
  info.set_backend(backend_);
  const SearchParams defaults;
  for (Method method :
       {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss, Method::kGptq}) {
    v1::MethodInfo* m = info.add_methods();
    m->set_name(std::string(MethodName(method)));
    m->set_needs_hessian(MethodNeedsHessian(method));
    if (method != Method::kGptq) m->add_hessian_layouts(v1::HESSIAN_LAYOUT_BLOCK_DIAGONAL);
    m->add_hessian_layouts(v1::HESSIAN_LAYOUT_FULL);
    m->add_hessian_layouts(v1::HESSIAN_LAYOUT_FULL_UPPER);
    if (method == Method::kGptq) AddGptqParameters(defaults, m);
    if (method == Method::kDss || method == Method::kGptq) {
      AddParameter(m, "beta_step", 0.005, 0.5, true, defaults.beta_step,
                   "Spacing of the beta grid; betas are 1 + i * beta_step.");
      AddParameter(m, "beta_half_range", 0.0, 1.0, false, defaults.beta_half_range,
                   "Betas span 1 +- beta_half_range; the smallest beta must stay > 0.");
      AddParameter(m, "scale_neighbours", 0, 125, true, defaults.scale_neighbours,
                   "FP8 neighbours tried on each side of the sweep optimum.");
    }
    AddParameter(m, "symmetry_tolerance", 0.0, 3.4e38, true, defaults.symmetry_tolerance,
                 "Hessian blocks must satisfy |H_ab - H_ba| <= tolerance * max diagonal.");
  }
  for (size_t w = 0; w < devices_.size(); ++w) {
    v1::DeviceInfo* device = info.add_devices();
    device->set_index(static_cast<int32_t>(w));
    device->set_kind(devices_[w].kind);
    device->set_name(devices_[w].name);
    device->set_memory_budget_bytes(devices_[w].memory_budget_bytes);
  }
  const ServiceLimits& limits = options_.limits;
  v1::Limits* out = info.mutable_limits();
  out->set_max_receive_message_bytes(limits.max_receive_message_bytes);
  out->set_max_send_message_bytes(limits.max_send_message_bytes);
  out->set_max_tensor_elements(limits.max_tensor_elements);
  out->set_max_buffered_tensor_bytes(limits.max_buffered_tensor_bytes);
  out->set_max_session_hessian_bytes(limits.max_session_hessian_bytes);
  out->set_max_inflight_chunks_per_stream(limits.max_inflight_chunks_per_stream);
  out->set_max_queued_items(options_.devices.max_queued_items);
  out->set_max_concurrent_streams(limits.max_concurrent_streams);
  out->set_max_rows_per_item(limits.max_rows_per_item);
  out->set_max_job_request_bytes(limits.max_job_request_bytes);
  out->set_max_jobs(limits.max_jobs);
  out->set_job_retention_ms(absl::ToInt64Milliseconds(limits.job_retention));
  out->set_max_full_hessian_bytes(limits.max_full_hessian_bytes);
  out->set_max_session_full_hessian_bytes(limits.max_session_full_hessian_bytes);
  out->set_max_unsent_result_bytes_per_stream(limits.max_unsent_result_bytes_per_stream);
  out->set_max_session_tensor_name_bytes(limits.max_session_tensor_name_bytes);
  out->set_max_name_bytes(kMaxNameBytes);
  out->set_stream_idle_timeout_ms(absl::ToInt64Milliseconds(limits.stream_idle_timeout));
  out->set_max_result_chunk_bytes(limits.ResultPayloadBytes());
  return info;
}

}  // namespace nvfp4cal::server
