#include "server/calibrator_service.h"

#include <utility>

#include "nvfp4cal/kernels/scale_search.h"

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

}  // namespace

CalibratorService::CalibratorService(const ServerOptions& options, Scheduler* scheduler,
                                     ServerMetrics* metrics, std::string backend)
    : options_(options), metrics_(metrics), backend_(std::move(backend)) {
  environment_.scheduler = scheduler;
  environment_.metrics = metrics;
  environment_.limits = options.limits;
  environment_.draining = &draining_;
  environment_.open_streams = &open_streams_;
}

grpc::ServerBidiReactor<v1::QuantizeRequest, v1::QuantizeResponse>* CalibratorService::Quantize(
    grpc::CallbackServerContext* context) {
  return new QuantizeSession(environment_, context);
}

grpc::ServerUnaryReactor* CalibratorService::GetServerInfo(
    grpc::CallbackServerContext* context, const v1::GetServerInfoRequest* /*request*/,
    v1::ServerInfo* response) {
  const absl::Time start = absl::Now();
  *response = Info();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  metrics_->RecordRequest("GetServerInfo", grpc::StatusCode::OK, absl::Now() - start);
  return reactor;
}

v1::ServerInfo CalibratorService::Info() const {
  v1::ServerInfo info;
  info.set_version(kServerVersion);
  info.set_backend(backend_);
  const SearchParams defaults;
  for (Method method : {Method::kMax, Method::kMse, Method::kLocalHessian, Method::kDss}) {
    v1::MethodInfo* m = info.add_methods();
    m->set_name(std::string(MethodName(method)));
    m->set_needs_hessian(MethodNeedsHessian(method));
    m->add_hessian_layouts(v1::HESSIAN_LAYOUT_BLOCK_DIAGONAL);
    m->add_hessian_layouts(v1::HESSIAN_LAYOUT_FULL);
    if (method == Method::kDss) {
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
  const DeviceOptions& devices = options_.devices;
  for (int w = 0; w < std::max(1, devices.cpu_workers); ++w) {
    v1::DeviceInfo* device = info.add_devices();
    device->set_index(w);
    device->set_kind(backend_);
    device->set_name(backend_ == "cpu" ? "CPU worker" : backend_);
    device->set_memory_budget_bytes(devices.memory_budget_bytes);
  }
  const ServiceLimits& limits = options_.limits;
  v1::Limits* out = info.mutable_limits();
  out->set_max_receive_message_bytes(limits.max_receive_message_bytes);
  out->set_max_send_message_bytes(limits.max_send_message_bytes);
  out->set_max_tensor_elements(limits.max_tensor_elements);
  out->set_max_buffered_tensor_bytes(limits.max_buffered_tensor_bytes);
  out->set_max_session_hessian_bytes(limits.max_session_hessian_bytes);
  out->set_max_inflight_chunks_per_stream(limits.max_inflight_chunks_per_stream);
  out->set_max_queued_items(devices.max_queued_items);
  out->set_max_concurrent_streams(limits.max_concurrent_streams);
  out->set_max_rows_per_item(limits.max_rows_per_item);
  return info;
}

}  // namespace nvfp4cal::server
