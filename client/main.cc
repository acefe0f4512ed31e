// nvfp4cal: the command-line tool. Subcommands:
//
//   nvfp4cal quantize --model DIR --hessians FILE --out DIR [--method dss] [--server ADDR,...]
//   nvfp4cal inspect DIR
//   nvfp4cal example --out DIR
//   nvfp4cal dequantize --in DIR --out DIR
//
// The commands that write an --out share its rules (output_dir.h: --overwrite, --overwrite-any,
// never over an input) and first remove the temporary folders killed runs left beside it
// (temp_dir.h).
//
// Exit codes: 0 success, 1 the command failed (message on stderr), 2 bad command line.
// docs/cli.md describes every option, the formats and the error messages.
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "client/cli_args.h"
#include "client/client.h"
#include "client/example_model.h"
#include "client/inspect.h"
#include "client/local_quantizer.h"
#include "client/output_dir.h"
#include "client/progress.h"
#include "client/quantize_checkpoint.h"
#include "client/remote_quantizer.h"
#include "client/temp_dir.h"
#include "client/trace.h"
#include "common/file_util.h"
#include "common/freed_memory.h"

namespace nvfp4cal {
namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

std::atomic<bool> g_cancel{false};

extern "C" void OnStopSignal(int signal) {
  g_cancel.store(true);
  // A second signal ends the process at once.
  std::signal(signal, SIG_DFL);
}

int Fail(const std::string& command, const absl::Status& status) {
  std::cerr << "nvfp4cal " << command << ": error: " << status.message() << "\n";
  return kExitFailure;
}

int UsageError(const std::string& command, const absl::Status& status) {
  std::cerr << "nvfp4cal " << command << ": " << status.message() << "\n";
  return kExitUsage;
}

absl::Status Prefixed(const std::string& prefix, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

// An integer option in [min, max]; untouched when absent.
absl::Status ParseInt(const CliArgs& args, const std::string& name, int* out,
                      int min = std::numeric_limits<int>::min(),
                      int max = std::numeric_limits<int>::max()) {
  if (!args.Has(name)) return absl::OkStatus();
  const std::string& text = args.Get(name);
  int64_t value = 0;
  if (!absl::SimpleAtoi(text, &value)) {
    // Digits beyond 64 bits are an integer too, just out of range.
    const size_t sign = !text.empty() && (text[0] == '-' || text[0] == '+') ? 1 : 0;
    const bool digits =
        text.size() > sign && text.find_first_not_of("0123456789", sign) == std::string::npos;
    if (!digits) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, ": \"", text, "\" is not an integer"));
    }
  } else if (value >= min && value <= max) {
    *out = static_cast<int>(value);
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--", name, " = ", text, " is out of range [", min, ", ", max, "]"));
}

// A finite number option in [min, max]; untouched when absent.
absl::Status ParseFloat(const CliArgs& args, const std::string& name, float* out,
                        float min = std::numeric_limits<float>::lowest(),
                        float max = std::numeric_limits<float>::max()) {
  if (!args.Has(name)) return absl::OkStatus();
  float value = 0.0f;
  if (!absl::SimpleAtof(args.Get(name), &value) || !std::isfinite(value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": \"", args.Get(name), "\" is not a finite number"));
  }
  if (value < min || value > max) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " = ", value, " is out of range [", min, ", ", max, "]"));
  }
  *out = value;
  return absl::OkStatus();
}

// --overwrite and --overwrite-any, the same for every command that writes an --out.
void AddOverwriteSwitches(CliParser* parser) {
  parser->AddSwitch("overwrite",
                    "replace an existing --out that an nvfp4cal command wrote (it holds "
                    "hf_quant_config.json or nvfp4cal.json naming producer nvfp4cal) or an empty "
                    "folder");
  parser->AddSwitch("overwrite-any",
                    "replace an existing --out folder whatever it holds (never one that is or "
                    "contains an input of the run)");
}

OverwritePolicy OverwriteFrom(const CliArgs& args) {
  if (args.Switch("overwrite-any")) return OverwritePolicy::kAnything;
  if (args.Switch("overwrite")) return OverwritePolicy::kNvfp4calOutput;
  return OverwritePolicy::kNever;
}

// Removes the temporary folders that killed runs left beside --out (temp_dir.h), one line each
// on stderr; names those it leaves alone.
void CleanStaleTempDirs(const std::string& command, const std::string& out) {
  using Owner = TempDirCleanup::Owner;
  const std::string prefix = absl::StrCat("nvfp4cal ", command, ": ");
  const std::string by_hand =
      absl::StrCat("; remove it by hand when no nvfp4cal run writes ", out, "\n");
  for (const TempDirCleanup& c : CleanTempDirsBeside(out)) {
    const std::string process = absl::StrCat("process ", c.pid);
    switch (c.owner) {
      case Owner::kGone:
        if (c.removed.ok()) {
          std::cerr << prefix << "removed stale temporary folder " << c.path << " (its owner, "
                    << process << ", is gone)\n";
        } else {
          std::cerr << prefix << "note: cannot remove stale temporary folder " << c.path << ": "
                    << c.removed.message() << "\n";
        }
        break;
      case Owner::kRunning:
        std::cerr << prefix << "note: left " << c.path << ": its owner, " << process
                  << ", is still running\n";
        break;
      case Owner::kElsewhere:
        std::cerr << prefix << "note: left " << c.path << ": its owner, " << process
                  << ", ran on another machine, container or boot" << by_hand;
        break;
      case Owner::kOtherUser:
        std::cerr << prefix << "note: left " << c.path << ": it belongs to another user\n";
        break;
      case Owner::kUnknown:
        std::cerr << prefix << "note: left " << c.path << ": its owner cannot be told from the name"
                  << by_hand;
        break;
    }
  }
}

// An option's value, else the environment variable's, else "".
std::string OptionOrEnv(const CliArgs& args, const std::string& name, const char* env) {
  if (args.Has(name)) return args.Get(name);
  const char* value = std::getenv(env);
  return value == nullptr ? "" : value;
}

// TLS files and the bearer token of the remote options (flags first, then environment).
absl::Status ApplySecurityArgs(const CliArgs& args, ClientOptions* client) {
  client->tls_root_certs_path = OptionOrEnv(args, "tls-ca", "NVFP4CAL_TLS_CA");
  client->tls_client_cert_path = OptionOrEnv(args, "tls-cert", "NVFP4CAL_TLS_CERT");
  client->tls_client_key_path = OptionOrEnv(args, "tls-key", "NVFP4CAL_TLS_KEY");
  client->use_tls = args.Switch("tls") || !client->tls_root_certs_path.empty() ||
                    !client->tls_client_cert_path.empty() || !client->tls_client_key_path.empty();
  if (client->tls_client_cert_path.empty() != client->tls_client_key_path.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key must be given together");
  }
  const std::string token_file = OptionOrEnv(args, "token-file", "NVFP4CAL_TOKEN_FILE");
  if (!token_file.empty()) {
    absl::StatusOr<std::string> token = ReadBearerTokenFile(token_file);
    if (!token.ok()) return Prefixed("--token-file: ", token.status());
    client->bearer_token = *std::move(token);
  }
  return absl::OkStatus();
}

CliParser QuantizeParser() {
  CliParser p("quantize",
              "Quantizes every eligible Linear weight of a Hugging Face safetensors checkpoint to "
              "NVFP4\n(NUMERICS.md §5 / ModelOpt layout) and copies everything else. In-process "
              "by default;\nwith --server through nvfp4cal servers (byte-identical output).");
  p.AddOption("model", "DIR",
              "checkpoint folder: config.json + model.safetensors or shards "
              "with model.safetensors.index.json",
              true);
  p.AddOption("hessians", "FILE",
              "safetensors with fp32 <module>.hessian, [in, in] or "
              "[in/16, 16, 16] (needed by local_hessian and dss)");
  p.AddOption("out", "DIR",
              "output folder (written to a temporary folder beside it, renamed "
              "at the end)",
              true);
  p.AddOption("method", "NAME", "max | mse | local_hessian | dss | gptq", false, "dss");
  p.AddOption("beta-step", "X", "dss beta grid spacing, in [0.005, 0.5]", false, "0.05");
  p.AddOption("gptq-damping", "X",
              "gptq: added to diag(H) before factorising, relative to its mean, in [0, 10]; "
              "raised tenfold (with a warning) while H is not positive definite",
              false, "0.01");
  p.AddSwitch("gptq-act-order",
              "gptq: quantize 16-column groups in descending order of their Hessian diagonal");
  p.AddOption("gptq-block-columns", "N",
              "gptq: lazy-batch width in columns, a multiple of 16 in [16, 8192]", false, "128");
  p.AddOption("gptq-scale-objective", "NAME",
              "gptq: how a group's scale is chosen: hessian_block (e^T H_j e of the group's "
              "16x16 block) | gptq_cost (exact GPTQ cost of the group)",
              false, "hessian_block");
  p.AddOption("gptq-scale-search", "NAME",
              "gptq: sweep (126 FP8 scales) | dss (sweep, then the dss search with --beta-step)",
              false, "sweep");
  p.AddSwitch("gptq-compare",
              "gptq: also quantize each module with local_hessian and report the full-Hessian "
              "error tr(E H E^T) of both (what propagation bought); about a quarter more GPU "
              "time, same output");
  p.AddOption("gptq-hessian-layout", "NAME",
              "gptq with --server: how full Hessians travel: upper (the upper triangle, half "
              "the bytes) | full (the whole matrix)",
              false, "upper");
  p.AddOption("activations", "auto|none|nvfp4",
              "nvfp4: W4A4 output (label NVFP4, an input_scale per module; every module's "
              "<input>.input_amax must be in the Hessians file); none: weights only (label "
              "W4A16_NVFP4, no input_scale); auto: nvfp4 when every module has its amax, none "
              "when none has (with a note), an error naming the others when only some have",
              false, "auto");
  p.AddOption("kv-cache", "none|fp8",
              "fp8: FP8 KV-cache scales as ModelOpt exports them (k_proj.k_scale, v_proj.v_scale "
              "= output amax / 448 from <module>.output_amax in the Hessians file; label "
              "kv_cache_quant_algo FP8)",
              false, "none");
  p.AddOption("format", "modelopt|compressed-tensors",
              "checkpoint layout (the same codes and scales): modelopt (hf_quant_config.json; "
              "vLLM, TensorRT-LLM, SGLang) | compressed-tensors (nvfp4-pack-quantized, as "
              "llm-compressor writes it; vLLM)",
              false, "modelopt");
  p.AddOption("expert-hessian", "per-expert|shared",
              "3-D expert tensors <m>.weight [experts, out, in] are quantized expert by expert: "
              "per-expert: expert e uses the Hessian of module <m>.<e> (entry <m>.<e>.hessian or "
              "an alias); shared: every expert uses <m>'s",
              false, "per-expert");
  p.AddOption("fallback-method", "NAME",
              "max | mse for modules without a Hessian (otherwise "
              "such a module is an error)");
  p.AddRepeated("include", "GLOB", "quantize only modules matching (module or weight name)");
  p.AddRepeated("exclude", "GLOB", "do not quantize modules matching");
  p.AddSwitch("no-default-excludes",
              "drop the default excludes (lm_head, embeddings, routers, "
              "MoE gates, output layers, vision towers)");
  p.AddOption("device", "NAME", "in-process backend: auto | cpu | cuda", false, "auto");
  p.AddOption("threads", "N", "CPU backend threads, 0 = all", false, "0");
  p.AddOption("cuda-workers", "N",
              "in-process CUDA: tensors in flight on the GPU, in [1, 16], each with its own "
              "stream, workspace and pinned staging: one tensor's host copies and write overlap "
              "the others' kernels",
              false, "3");
  p.AddOption("server", "HOST:PORT[,...]",
              "quantize on nvfp4cal servers, tensors spread "
              "over all");
  p.AddOption("streams-per-server", "N",
              "Quantize streams (connections) to each server, in [1, 16]: a server works on "
              "several streams' tensors at once (each stream sends its own copy of a shared "
              "Hessian); streams a server refuses (max_concurrent_streams) leave their tensors "
              "to its other streams. Default 3, 1 with --method gptq (full Hessians)",
              false, "3");
  p.AddOption("chunk-kib", "N",
              "KiB of weights (or Hessian) per message to a server, in [1, 65536]; at most a "
              "quarter of the server's max_receive_message_bytes is used",
              false, "1024");
  p.AddOption("read-ahead-mib", "N",
              "MiB of tensors the run may hold read ahead of the quantizer, in [0, 1048576]; "
              "0 = automatic (8 x the largest fused group's weights, e.g. gate + up, or 3 x with "
              "its full Hessian for gptq); a tensor larger than it is read alone. Lower it to "
              "bound resident memory",
              false, "0");
  p.AddOption("keep-freed-memory-mib", "N",
              "MiB of freed memory the run keeps mapped for reuse, in [0, 2047]: buffers below "
              "64 MiB come from the heap and its free top returns to the kernel only beyond this, "
              "so that read copies, messages and results reuse pages instead of faulting in "
              "fresh ones (an 8B-shaped dss run in-process: 10% faster); 0 = the C library's "
              "defaults",
              false, "1024");
  p.AddOption("timeout", "SECONDS", "deadline of each server stream, 0 = none", false, "0");
  p.AddOption("retries", "N", "attempts per server when it is unavailable", false, "4");
  p.AddSwitch("tls", "connect to the servers with TLS (implied by --tls-ca/-cert/-key)");
  p.AddOption("tls-ca", "FILE",
              "PEM root certificates the servers are verified against (default: system roots; "
              "env NVFP4CAL_TLS_CA)");
  p.AddOption("tls-cert", "FILE", "PEM client certificate for mTLS (env NVFP4CAL_TLS_CERT)");
  p.AddOption("tls-key", "FILE", "PEM private key of --tls-cert (env NVFP4CAL_TLS_KEY)");
  p.AddOption("token-file", "FILE",
              "file whose first line is the bearer token sent to the servers (env "
              "NVFP4CAL_TOKEN_FILE)");
  AddOverwriteSwitches(&p);
  p.AddOption("stats-json", "FILE",
              "also write the statistics as JSON: per module method, objective before and "
              "after, blocks changed, amax; totals, label and timings (never inside an input "
              "or --out)");
  p.AddOption("trace", "FILE",
              "also write a timeline of the run's stages (open, read-ahead waits, reads, scans, "
              "each tensor from its scan to its result, writes, copies, fsyncs; with --server "
              "also each stream's waits and sends and each tensor's time at the server) as "
              "Chrome trace-event JSON, for https://ui.perfetto.dev; written when the run ends, "
              "also after a failure (never inside an input or --out)");
  p.AddSwitch("quiet", "no progress bar and no statistics table");
  return p;
}

int RunQuantize(int argc, const char* const* argv) {
  const std::string cmd = "quantize";
  const CliParser parser = QuantizeParser();
  absl::StatusOr<CliArgs> args = parser.Parse(argc, argv);
  if (!args.ok()) return UsageError(cmd, args.status());
  if (args->help()) {
    std::cout << parser.Help();
    return 0;
  }
  QuantizeOptions options;
  options.model_dir = args->Get("model");
  options.hessians_path = args->Get("hessians");
  options.out_dir = args->Get("out");
  options.overwrite = OverwriteFrom(*args);
  options.plan.includes = args->GetAll("include");
  options.plan.excludes = args->GetAll("exclude");
  options.plan.default_excludes = !args->Switch("no-default-excludes");
  options.cancel = &g_cancel;
  absl::StatusOr<Method> method = ParseMethod(args->Get("method", "dss"));
  if (!method.ok()) return UsageError(cmd, Prefixed("--", method.status()));
  options.params.method = *method;
  absl::StatusOr<ActivationMode> activations =
      ParseActivationMode(args->Get("activations", "auto"));
  if (!activations.ok()) return UsageError(cmd, activations.status());
  options.activations = *activations;
  absl::StatusOr<KvCacheMode> kv_cache = ParseKvCacheMode(args->Get("kv-cache", "none"));
  if (!kv_cache.ok()) return UsageError(cmd, kv_cache.status());
  options.kv_cache = *kv_cache;
  absl::StatusOr<ExpertHessian> expert_hessian =
      ParseExpertHessian(args->Get("expert-hessian", "per-expert"));
  if (!expert_hessian.ok()) return UsageError(cmd, expert_hessian.status());
  options.expert_hessian = *expert_hessian;
  absl::StatusOr<OutputFormat> format = ParseOutputFormat(args->Get("format", "modelopt"));
  if (!format.ok()) return UsageError(cmd, format.status());
  options.format = *format;
  if (args->Has("fallback-method")) {
    absl::StatusOr<Method> fallback = ParseMethod(args->Get("fallback-method"));
    if (!fallback.ok()) return UsageError(cmd, Prefixed("--fallback-", fallback.status()));
    options.fallback_method = *fallback;
  }
  int threads = 0;
  int cuda_workers = 3;
  int retries = 4;
  int streams_per_server = 3;
  int chunk_kib = 1024;
  int read_ahead_mib = 0;
  int keep_freed_mib = 1024;
  float timeout_s = 0.0f;
  for (const absl::Status& s :
       {ParseFloat(*args, "beta-step", &options.params.beta_step),
        ParseInt(*args, "threads", &threads, 0, 4096), ParseInt(*args, "retries", &retries, 1, 100),
        ParseInt(*args, "cuda-workers", &cuda_workers, 1, 16),
        ParseInt(*args, "streams-per-server", &streams_per_server, 1, 16),
        ParseInt(*args, "chunk-kib", &chunk_kib, 1, 65536),
        ParseInt(*args, "read-ahead-mib", &read_ahead_mib, 0, 1 << 20),
        ParseInt(*args, "keep-freed-memory-mib", &keep_freed_mib, 0,
                 static_cast<int>(kMaxKeptFreedBytes >> 20)),
        ParseFloat(*args, "timeout", &timeout_s, 0.0f, 1e7f)}) {
    if (!s.ok()) return UsageError(cmd, s);
  }
  // Advice to the C library: without it the run's defaults stay, which is only slower.
  if (keep_freed_mib > 0) (void)KeepFreedMemoryForReuse(int64_t{keep_freed_mib} << 20);
  options.read_ahead_bytes = int64_t{read_ahead_mib} << 20;
  const bool gptq = options.params.method == Method::kGptq;
  for (const char* name :
       {"gptq-damping", "gptq-act-order", "gptq-block-columns", "gptq-scale-objective",
        "gptq-scale-search", "gptq-compare", "gptq-hessian-layout"}) {
    if (args->Has(name) && !gptq) {
      return UsageError(cmd, absl::InvalidArgumentError(
                                 absl::StrCat("--", name, " applies to --method gptq only")));
    }
  }
  for (const char* name : {"streams-per-server", "chunk-kib"}) {
    if (args->Has(name) && !args->Has("server")) {
      return UsageError(
          cmd, absl::InvalidArgumentError(absl::StrCat("--", name, " applies with --server only")));
    }
  }
  if (args->Has("gptq-hessian-layout") && !args->Has("server")) {
    return UsageError(cmd, absl::InvalidArgumentError(
                               "--gptq-hessian-layout applies with --server only (how full "
                               "Hessians are sent to the servers)"));
  }
  const std::string hessian_layout = args->Get("gptq-hessian-layout", "upper");
  if (hessian_layout != "upper" && hessian_layout != "full") {
    return UsageError(cmd, absl::InvalidArgumentError(
                               absl::StrCat("--gptq-hessian-layout: unknown value \"",
                                            hessian_layout, "\"; expected one of upper, full")));
  }
  for (const absl::Status& s :
       {ParseFloat(*args, "gptq-damping", &options.params.gptq.damping),
        ParseInt(*args, "gptq-block-columns", &options.params.gptq.block_columns)}) {
    if (!s.ok()) return UsageError(cmd, s);
  }
  options.params.gptq.act_order = args->Switch("gptq-act-order");
  options.params.gptq.compare_local_hessian = args->Switch("gptq-compare");
  if (args->Has("gptq-scale-objective")) {
    absl::StatusOr<GptqScaleObjective> o =
        ParseGptqScaleObjective(args->Get("gptq-scale-objective"));
    if (!o.ok()) return UsageError(cmd, Prefixed("--", o.status()));
    options.params.gptq.scale_objective = *o;
  }
  if (args->Has("gptq-scale-search")) {
    absl::StatusOr<GptqScaleSearch> s = ParseGptqScaleSearch(args->Get("gptq-scale-search"));
    if (!s.ok()) return UsageError(cmd, Prefixed("--", s.status()));
    options.params.gptq.scale_search = *s;
  }
  absl::Status params_ok = ValidateParams(options.params);
  if (!params_ok.ok()) {
    const std::string message(params_ok.message());
    const std::string flag = message.find("gptq.damping") != std::string::npos ? "--gptq-damping"
                             : message.find("gptq.block_columns") != std::string::npos
                                 ? "--gptq-block-columns"
                                 : "--beta-step";
    return UsageError(cmd, Prefixed(flag + ": ", params_ok));
  }

  const bool quiet = args->Switch("quiet");
  ProgressReporter progress(stderr, !quiet && isatty(STDERR_FILENO) != 0);
  // The timeline begins before the backend starts (a CUDA context takes a moment).
  const std::string trace_path = args->Get("trace", "");
  std::optional<Trace> trace;
  if (!trace_path.empty()) options.trace = &trace.emplace();
  std::unique_ptr<Quantizer> quantizer;
  if (args->Has("server")) {
    if (args->Get("device", "auto") != "auto") {
      return UsageError(cmd, absl::InvalidArgumentError(
                                 "--device applies in-process only; servers pick their device"));
    }
    if (args->Has("cuda-workers")) {
      return UsageError(cmd, absl::InvalidArgumentError(
                                 "--cuda-workers applies in-process only; servers set their own "
                                 "(--cuda_workers_per_device)"));
    }
    absl::StatusOr<std::vector<std::string>> addresses = ParseServerList(args->Get("server"));
    if (!addresses.ok()) return UsageError(cmd, addresses.status());
    ClientOptions client;
    // gptq sends full Hessians, which each stream would hold on the server beside the others'
    // (its max_full_hessian_bytes): one stream per server unless asked for more.
    if (gptq && !args->Has("streams-per-server")) streams_per_server = 1;
    // Each address once per stream, interleaved (a, b, a, b): every entry is a connection.
    for (int k = 0; k < streams_per_server; ++k) {
      client.addresses.insert(client.addresses.end(), addresses->begin(), addresses->end());
    }
    client.max_attempts = retries;
    client.chunk_bytes = int64_t{chunk_kib} << 10;
    client.timeout = absl::Seconds(static_cast<double>(timeout_s));
    client.send_full_hessian_upper = hessian_layout == "upper";
    client.on_note = [&progress](const std::string& line) { progress.OnMessage(line); };
    client.trace = options.trace;
    if (absl::Status s = ApplySecurityArgs(*args, &client); !s.ok()) return UsageError(cmd, s);
    options.other_inputs = {
        {"--tls-ca", client.tls_root_certs_path},
        {"--tls-cert", client.tls_client_cert_path},
        {"--tls-key", client.tls_client_key_path},
        {"--token-file", OptionOrEnv(*args, "token-file", "NVFP4CAL_TOKEN_FILE")}};
    absl::StatusOr<std::unique_ptr<Quantizer>> remote = MakeRemoteQuantizer(client);
    if (!remote.ok()) return UsageError(cmd, remote.status());
    quantizer = *std::move(remote);
  } else {
    LocalQuantizerOptions local;
    local.device = args->Get("device", "auto");
    local.cpu_threads = threads;
    local.cuda_workers = cuda_workers;
    local.trace = options.trace;
    // Starts beside the reading and planning; a failed start fails the run (nothing written).
    absl::StatusOr<std::unique_ptr<Quantizer>> in_process = StartLocalQuantizer(local);
    if (!in_process.ok()) return UsageError(cmd, in_process.status());
    quantizer = *std::move(in_process);
  }

  std::signal(SIGINT, OnStopSignal);
  std::signal(SIGTERM, OnStopSignal);
  const std::string stats_json = args->Get("stats-json", "");
  std::vector<RunInput> inputs = {{"--model", options.model_dir},
                                  {"--hessians", options.hessians_path},
                                  {"--out", options.out_dir}};
  inputs.insert(inputs.end(), options.other_inputs.begin(), options.other_inputs.end());
  for (const auto& [flag, path] :
       {std::pair<std::string, std::string>{"--stats-json", stats_json}, {"--trace", trace_path}}) {
    if (path.empty()) continue;
    if (absl::Status s = CheckOutputFile(flag, path, inputs); !s.ok()) return UsageError(cmd, s);
  }
  if (!stats_json.empty() && !trace_path.empty() &&
      std::filesystem::absolute(stats_json).lexically_normal() ==
          std::filesystem::absolute(trace_path).lexically_normal()) {
    return UsageError(
        cmd, absl::InvalidArgumentError(absl::StrCat("--stats-json and --trace name the same file ",
                                                     trace_path, "; give each its own")));
  }
  CleanStaleTempDirs(cmd, options.out_dir);
  absl::StatusOr<QuantizeReport> report = QuantizeCheckpoint(options, quantizer.get(), &progress);
  progress.Finish();
  if (trace.has_value()) {
    absl::Status s = ReplaceTextFile(trace_path, trace->Json());
    if (!s.ok() && report.ok()) return Fail(cmd, s);
    if (!s.ok()) std::cerr << "nvfp4cal quantize: --trace: " << s.message() << "\n";
  }
  if (!report.ok()) return Fail(cmd, report.status());
  if (!stats_json.empty()) {
    if (absl::Status s = ReplaceTextFile(stats_json, FormatStatsJson(*report)); !s.ok()) {
      return Fail(cmd, s);
    }
  }
  if (!quiet) {
    std::cout << "quantized " << report->modules.size() << " modules (" << report->quant_algo
              << (report->kv_cache_scales > 0
                      ? absl::StrCat(", FP8 KV cache: ", report->kv_cache_scales, " scales")
                      : "")
              << ") with " << report->quantizer << " (" << FormatBytes(report->bytes_in) << " -> "
              << FormatBytes(report->bytes_out) << "), not quantized: " << report->skipped.size()
              << "\n\n"
              << FormatStatsTable(*report);
    const double total = report->total_seconds;
    std::cout << absl::StrFormat(
        "time: read %.2f s, scan %.2f s and copy %.2f s (beside quantize), quantize %.2f s, write "
        "%.2f s; total %.2f s, %.0f MB/s of input; peak RSS %.0f MB\n",
        report->read_seconds, report->scan_seconds, report->copy_seconds, report->quantize_seconds,
        report->write_seconds, total,
        total > 0 ? static_cast<double>(report->bytes_in) / total / 1e6 : 0.0,
        static_cast<double>(report->peak_rss_bytes) / 1e6);
    if (report->hessian_read_seconds > 0.0) {
      std::cout << absl::StrFormat(
          "Hessians: read and checked in %.2f s (within read and scan, summed over reads)\n",
          report->hessian_read_seconds);
    }
    if (report->server_kernel_seconds > 0.0 || report->server_queue_seconds > 0.0) {
      std::cout << absl::StrFormat(
          "server time (summed over tensors): kernels %.2f s, queued %.2f s; the rest of "
          "quantize is transport, protobuf and validation\n",
          report->server_kernel_seconds, report->server_queue_seconds);
    }
  }
  std::cout << "wrote " << options.out_dir << "\n";
  return 0;
}

int RunInspect(int argc, const char* const* argv) {
  CliParser parser("inspect",
                   "Summarises a checkpoint made by any tool: shards, tensors and sizes by dtype, "
                   "its labels, NVFP4 modules, input_scale and KV-cache scale coverage, and a "
                   "warning for every label that promises more or less than the tensors hold.");
  parser.SetPositional("DIR", 1);
  parser.AddSwitch("json", "print the summary as one JSON object");
  parser.AddOption("against", "DIR",
                   "another checkpoint: per NVFP4 module, how many block scales and codes differ "
                   "(e.g. before and after finetune-scales)");
  absl::StatusOr<CliArgs> args = parser.Parse(argc, argv);
  if (!args.ok()) return UsageError("inspect", args.status());
  if (args->help()) {
    std::cout << parser.Help();
    return 0;
  }
  absl::StatusOr<std::string> summary = InspectCheckpoint(
      args->positional()[0], args->Switch("json") ? InspectFormat::kJson : InspectFormat::kText,
      args->Get("against", ""));
  if (!summary.ok()) return Fail("inspect", summary.status());
  std::cout << *summary;
  return 0;
}

int RunExample(int argc, const char* const* argv) {
  CliParser parser("example",
                   "Writes a small Llama-shaped checkpoint with matching Hessians "
                   "(hessians.safetensors inside it).");
  const ExampleModelOptions defaults;
  parser.AddOption("out", "DIR", "folder to create", true);
  parser.AddOption("layers", "N", "decoder layers", false, std::to_string(defaults.layers));
  parser.AddOption("hidden", "N", "hidden size", false, std::to_string(defaults.hidden));
  parser.AddOption("intermediate", "N", "MLP size", false, std::to_string(defaults.intermediate));
  parser.AddOption("heads", "N", "attention heads", false, std::to_string(defaults.heads));
  parser.AddOption("kv-heads", "N",
                   "key/value heads (k_proj and v_proj have kv-heads x head size rows)", false,
                   std::to_string(defaults.kv_heads));
  parser.AddOption("vocab", "N", "vocabulary size (embeddings and lm_head rows)", false,
                   std::to_string(defaults.vocab));
  parser.AddOption("shards", "N", "safetensors shards (> 1 writes an index)", false, "1");
  parser.AddOption("seed", "N", "random seed", false, "1");
  AddOverwriteSwitches(&parser);
  parser.AddSwitch("full-hessians",
                   "full [in, in] Hessians for every module (o_proj and down_proj too), so that "
                   "--method gptq can quantize all of them");
  absl::StatusOr<CliArgs> args = parser.Parse(argc, argv);
  if (!args.ok()) return UsageError("example", args.status());
  if (args->help()) {
    std::cout << parser.Help();
    return 0;
  }
  ExampleModelOptions options;
  int seed = 1;
  for (const absl::Status& s :
       {ParseInt(*args, "layers", &options.layers), ParseInt(*args, "hidden", &options.hidden),
        ParseInt(*args, "intermediate", &options.intermediate),
        ParseInt(*args, "heads", &options.heads), ParseInt(*args, "kv-heads", &options.kv_heads),
        ParseInt(*args, "vocab", &options.vocab), ParseInt(*args, "shards", &options.shards),
        ParseInt(*args, "seed", &seed)}) {
    if (!s.ok()) return UsageError("example", s);
  }
  options.seed = static_cast<uint64_t>(seed);
  options.overwrite = OverwriteFrom(*args);
  options.full_hessians = args->Switch("full-hessians");
  const std::string out = args->Get("out");
  CleanStaleTempDirs("example", out);
  absl::Status written = WriteExampleModel(out, options);
  if (!written.ok()) return Fail("example", written);
  std::cout << "wrote " << out << " (" << options.layers << " layers; Hessians in " << out
            << "/hessians.safetensors)\n";
  return 0;
}

int RunDequantize(int argc, const char* const* argv) {
  CliParser parser("dequantize",
                   "Writes a dense copy of an NVFP4 checkpoint "
                   "(w = e2m1(code) * weight_scale * weight_scale_2).");
  parser.AddOption("in", "DIR", "NVFP4 checkpoint folder", true);
  parser.AddOption("out", "DIR", "folder to create", true);
  parser.AddOption("dtype", "NAME", "bfloat16 | float32", false, "bfloat16");
  AddOverwriteSwitches(&parser);
  absl::StatusOr<CliArgs> args = parser.Parse(argc, argv);
  if (!args.ok()) return UsageError("dequantize", args.status());
  if (args->help()) {
    std::cout << parser.Help();
    return 0;
  }
  DequantizeOptions options;
  options.in_dir = args->Get("in");
  options.out_dir = args->Get("out");
  options.overwrite = OverwriteFrom(*args);
  const std::string dtype = args->Get("dtype", "bfloat16");
  if (dtype == "float32") {
    options.dtype = SafetensorsDType::kF32;
  } else if (dtype != "bfloat16") {
    return UsageError("dequantize",
                      absl::InvalidArgumentError(absl::StrCat(
                          "--dtype must be bfloat16 or float32, got \"", dtype, "\"")));
  }
  CleanStaleTempDirs("dequantize", options.out_dir);
  absl::Status done = DequantizeCheckpoint(options);
  if (!done.ok()) return Fail("dequantize", done);
  std::cout << "wrote " << options.out_dir << "\n";
  return 0;
}

constexpr char kUsage[] =
    "usage: nvfp4cal COMMAND [options]   (nvfp4cal COMMAND --help for its options)\n"
    "\n"
    "Calibrates LLM weights into NVIDIA's NVFP4 format.\n"
    "\n"
    "commands:\n"
    "  quantize     checkpoint + Hessians -> NVFP4 checkpoint (in-process or --server)\n"
    "  inspect      summary of a checkpoint (quantized layers, formats, sizes)\n"
    "  example      write a small Llama-shaped checkpoint with Hessians\n"
    "  dequantize   dense copy of an NVFP4 checkpoint\n"
    "\n"
    "quick start:\n"
    "  nvfp4cal example --out example\n"
    "  nvfp4cal quantize --model example --hessians example/hessians.safetensors "
    "--out example-nvfp4\n"
    "  nvfp4cal inspect example-nvfp4\n";

int Main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return kExitUsage;
  }
  const std::string command = argv[1];
  const char* const* rest = argv + 2;
  const int rest_count = argc - 2;
  if (command == "--help" || command == "-h" || command == "help") {
    if (command == "help" && argc > 2) {
      const char* help[] = {"--help"};
      const std::string sub = argv[2];
      if (sub == "quantize") return RunQuantize(1, help);
      if (sub == "inspect") return RunInspect(1, help);
      if (sub == "example") return RunExample(1, help);
      if (sub == "dequantize") return RunDequantize(1, help);
    }
    std::cout << kUsage;
    return 0;
  }
  if (command == "--version") {
    std::cout << "nvfp4cal " << NvFp4CalVersion() << "\n";
    return 0;
  }
  if (command == "quantize") return RunQuantize(rest_count, rest);
  if (command == "inspect") return RunInspect(rest_count, rest);
  if (command == "example") return RunExample(rest_count, rest);
  if (command == "dequantize") return RunDequantize(rest_count, rest);
  std::cerr << "nvfp4cal: unknown command '" << command << "'\n\n" << kUsage;
  return kExitUsage;
}

}  // namespace
}  // namespace nvfp4cal

int main(int argc, char** argv) { return nvfp4cal::Main(argc, argv); }
