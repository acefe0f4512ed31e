// ServerMetrics: the server's Prometheus metrics (prefix nvfp4cal_) and their HTTP endpoint.
//
// One object per server. The service records into it; an optional prometheus-cpp Exposer
// serves it on its own port at /metrics.
//
//   ServerMetrics metrics;
//   absl::Status s = metrics.Serve("0.0.0.0:9400");    // optional
//   metrics.RecordRequest("Quantize", grpc::StatusCode::OK, absl::Seconds(2));
#ifndef NVFP4CAL_SERVER_METRICS_H_
#define NVFP4CAL_SERVER_METRICS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace nvfp4cal::server {

class ServerMetrics {
 public:
  ServerMetrics();
  ~ServerMetrics();

  // Starts the HTTP endpoint on host:port (port 0 picks one). Call at most once.
  absl::Status Serve(const std::string& address);
  // Port the endpoint listens on; 0 when not serving.
  int port() const;

  // One finished RPC: counts it by method and canonical code name and times it.
  void RecordRequest(const std::string& method, int code, absl::Duration duration);
  // Payload bytes received (weights, Hessians) and sent (codes, scales).
  void AddBytesIn(int64_t bytes);
  void AddBytesOut(int64_t bytes);
  // 16-element blocks quantized.
  void AddBlocksQuantized(int64_t blocks);
  // Scheduler work items waiting.
  void SetQueueDepth(int64_t items);
  // Open Quantize streams and unfinished jobs.
  void AddInflightStreams(int64_t delta);
  void AddInflightJobs(int64_t delta);
  // An async job reached its final state ("SUCCEEDED", "FAILED", "CANCELLED").
  void RecordJobFinished(const std::string& state);
  // Bytes held for batches that run or wait on the devices (weights, outputs, Hessians).
  void AddDeviceMemoryInUse(int64_t delta_bytes);
  // How a device's memory is read at scrape time: bytes free and in total (the driver's view).
  using DeviceMemoryReader =
      std::function<absl::Status(int device, int64_t* free_bytes, int64_t* total_bytes)>;
  // Reports, at every scrape, the memory `read` says is in use on these devices
  // (nvfp4cal_device_memory_used_bytes / _total_bytes, label device). Call before Serve.
  void ExposeDeviceMemory(std::vector<int> devices, DeviceMemoryReader read);
  // Per work item: time queued and time of the batch that ran it.
  void ObserveQueueWait(absl::Duration wait);
  void ObserveKernelTime(absl::Duration time);
  // Bytes of full Hessians (method gptq) held by sessions, and of the gptq plans prepared
  // from them (host or device memory of the backend).
  void AddFullHessianBytes(int64_t delta_bytes);
  void AddGptqPlanBytes(int64_t delta_bytes);
  // A gptq plan was prepared (validation and factorisation of a full Hessian) on `backend`
  // ("cpu" or "cuda"), taking `seconds`; or its preparation failed (H invalid or not positive
  // definite even with the largest damping).
  void RecordGptqPlan(const std::string& backend, double seconds);
  void RecordGptqPlanFailure();
  // A full Hessian was refused because a full-Hessian limit was reached.
  void RecordFullHessianRefused(const std::string& limit);
  // Result bytes (codes and scales) quantized but not yet taken by their streams' clients.
  void AddUnsentResultBytes(int64_t delta_bytes);
  // A Quantize stream was ended by --stream_idle_timeout.
  void RecordStreamIdleTimeout();
  // A message of `method` was not valid protobuf (the call ended INVALID_ARGUMENT).
  void RecordMalformedMessage(const std::string& method);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::shared_ptr<prometheus::Collectable> device_memory_collector_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* rpc_seconds_;
  prometheus::Counter* bytes_in_;
  prometheus::Counter* bytes_out_;
  prometheus::Counter* blocks_;
  prometheus::Gauge* queue_depth_;
  prometheus::Gauge* inflight_streams_;
  prometheus::Gauge* inflight_jobs_;
  prometheus::Family<prometheus::Counter>* jobs_finished_;
  prometheus::Gauge* device_memory_;
  prometheus::Histogram* queue_wait_;
  prometheus::Histogram* kernel_time_;
  prometheus::Gauge* full_hessian_bytes_;
  prometheus::Gauge* gptq_plan_bytes_;
  prometheus::Family<prometheus::Counter>* gptq_plans_;
  prometheus::Counter* gptq_plan_failures_;
  prometheus::Histogram* gptq_factor_seconds_;
  prometheus::Family<prometheus::Counter>* full_hessian_refused_;
  prometheus::Gauge* unsent_result_bytes_;
  prometheus::Counter* stream_idle_timeouts_;
  prometheus::Family<prometheus::Counter>* malformed_messages_;
};

// Canonical gRPC code name ("OK", "INVALID_ARGUMENT", ...).
std::string StatusCodeName(int code);

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_METRICS_H_
