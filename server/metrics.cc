#include "server/metrics.h"

#include <exception>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"

namespace nvfp4cal::server {
namespace {

// Seconds, from 100 us to ~2 min: covers a small chunk on a GPU up to a large tensor on CPU.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 120};
}

// Gauges read from the driver at scrape time, so they are current without a sampler thread.
class DeviceMemoryCollector final : public prometheus::Collectable {
 public:
  DeviceMemoryCollector(std::vector<int> devices, ServerMetrics::DeviceMemoryReader read)
      : devices_(std::move(devices)), read_(std::move(read)) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    prometheus::MetricFamily used{
        "nvfp4cal_device_memory_used_bytes",
        "Memory in use on the GPU as the driver reports it (all processes; cudaMemGetInfo)",
        prometheus::MetricType::Gauge,
        {}};
    prometheus::MetricFamily total{"nvfp4cal_device_memory_total_bytes",
                                   "Memory of the GPU as the driver reports it",
                                   prometheus::MetricType::Gauge,
                                   {}};
    for (int device : devices_) {
      int64_t free_bytes = 0;
      int64_t total_bytes = 0;
      if (!read_(device, &free_bytes, &total_bytes).ok()) continue;
      prometheus::ClientMetric u;
      u.label = {{"device", std::to_string(device)}};
      u.gauge.value = static_cast<double>(total_bytes - free_bytes);
      used.metric.push_back(u);
      prometheus::ClientMetric t;
      t.label = u.label;
      t.gauge.value = static_cast<double>(total_bytes);
      total.metric.push_back(t);
    }
    return {used, total};
  }

 private:
  std::vector<int> devices_;
  ServerMetrics::DeviceMemoryReader read_;
};

}  // namespace

std::string StatusCodeName(int code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  if (code < 0 || code > 16) return absl::StrCat("CODE_", code);
  return kNames[code];
}

ServerMetrics::ServerMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
  requests_ = &prometheus::BuildCounter()
                   .Name("nvfp4cal_requests_total")
                   .Help("Finished RPCs by method and gRPC status code")
                   .Register(*registry_);
  rpc_seconds_ = &prometheus::BuildHistogram()
                      .Name("nvfp4cal_rpc_duration_seconds")
                      .Help("RPC duration from start to final status, by method")
                      .Register(*registry_);
  bytes_in_ = &prometheus::BuildCounter()
                   .Name("nvfp4cal_bytes_in_total")
                   .Help("Payload bytes received (weights and Hessians)")
                   .Register(*registry_)
                   .Add({});
  bytes_out_ = &prometheus::BuildCounter()
                    .Name("nvfp4cal_bytes_out_total")
                    .Help("Payload bytes sent (codes and scales)")
                    .Register(*registry_)
                    .Add({});
  blocks_ = &prometheus::BuildCounter()
                 .Name("nvfp4cal_blocks_quantized_total")
                 .Help("16-element blocks quantized")
                 .Register(*registry_)
                 .Add({});
  queue_depth_ = &prometheus::BuildGauge()
                      .Name("nvfp4cal_queue_depth")
                      .Help("Scheduler work items waiting")
                      .Register(*registry_)
                      .Add({});
  inflight_streams_ = &prometheus::BuildGauge()
                           .Name("nvfp4cal_inflight_streams")
                           .Help("Open Quantize streams")
                           .Register(*registry_)
                           .Add({});
  inflight_jobs_ = &prometheus::BuildGauge()
                        .Name("nvfp4cal_inflight_jobs")
                        .Help("Async jobs not yet finished")
                        .Register(*registry_)
                        .Add({});
  jobs_finished_ = &prometheus::BuildCounter()
                        .Name("nvfp4cal_jobs_finished_total")
                        .Help("Async jobs that reached a final state, by state")
                        .Register(*registry_);
  device_memory_ = &prometheus::BuildGauge()
                        .Name("nvfp4cal_device_memory_in_use_bytes")
                        .Help("Bytes held for queued and running batches")
                        .Register(*registry_)
                        .Add({});
  queue_wait_ = &prometheus::BuildHistogram()
                     .Name("nvfp4cal_queue_wait_seconds")
                     .Help("Time a work item waited in the scheduler")
                     .Register(*registry_)
                     .Add({}, LatencyBuckets());
  kernel_time_ = &prometheus::BuildHistogram()
                      .Name("nvfp4cal_kernel_seconds")
                      .Help("Duration of the batch that ran a work item")
                      .Register(*registry_)
                      .Add({}, LatencyBuckets());
  full_hessian_bytes_ = &prometheus::BuildGauge()
                             .Name("nvfp4cal_full_hessian_bytes")
                             .Help("Bytes of full Hessians (method gptq) held by sessions")
                             .Register(*registry_)
                             .Add({});
  gptq_plan_bytes_ = &prometheus::BuildGauge()
                          .Name("nvfp4cal_gptq_plan_bytes")
                          .Help("Bytes held by prepared gptq plans (factorised full Hessians)")
                          .Register(*registry_)
                          .Add({});
  gptq_plans_ =
      &prometheus::BuildCounter()
           .Name("nvfp4cal_gptq_plans_prepared_total")
           .Help("gptq plans prepared (full Hessian validated and factorised), by backend")
           .Register(*registry_);
  gptq_plan_failures_ = &prometheus::BuildCounter()
                             .Name("nvfp4cal_gptq_plan_failures_total")
                             .Help("gptq plan preparations that failed (invalid or indefinite H)")
                             .Register(*registry_)
                             .Add({});
  gptq_factor_seconds_ = &prometheus::BuildHistogram()
                              .Name("nvfp4cal_gptq_factor_seconds")
                              .Help("Wall time of preparing one gptq plan")
                              .Register(*registry_)
                              .Add({}, LatencyBuckets());
  full_hessian_refused_ = &prometheus::BuildCounter()
                               .Name("nvfp4cal_full_hessian_refused_total")
                               .Help("Full Hessians refused at admission, by the limit reached")
                               .Register(*registry_);
  unsent_result_bytes_ = &prometheus::BuildGauge()
                              .Name("nvfp4cal_unsent_result_bytes")
                              .Help("Codes and scales quantized but not yet taken by the client")
                              .Register(*registry_)
                              .Add({});
  stream_idle_timeouts_ = &prometheus::BuildCounter()
                               .Name("nvfp4cal_stream_idle_timeouts_total")
                               .Help("Quantize streams ended by --stream_idle_timeout")
                               .Register(*registry_)
                               .Add({});
  malformed_messages_ = &prometheus::BuildCounter()
                             .Name("nvfp4cal_malformed_messages_total")
                             .Help("Messages that were not valid protobuf, by RPC method")
                             .Register(*registry_);
}

ServerMetrics::~ServerMetrics() = default;

absl::Status ServerMetrics::Serve(const std::string& address) {
  if (exposer_ != nullptr) return absl::FailedPreconditionError("metrics endpoint already up");
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("metrics_address \"", address, "\": cannot listen: ", e.what()));
  }
  exposer_->RegisterCollectable(registry_);
  if (device_memory_collector_ != nullptr) exposer_->RegisterCollectable(device_memory_collector_);
  return absl::OkStatus();
}

int ServerMetrics::port() const {
  if (exposer_ == nullptr) return 0;
  const std::vector<int> ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

void ServerMetrics::RecordRequest(const std::string& method, int code, absl::Duration duration) {
  requests_->Add({{"method", method}, {"code", StatusCodeName(code)}}).Increment();
  rpc_seconds_->Add({{"method", method}}, LatencyBuckets())
      .Observe(absl::ToDoubleSeconds(duration));
}

void ServerMetrics::AddBytesIn(int64_t bytes) { bytes_in_->Increment(static_cast<double>(bytes)); }
void ServerMetrics::AddBytesOut(int64_t bytes) {
  bytes_out_->Increment(static_cast<double>(bytes));
}
void ServerMetrics::AddBlocksQuantized(int64_t blocks) {
  blocks_->Increment(static_cast<double>(blocks));
}
void ServerMetrics::SetQueueDepth(int64_t items) { queue_depth_->Set(static_cast<double>(items)); }
void ServerMetrics::AddInflightStreams(int64_t delta) {
  inflight_streams_->Increment(static_cast<double>(delta));
}
void ServerMetrics::AddInflightJobs(int64_t delta) {
  inflight_jobs_->Increment(static_cast<double>(delta));
}
void ServerMetrics::RecordJobFinished(const std::string& state) {
  jobs_finished_->Add({{"state", state}}).Increment();
}
void ServerMetrics::ExposeDeviceMemory(std::vector<int> devices, DeviceMemoryReader read) {
  if (devices.empty()) return;
  device_memory_collector_ =
      std::make_shared<DeviceMemoryCollector>(std::move(devices), std::move(read));
}

void ServerMetrics::AddDeviceMemoryInUse(int64_t delta_bytes) {
  device_memory_->Increment(static_cast<double>(delta_bytes));
}
void ServerMetrics::ObserveQueueWait(absl::Duration wait) {
  queue_wait_->Observe(absl::ToDoubleSeconds(wait));
}
void ServerMetrics::ObserveKernelTime(absl::Duration time) {
  kernel_time_->Observe(absl::ToDoubleSeconds(time));
}
void ServerMetrics::AddFullHessianBytes(int64_t delta_bytes) {
  full_hessian_bytes_->Increment(static_cast<double>(delta_bytes));
}
void ServerMetrics::AddGptqPlanBytes(int64_t delta_bytes) {
  gptq_plan_bytes_->Increment(static_cast<double>(delta_bytes));
}
void ServerMetrics::RecordGptqPlan(const std::string& backend, double seconds) {
  gptq_plans_->Add({{"backend", backend}}).Increment();
  gptq_factor_seconds_->Observe(seconds);
}
void ServerMetrics::RecordGptqPlanFailure() { gptq_plan_failures_->Increment(); }
void ServerMetrics::RecordFullHessianRefused(const std::string& limit) {
  full_hessian_refused_->Add({{"limit", limit}}).Increment();
}
void ServerMetrics::AddUnsentResultBytes(int64_t delta_bytes) {
  unsent_result_bytes_->Increment(static_cast<double>(delta_bytes));
}
void ServerMetrics::RecordStreamIdleTimeout() { stream_idle_timeouts_->Increment(); }
void ServerMetrics::RecordMalformedMessage(const std::string& method) {
  malformed_messages_->Add({{"method", method}}).Increment();
}

}  // namespace nvfp4cal::server
