#include "server/calibration_server.h"

#include <algorithm>
#include <chrono>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/file_util.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "nvfp4cal/kernels/cuda_scale_search.h"

namespace nvfp4cal::server {
namespace {

// Host part of host:port (IPv6 in brackets kept as is).
std::string HostOf(const std::string& address) {
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}

// Regular files only (common/file_util.h): a FIFO given for a certificate must not hang the
// start-up.
absl::StatusOr<std::string> ReadPemFile(const char* flag, const std::string& path) {
  absl::StatusOr<std::string> text = ReadTextFile(path);
  if (!text.ok()) {
    return absl::Status(text.status().code(),
                        absl::StrCat("--", flag, ": ", text.status().message()));
  }
  if (text->empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, " = '", path, "' is empty"));
  }
  return text;
}

absl::Status CheckSecurityOptions(const SecurityOptions& s) {
  if (s.tls_cert_path.empty() != s.tls_key_path.empty()) {
    return absl::InvalidArgumentError(
        "--tls_cert and --tls_key must be given together (TLS needs both)");
  }
  if (!s.tls_client_ca_path.empty() && !s.tls()) {
    return absl::InvalidArgumentError("--tls_client_ca needs TLS (--tls_cert and --tls_key)");
  }
  if (s.tls_require_client_cert && s.tls_client_ca_path.empty()) {
    return absl::InvalidArgumentError("--tls_require_client_cert needs --tls_client_ca");
  }
  return absl::OkStatus();
}

// Plaintext, or TLS with the configured certificate and optional client verification.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const SecurityOptions& s) {
  if (!s.tls()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions ssl;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  absl::StatusOr<std::string> cert = ReadPemFile("tls_cert", s.tls_cert_path);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPemFile("tls_key", s.tls_key_path);
  if (!key.ok()) return key.status();
  pair.cert_chain = *std::move(cert);
  pair.private_key = *std::move(key);
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!s.tls_client_ca_path.empty()) {
    absl::StatusOr<std::string> ca = ReadPemFile("tls_client_ca", s.tls_client_ca_path);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *std::move(ca);
    ssl.client_certificate_request =
        s.tls_require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                  : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

// Server reflection per builder: the gRPC port serves it, the plaintext health port must not
// (docs/security.md). Linking gRPC's reflection library registers its plugin for every
// builder of the process, so the option removes it where unwanted and adds it where missing.
class ReflectionOption : public grpc::ServerBuilderOption {
 public:
  explicit ReflectionOption(bool enabled) : enabled_(enabled) {}
  void UpdateArguments(grpc::ChannelArguments* /*args*/) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    const std::string name = grpc::reflection::ProtoServerReflectionPlugin().name();
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [&](const auto& plugin) { return plugin->name() == name; }),
                   plugins->end());
    if (enabled_)
      plugins->push_back(std::make_unique<grpc::reflection::ProtoServerReflectionPlugin>());
  }

 private:
  const bool enabled_;
};

// Every method of the health port other than grpc.health.v1's: UNIMPLEMENTED. Registering it
// also gives that server the callback completion queue its default health service runs on
// (a server with no method of its own refuses to start).
class HealthPortFallback : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    return new Refusal(context->method());
  }

 private:
  class Refusal : public grpc::ServerGenericBidiReactor {
   public:
    explicit Refusal(const std::string& method) {
      Finish(grpc::Status(
          grpc::StatusCode::UNIMPLEMENTED,
          absl::StrCat("the health port serves grpc.health.v1 only, not ", method.substr(0, 128))));
    }
    void OnDone() override { delete this; }
  };
};

}  // namespace

CalibrationServer::CalibrationServer(const ServerOptions& options)
    : options_(options), full_hessians_(options.limits.max_full_hessian_bytes, &metrics_) {}

CalibrationServer::~CalibrationServer() { Drain(); }

absl::Status CalibrationServer::Start() {
  if (absl::Status s = ValidateServerOptions(options_); !s.ok()) return s;
  const SecurityOptions& security = options_.security;
  if (absl::Status s = CheckSecurityOptions(security); !s.ok()) return s;
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      MakeServerCredentials(security);
  if (!credentials.ok()) return credentials.status();
  if (!security.auth_token_file.empty()) {
    authenticator_ = std::make_unique<TokenAuthenticator>();
    absl::Status loaded = authenticator_->LoadFile(security.auth_token_file);
    if (!loaded.ok()) {
      return absl::Status(loaded.code(), absl::StrCat("--auth_token_file: ", loaded.message()));
    }
  }
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
  jobs.full_hessians = &full_hessians_;
  jobs.memory_budget_bytes = options_.devices.memory_budget_bytes;
  jobs_ = std::make_unique<JobManager>(jobs, scheduler_.get(), &metrics_);
  service_ = std::make_unique<CalibratorService>(options_, scheduler_.get(), jobs_.get(), &metrics_,
                                                 &full_hessians_, backend_, devices->workers,
                                                 authenticator_.get());

  if (!options_.metrics_address.empty()) {
    std::vector<int> cuda_devices;  // each GPU once, however many workers it has
    for (const WorkerDevice& w : devices->workers) {
      if (w.cuda_device >= 0 && std::find(cuda_devices.begin(), cuda_devices.end(),
                                          w.cuda_device) == cuda_devices.end()) {
        cuda_devices.push_back(w.cuda_device);
      }
    }
    metrics_.ExposeDeviceMemory(std::move(cuda_devices), CudaDeviceMemory);
    if (absl::Status s = metrics_.Serve(options_.metrics_address); !s.ok()) return s;
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  builder.SetOption(std::make_unique<ReflectionOption>(/*enabled=*/true));
  int port = 0;
  const bool in_process_only = options_.address.empty();
  if (!in_process_only) builder.AddListeningPort(options_.address, *credentials, &port);
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
  if (server_ == nullptr || (port == 0 && !in_process_only)) {
    server_.reset();
    return absl::UnavailableError(
        absl::StrCat("--address = \"", options_.address, "\": cannot listen"));
  }
  if (!in_process_only) address_ = absl::StrCat(HostOf(options_.address), ":", port);
  if (!security.health_address.empty()) {
    // A second server with nothing but the default health service: probes reach it without
    // TLS or tokens, and it exposes no Calibrator method.
    grpc::ServerBuilder health_builder;
    health_builder.SetOption(std::make_unique<ReflectionOption>(/*enabled=*/false));
    health_fallback_ = std::make_unique<HealthPortFallback>();
    health_builder.RegisterCallbackGenericService(health_fallback_.get());
    int health_port = 0;
    health_builder.AddListeningPort(security.health_address, grpc::InsecureServerCredentials(),
                                    &health_port);
    health_server_ = health_builder.BuildAndStart();
    if (health_server_ == nullptr || health_port == 0) {
      health_server_.reset();
      server_->Shutdown();
      server_.reset();
      return absl::UnavailableError(
          absl::StrCat("--health_address = \"", security.health_address, "\": cannot listen"));
    }
    health_address_ = absl::StrCat(HostOf(security.health_address), ":", health_port);
  }
  SetServing(kReadinessService, false);  // starting
  SetServing(kLivenessService, true);
  SetServing(kReadinessService, true);
  return absl::OkStatus();
}

void CalibrationServer::SetServing(const char* service, bool serving) {
  server_->GetHealthCheckService()->SetServingStatus(service, serving);
  if (health_server_ != nullptr) {
    health_server_->GetHealthCheckService()->SetServingStatus(service, serving);
  }
}

std::string CalibrationServer::DescribeBatches() const {
  const SchedulerStats stats = scheduler_stats();
  if (stats.batches == 0) return "0 batches";
  const double batches = static_cast<double>(stats.batches);
  const double items = static_cast<double>(stats.batched_items);
  const double mib = static_cast<double>(stats.batched_item_bytes) / (1 << 20);
  return absl::StrFormat(
      "%d batches of %d work items (on average %.1f per batch, holding %.1f MiB)", stats.batches,
      stats.batched_items, items / batches, mib / batches);
}

std::shared_ptr<grpc::Channel> CalibrationServer::InProcessChannel() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  return server_->InProcessChannel(args);
}

absl::Status CalibrationServer::ReloadTokens() {
  if (authenticator_ == nullptr) {
    return absl::FailedPreconditionError("no --auth_token_file is configured");
  }
  return authenticator_->LoadFile(options_.security.auth_token_file);
}

void CalibrationServer::Drain() {
  absl::MutexLock lock(&drain_mu_);
  if (drained_) return;
  drained_ = true;
  if (server_ != nullptr) {
    // Draining first: a client that sees NOT_SERVING can rely on new work being refused.
    service_->StartDraining();
    SetServing(kReadinessService, false);
    const auto deadline =
        std::chrono::system_clock::now() +
        std::chrono::microseconds(absl::ToInt64Microseconds(options_.drain_timeout));
    // Open Quantize streams end on their own (their accepted tensors finish; a new tensor is
    // refused) while the transport is still up: gRPC's Shutdown closes a connection as soon as
    // its last call is done, which can reset it before the client has read that call's status.
    const absl::Time streams_deadline = absl::FromChrono(deadline);
    while (service_->open_streams() > 0 && absl::Now() < streams_deadline) {
      absl::SleepFor(absl::Milliseconds(5));
    }
    // Stops accepting calls, waits for in-flight ones until the deadline, then cancels them.
    server_->Shutdown(deadline);
    server_->Wait();
    if (health_server_ != nullptr) {
      health_server_->Shutdown(deadline);
      health_server_->Wait();
    }
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
  const SecurityOptions& sec = options_.security;
  // Only %s and %d: Abseil 20220623 has no %v (it formats the whole string as empty).
  return absl::StrFormat(
      "address = %s\nmetrics_address = %s\ndrain_timeout = %s\ndevice = %s (backend %s)\n"
      "device_selection = %s\n"
      "cpu_workers = %d\ncuda_workers_per_device = %d\ncpu_threads_per_worker = %d\n"
      "max_queued_items = %d\n"
      "memory_budget_bytes = %d\nmax_items_per_batch = %d\nmax_receive_message_bytes = %d\n"
      "max_send_message_bytes = %d\nmax_tensor_elements = %d\nmax_buffered_tensor_bytes = %d\n"
      "max_session_hessian_bytes = %d\nmax_full_hessian_bytes = %d\n"
      "max_session_full_hessian_bytes = %d\nmax_inflight_chunks_per_stream = %d\n"
      "max_concurrent_streams = %d\nmax_rows_per_item = %d\nmax_result_chunk_bytes = %d\n"
      "max_unsent_result_bytes_per_stream = %d\nmax_session_tensor_name_bytes = %d\n"
      "stream_idle_timeout = %s\nkeepalive_time_ms = %d\n"
      "keepalive_timeout_ms = %d\nkeepalive_min_client_ping_interval_ms = %d\n"
      "keepalive_permit_without_calls = %s\nmax_jobs = %d\nmax_job_request_bytes = %d\n"
      "job_retention = %s\ntls = %s\ntls_client_ca = %s\ntls_require_client_cert = %s\n"
      "auth_token_file = %s\nhealth_address = %s\nkeep_freed_memory_mib = %d\n",
      options_.address, options_.metrics_address.empty() ? "(disabled)" : options_.metrics_address,
      absl::FormatDuration(options_.drain_timeout), d.device, backend_,
      device_selection_.empty() ? "(not started)" : device_selection_, d.cpu_workers,
      d.cuda_workers_per_device, d.cpu_threads_per_worker, d.max_queued_items,
      d.memory_budget_bytes, d.max_items_per_batch, l.max_receive_message_bytes,
      l.max_send_message_bytes, l.max_tensor_elements, l.max_buffered_tensor_bytes,
      l.max_session_hessian_bytes, l.max_full_hessian_bytes, l.max_session_full_hessian_bytes,
      l.max_inflight_chunks_per_stream, l.max_concurrent_streams, l.max_rows_per_item,
      l.max_result_chunk_bytes, l.max_unsent_result_bytes_per_stream,
      l.max_session_tensor_name_bytes, absl::FormatDuration(l.stream_idle_timeout), k.time_ms,
      k.timeout_ms, k.min_client_ping_interval_ms, k.permit_without_calls ? "true" : "false",
      l.max_jobs, l.max_job_request_bytes, absl::FormatDuration(l.job_retention),
      sec.tls() ? absl::StrCat("on (cert ", sec.tls_cert_path, ")") : "off (plaintext)",
      sec.tls_client_ca_path.empty() ? "(none)" : sec.tls_client_ca_path,
      sec.tls_require_client_cert ? "true" : "false",
      sec.auth_token_file.empty() ? "(none: no token required)" : sec.auth_token_file,
      sec.health_address.empty() ? "(none)" : sec.health_address, options_.keep_freed_memory_mib);
}

}  // namespace nvfp4cal::server
