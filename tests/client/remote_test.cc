// Remote mode against real nvfp4cal-server processes on loopback ports: output folders are
// byte-identical to in-process with 1 and 3 servers (one of them with small message and
// Hessian limits, so chunking and session splitting run) and with 3 streams to a server that
// allows fewer, a dead address among live ones is
// routed around, an unreachable server fails after the retries naming it, and the Client
// library's async and single-tensor calls return the kernel library's bytes.
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/client.h"
#include "client/safetensors.h"
#include "client/trace.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "nvfp4cal/kernels/cpu_scale_search.h"
#include "nvfp4cal/kernels/example_data.h"
#include "tests/client/test_util.h"
#include "tests/server/http_get.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using ::nvfp4cal::testing::ProcessResult;
using ::nvfp4cal::testing::ReadTree;
using ::nvfp4cal::testing::RunCli;
using ::nvfp4cal::testing::ServerProcess;
using ::nvfp4cal::testing::TempFolder;
using ::testing::HasSubstr;

// A loopback port nobody listens on (bound, then released).
int DeadPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// The example model (2 shards) and dev-lm (when present) with their in-process outputs
// (`local-<model>`), made into `dir`.
void MakeInputs(const fs::path& dir) {
  ASSERT_EQ(RunCli({"example", "--out", dir / "example", "--shards", "2"}).exit_code, 0);
  std::vector<std::string> models = {"example"};
  const std::string source = NVFP4CAL_DEV_LM_DIR;
  if (fs::exists(source + "/model.safetensors")) {
    fs::create_directories(dir / "devlm");
    for (const char* f : {"config.json", "model.safetensors", "hessians.safetensors"}) {
      fs::copy_file(source + "/" + f, dir / (std::string("devlm/") + f));
    }
    models.push_back("devlm");
  }
  for (const std::string& m : models) {
    const ProcessResult r =
        RunCli({"quantize", "--model", dir / m, "--hessians", dir / (m + "/hessians.safetensors"),
                "--out", dir / ("local-" + m), "--quiet"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
}

// MakeInputs once per CLI build for every test process (ctest runs each test in its own): in a
// folder beside this binary, under a lock, named after the CLI binary's size and modification
// time, so a rebuilt CLI makes them again (and the older ones are removed).
fs::path SharedInputs() {
  const fs::path cli = NVFP4CAL_CLI_BINARY;
  const fs::path base = fs::read_symlink("/proc/self/exe").parent_path() / "remote_test_inputs";
  fs::create_directories(base);
  const auto mtime = fs::last_write_time(cli).time_since_epoch().count();
  const fs::path dir = base / absl::StrCat(fs::file_size(cli), "-", static_cast<uint64_t>(mtime));
  const int lock = open((base / "lock").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644);
  EXPECT_GE(lock, 0);
  EXPECT_EQ(flock(lock, LOCK_EX), 0);
  if (!fs::exists(dir / "complete")) {
    for (const auto& e : fs::directory_iterator(base)) {
      if (e.path().filename() != "lock") fs::remove_all(e.path());
    }
    fs::create_directories(dir);
    MakeInputs(dir);
    if (!::testing::Test::HasFatalFailure()) std::ofstream(dir / "complete") << "complete\n";
  }
  flock(lock, LOCK_UN);
  close(lock);
  return dir;
}

// Inputs and in-process outputs shared by the tests (SharedInputs); each test's own outputs in
// a temporary folder.
class Remote : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempFolder("remote");
    inputs_ = new fs::path(SharedInputs());
    ASSERT_FALSE(HasFatalFailure());
    models_ = {"example"};
    if (fs::exists(*inputs_ / "devlm")) models_.push_back("devlm");
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
    delete inputs_;
    inputs_ = nullptr;
  }

  static std::vector<std::string> Args(const std::string& model, const std::string& out,
                                       std::vector<std::string> extra) {
    std::vector<std::string> args = {"quantize",
                                     "--model",
                                     *inputs_ / model,
                                     "--hessians",
                                     *inputs_ / (model + "/hessians.safetensors"),
                                     "--out",
                                     *dir_ / out,
                                     "--quiet"};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }

  // Quantizes every model (only the example with example_only: tests of the transport's
  // routing, where dev-lm adds time and no coverage) through `servers` and compares with the
  // in-process output.
  static void ExpectIdentical(const std::string& servers, const std::string& tag,
                              const std::vector<std::string>& extra = {},
                              bool example_only = false) {
    for (const std::string& m : models_) {
      if (example_only && m != "example") continue;
      const std::string out = tag + "-" + m;
      std::vector<std::string> flags = {"--server", servers, "--retries", "3"};
      flags.insert(flags.end(), extra.begin(), extra.end());
      const ProcessResult r = RunCli(Args(m, out, flags));
      ASSERT_EQ(r.exit_code, 0) << r.err;
      const auto local = ReadTree(*inputs_ / ("local-" + m));
      const auto remote = ReadTree(*dir_ / out);
      ASSERT_EQ(local.size(), remote.size()) << m;
      for (const auto& [name, bytes] : local) {
        ASSERT_EQ(remote.count(name), 1u) << m << ": " << name;
        EXPECT_TRUE(remote.at(name) == bytes) << m << ": " << name << " differs";
      }
    }
  }

  static TempFolder* dir_;
  static fs::path* inputs_;
  static std::vector<std::string> models_;
};

TempFolder* Remote::dir_ = nullptr;
fs::path* Remote::inputs_ = nullptr;
std::vector<std::string> Remote::models_;

TEST_F(Remote, OneServerIsByteIdenticalToInProcess) {
  ServerProcess server;
  ASSERT_FALSE(server.address().empty());
  ExpectIdentical(server.address(), "one");
  // Without --quiet the run's time line says what the server spent in kernels and queues.
  std::vector<std::string> args = Args(models_[0], "one-timed", {"--server", server.address()});
  args.erase(std::find(args.begin(), args.end(), "--quiet"));
  const ProcessResult r = RunCli(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, ::testing::HasSubstr("server time (summed over tensors): kernels "));
}

TEST_F(Remote, SeveralStreamsToOneServerAreByteIdenticalToInProcess) {
  ServerProcess server;
  ASSERT_FALSE(server.address().empty());
  ExpectIdentical(server.address(), "streams", {"--streams-per-server", "3"},
                  /*example_only=*/true);
}

// A server that allows one stream refuses the CLI's other two: their tensors go to the
// accepted one (stream_limit_test.cc checks the refusals themselves) and the output is the same.
TEST_F(Remote, StreamsBeyondTheServersLimitAreByteIdenticalToInProcess) {
  ServerProcess server({"--max_concurrent_streams=1"});
  ASSERT_FALSE(server.address().empty());
  ExpectIdentical(server.address(), "limited", {"--streams-per-server", "3"},
                  /*example_only=*/true);
}

TEST_F(Remote, ThreeServersAreByteIdenticalToInProcess) {
  // Small limits on two of them: 64 KiB messages force many chunks per tensor, and a 200 kB
  // Hessian budget per session forces new sessions within one run. Each server's metrics
  // endpoint must show that it quantized part of the blocks, and together all of them.
  const int ports[3] = {DeadPort(), DeadPort(), DeadPort()};
  auto metrics = [](int port) { return absl::StrCat("--metrics_address=127.0.0.1:", port); };
  ServerProcess a({metrics(ports[0])});
  ServerProcess b({"--max_receive_message_bytes=65536", metrics(ports[1])});
  ServerProcess c({"--max_session_hessian_bytes=200000", metrics(ports[2])});
  ASSERT_FALSE(a.address().empty() || b.address().empty() || c.address().empty());
  ExpectIdentical(a.address() + "," + b.address() + "," + c.address(), "three");
  double total = 0.0;
  for (int port : ports) {
    const double blocks = server::testing::MetricValue(server::testing::Scrape(port),
                                                       "nvfp4cal_blocks_quantized_total");
    EXPECT_GT(blocks, 0.0) << "the server with metrics on port " << port << " got no work";
    total += blocks;
  }
  // Together they quantized every block of every model: one E4M3 scale byte per block.
  int64_t expected = 0;
  for (const std::string& m : models_) {
    for (const auto& e : fs::directory_iterator(*inputs_ / ("local-" + m))) {
      if (e.path().extension() != ".safetensors") continue;
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(e.path());
      ASSERT_TRUE(f.ok()) << f.status();
      for (const SafetensorsTensor& t : (*f)->tensors()) {
        if (absl::EndsWith(t.name, ".weight_scale")) expected += t.num_bytes;
      }
    }
  }
  EXPECT_EQ(total, static_cast<double>(expected));
}

// gptq through servers: the full Hessians of the example (q/k/v and gate/up share one per
// layer) travel as upper triangles (one server) or whole matrices (two servers, one of which
// holds one full Hessian per session, so the client splits sessions); the output is the
// in-process bytes either way.
TEST_F(Remote, GptqIsByteIdenticalToInProcess) {
  // Only the modules whose example Hessians are full matrices (o_proj and down_proj have blocks).
  const std::vector<std::string> gptq = {
      "--method",  "gptq",    "--gptq-act-order", "--include",  "*q_proj",   "--include", "*k_proj",
      "--include", "*v_proj", "--include",        "*gate_proj", "--include", "*up_proj"};
  const std::string m = "example";
  ProcessResult r = RunCli(Args(m, "gptq-local", gptq));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto local = ReadTree(*dir_ / "gptq-local");
  ServerProcess one;
  ServerProcess two({"--max_session_full_hessian_bytes=300000"});  // one 256^2 Hessian
  ASSERT_FALSE(one.address().empty() || two.address().empty());
  const std::vector<std::pair<std::string, std::vector<std::string>>> runs = {
      {"gptq-upper", {"--server", one.address()}},
      {"gptq-full",
       {"--server", one.address() + "," + two.address(), "--gptq-hessian-layout", "full"}}};
  for (const auto& [out, flags] : runs) {
    std::vector<std::string> extra = gptq;
    extra.insert(extra.end(), flags.begin(), flags.end());
    r = RunCli(Args(m, out, extra));
    ASSERT_EQ(r.exit_code, 0) << out << ": " << r.err;
    const auto remote = ReadTree(*dir_ / out);
    ASSERT_EQ(local.size(), remote.size()) << out;
    for (const auto& [name, bytes] : local) {
      ASSERT_EQ(remote.count(name), 1u) << out << ": " << name;
      EXPECT_TRUE(remote.at(name) == bytes) << out << ": " << name << " differs";
    }
  }
  // The statistics table's gptq part (full-Hessian errors and damping, per module) is the
  // in-process one: the servers' summaries carry gptq's statistics.
  auto gptq_table = [&](const std::string& out, std::vector<std::string> flags) {
    std::vector<std::string> args = Args(m, out, gptq);
    args.push_back("--gptq-compare");
    args.erase(std::find(args.begin(), args.end(), "--quiet"));
    args.insert(args.end(), flags.begin(), flags.end());
    const ProcessResult run = RunCli(args);
    EXPECT_EQ(run.exit_code, 0) << run.err;
    const size_t begin = run.out.find("full-Hessian error tr(E H E^T), local_hessian vs gptq");
    const size_t end = run.out.find("\ntime:");
    EXPECT_NE(begin, std::string::npos) << run.out;
    EXPECT_NE(end, std::string::npos) << run.out;
    return begin == std::string::npos || end == std::string::npos
               ? std::string()
               : run.out.substr(begin, end - begin);
  };
  const std::string in_process = gptq_table("gptq-table-local", {});
  EXPECT_THAT(in_process, HasSubstr("model.layers.1.mlp.up_proj"));
  EXPECT_EQ(gptq_table("gptq-table-remote", {"--server", one.address()}), in_process);
}

// mTLS plus a bearer token (make_test_certs.sh makes the PKI at test time): the same bytes.
TEST_F(Remote, MutualTlsWithTokenIsByteIdenticalToInProcess) {
  const fs::path pki = *dir_ / "pki";
  const int made = std::system(
      ("bash '" + std::string(NVFP4CAL_MAKE_CERTS) + "' '" + pki.string() + "' >/dev/null 2>&1")
          .c_str());
  if (made != 0) GTEST_SKIP() << "openssl could not make the test certificates";
  std::ofstream(*dir_ / "tokens") << "# server side\nremote-test-token-5e1\n";
  std::ofstream(*dir_ / "client-token") << "remote-test-token-5e1\n";
  ServerProcess server({"--tls_cert=" + (pki / "server.pem").string(),
                        "--tls_key=" + (pki / "server.key").string(),
                        "--tls_client_ca=" + (pki / "ca.pem").string(), "--tls_require_client_cert",
                        "--auth_token_file=" + *dir_ / "tokens"});
  ExpectIdentical(server.address(), "mtls",
                  {"--tls-ca", pki / "ca.pem", "--tls-cert", pki / "client.pem", "--tls-key",
                   pki / "client.key", "--token-file", *dir_ / "client-token"},
                  /*example_only=*/true);

  // A wrong token: exit 1 naming UNAUTHENTICATED, the token nowhere, no output folder.
  std::ofstream(*dir_ / "bad-token") << "remote-bad-token-77a\n";
  const std::string m = models_.front();
  const ProcessResult bad = RunCli(Args(
      m, "mtls-bad",
      {"--server", server.address(), "--tls-ca", pki / "ca.pem", "--tls-cert", pki / "client.pem",
       "--tls-key", pki / "client.key", "--token-file", *dir_ / "bad-token"}));
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.err, HasSubstr("bearer token not accepted"));
  EXPECT_THAT(bad.err + bad.out, ::testing::Not(HasSubstr("remote-bad-token")));
  EXPECT_FALSE(fs::exists(*dir_ / "mtls-bad"));
  // No client certificate: the handshake fails; the CLI gives up after its retries.
  const ProcessResult no_cert =
      RunCli(Args(m, "mtls-nocert",
                  {"--server", server.address(), "--tls-ca", pki / "ca.pem", "--token-file",
                   *dir_ / "client-token", "--retries", "1"}));
  EXPECT_EQ(no_cert.exit_code, 1);
  EXPECT_THAT(no_cert.err, HasSubstr(server.address())) << no_cert.err;
  EXPECT_FALSE(fs::exists(*dir_ / "mtls-nocert"));
}

TEST_F(Remote, DnsNameIsExpandedToEveryResolvedAddress) {
  // "localhost" resolves to 127.0.0.1 (and maybe ::1, where nothing listens: routed around).
  const std::vector<std::string> expanded =
      ExpandServerAddresses({"dns:///localhost:1234", "example.org:5", "dns:///no-such.invalid:7"});
  EXPECT_NE(std::find(expanded.begin(), expanded.end(), "127.0.0.1:1234"), expanded.end());
  EXPECT_NE(std::find(expanded.begin(), expanded.end(), "example.org:5"), expanded.end());
  EXPECT_NE(std::find(expanded.begin(), expanded.end(), "dns:///no-such.invalid:7"),
            expanded.end());
  for (const std::string& e : expanded) EXPECT_EQ(e.find("dns:///localhost"), std::string::npos);
  ServerProcess server;
  ASSERT_FALSE(server.address().empty());
  const std::string port = server.address().substr(server.address().rfind(':') + 1);
  ExpectIdentical("dns:///localhost:" + port, "dns", {}, /*example_only=*/true);
}

TEST_F(Remote, DeadAddressAmongLiveOnesIsRoutedAround) {
  ServerProcess a;
  ServerProcess b;
  const std::string dead = "127.0.0.1:" + std::to_string(DeadPort());
  ExpectIdentical(dead + "," + a.address() + "," + b.address(), "dead", {},
                  /*example_only=*/true);
}

TEST(RemoteCli, UnreachableServerFailsAfterRetriesNamingIt) {
  TempFolder dir("unreachable");
  ASSERT_EQ(RunCli({"example", "--out", dir / "example", "--layers", "1"}).exit_code, 0);
  const std::string dead = "127.0.0.1:" + std::to_string(DeadPort());
  const ProcessResult r = RunCli({"quantize", "--model", dir / "example", "--hessians",
                                  dir / "example/hessians.safetensors", "--out", dir / "out",
                                  "--server", dead, "--retries", "2"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("server " + dead + " unavailable after 2 attempts"));
  EXPECT_FALSE(fs::exists(dir / "out"));
  EXPECT_THAT(testing::LeftoverTempFolders(dir / "out"), ::testing::IsEmpty());
}

TEST(ClientLibrary, AsyncAndSingleTensorCallsReturnTheKernelsBytes) {
  ServerProcess server;
  ASSERT_FALSE(server.address().empty());
  ClientOptions options;
  options.addresses = {server.address()};
  options.chunk_bytes = 4096;  // several chunks per tensor
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(options);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<v1::ServerInfo> info = (*client)->GetServerInfo(0);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_GT(info->limits().max_receive_message_bytes(), 0);

  // Three tensors, two sharing one Hessian, in bf16 and fp32.
  const std::vector<uint16_t> w0 = MakeExampleWeightsBf16(64, 128, 1);
  const std::vector<uint16_t> w1 = MakeExampleWeightsBf16(48, 128, 2);
  const std::vector<float> w2 = MakeExampleWeights(32, 64, 3);
  const std::vector<float> h128 = MakeExampleHessianBlocks(8, 4);
  const std::vector<float> h64 = MakeExampleHessianBlocks(4, 5);
  std::vector<TensorTask> tasks(3);
  tasks[0] = {
      "a.weight", {w0.data(), DType::kBFloat16, 64, 128}, {h128.data(), 8}, "h128", {}, 0.0f, {},
      {}};
  tasks[1] = {
      "b.weight", {w1.data(), DType::kBFloat16, 48, 128}, {h128.data(), 8}, "h128", {}, 0.0f, {},
      {}};
  tasks[2] = {
      "c.weight", {w2.data(), DType::kFloat32, 32, 64}, {h64.data(), 4}, "h64", {}, 0.0f, {}, {}};
  tasks[2].params.method = Method::kLocalHessian;
  std::unique_ptr<ScaleSearch> kernels = MakeCpuScaleSearch({});
  std::vector<QuantizedTensor> want;
  for (TensorTask& task : tasks) {
    task.global_amax = *ComputeGlobalAmax(task.weights);
    QuantizeRequest request;
    request.weights = task.weights;
    request.hessians = task.hessians;
    request.params = task.params;
    request.global_amax = task.global_amax;
    want.push_back(*kernels->Quantize(request));
  }
  std::map<size_t, QuantizedTensor> got;
  absl::Mutex mu;
  std::future<absl::Status> done =
      (*client)->QuantizeTensorsAsync(tasks, [&](size_t i, QuantizedTensor r) {
        absl::MutexLock lock(&mu);
        got[i] = std::move(r);
        return absl::OkStatus();
      });
  ASSERT_TRUE(done.get().ok());
  ASSERT_EQ(got.size(), 3u);
  for (size_t i = 0; i < tasks.size(); ++i) {
    EXPECT_EQ(got[i].packed_codes, want[i].packed_codes) << tasks[i].name;
    EXPECT_EQ(got[i].scales, want[i].scales) << tasks[i].name;
    EXPECT_EQ(got[i].global_scale, want[i].global_scale) << tasks[i].name;
    EXPECT_EQ(got[i].stats.blocks_scale_changed, want[i].stats.blocks_scale_changed);
  }
  // Concurrent calls on one client are independent.
  std::vector<std::vector<QuantizedTensor>> parallel(3, std::vector<QuantizedTensor>(3));
  std::vector<std::future<absl::Status>> calls;
  for (size_t c = 0; c < parallel.size(); ++c) {
    calls.push_back(
        (*client)->QuantizeTensorsAsync(tasks, [&parallel, c](size_t i, QuantizedTensor r) {
          parallel[c][i] = std::move(r);
          return absl::OkStatus();
        }));
  }
  for (size_t c = 0; c < calls.size(); ++c) {
    ASSERT_TRUE(calls[c].get().ok());
    for (size_t i = 0; i < tasks.size(); ++i) {
      EXPECT_EQ(parallel[c][i].packed_codes, want[i].packed_codes) << c << " " << i;
      EXPECT_EQ(parallel[c][i].scales, want[i].scales) << c << " " << i;
    }
  }
  absl::StatusOr<QuantizedTensor> one = (*client)->Quantize(tasks[2]);
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(one->packed_codes, want[2].packed_codes);

  // A callback error stops the call with that error.
  absl::Status stopped = (*client)->QuantizeTensors(
      tasks, [](size_t, QuantizedTensor) { return absl::DataLossError("disk full"); });
  EXPECT_EQ(stopped.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(stopped.message()), HasSubstr("disk full"));
}

// Seven tensors without shared Hessians over three servers.
std::vector<TensorTask> SevenTasks(std::vector<std::vector<uint16_t>>* storage) {
  std::vector<TensorTask> tasks;
  for (int i = 0; i < 7; ++i) storage->push_back(MakeExampleWeightsBf16(16, 64, 10 + i));
  for (int i = 0; i < 7; ++i) {
    TensorTask task;
    task.name = "t" + std::to_string(i);
    task.weights = {(*storage)[static_cast<size_t>(i)].data(), DType::kBFloat16, 16, 64};
    task.params.method = Method::kMse;
    task.global_amax = *ComputeGlobalAmax(task.weights);
    tasks.push_back(task);
  }
  return tasks;
}

// Two streams to one server, the tensors' weights arriving late and in order (as the pipeline
// reads them), with a trace: every tensor's result is the kernels' bytes, and the trace holds
// each tensor's wait for its weights and its send on a stream's row and its time at the server
// on a row of its own.
TEST(ClientLibrary, TraceShowsEachStreamsWaitsAndSendsAndEachTensorAtTheServer) {
  ServerProcess server;
  ASSERT_FALSE(server.address().empty());
  Trace trace;
  ClientOptions options;
  options.addresses = {server.address(), server.address()};
  options.chunk_bytes = 1024;  // several chunks per tensor
  options.trace = &trace;
  auto client = Client::Create(options);
  ASSERT_TRUE(client.ok()) << client.status();
  std::vector<std::vector<uint16_t>> storage;
  std::vector<TensorTask> tasks = SevenTasks(&storage);
  std::unique_ptr<ScaleSearch> kernels = MakeCpuScaleSearch({});
  std::vector<QuantizedTensor> want;
  for (const TensorTask& task : tasks) {
    QuantizeRequest request;
    request.weights = task.weights;
    request.params = task.params;
    request.global_amax = task.global_amax;
    want.push_back(*kernels->Quantize(request));
  }
  std::vector<std::unique_ptr<TaskGate>> gates;
  for (TensorTask& task : tasks) {
    gates.push_back(std::make_unique<TaskGate>());
    task.ready = gates.back().get();
  }
  std::thread reader([&] {
    for (auto& gate : gates) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      gate->Open(absl::OkStatus());
    }
  });
  std::map<size_t, QuantizedTensor> got;
  absl::Mutex mu;
  const absl::Status status = (*client)->QuantizeTensors(tasks, [&](size_t i, QuantizedTensor r) {
    absl::MutexLock lock(&mu);
    got[i] = std::move(r);
    return absl::OkStatus();
  });
  reader.join();
  ASSERT_TRUE(status.ok()) << status;
  ASSERT_EQ(got.size(), tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) {
    EXPECT_EQ(got[i].packed_codes, want[i].packed_codes) << tasks[i].name;
    EXPECT_EQ(got[i].scales, want[i].scales) << tasks[i].name;
  }
  std::set<std::pair<std::string, std::string>> spans;  // (category, name)
  const nlohmann::json parsed = nlohmann::json::parse(trace.Json());
  for (const nlohmann::json& event : parsed["traceEvents"]) {
    if (event.contains("cat")) spans.emplace(event["cat"], event["name"]);
  }
  for (const TensorTask& task : tasks) {
    EXPECT_EQ(spans.count({"quantize", "wait for " + task.name}), 1u) << task.name;
    EXPECT_EQ(spans.count({"send", "send " + task.name}), 1u) << task.name;
    EXPECT_EQ(spans.count({"server", task.name}), 1u) << task.name;
  }
}

// A hostile server that answers a tensor (zero codes and a summary) as soon as its header
// arrives, then reads nothing for 300 ms while the client's writes wait on HTTP/2 flow control
// (no BDP probing: a 64 KiB window). A result lets the caller free the tensor's memory, which
// the client is still sending from: the client refuses the early summary instead of delivering
// it, and the call ends with that error (no hang, no read of freed memory under the sanitizers).
class EagerReactor : public grpc::ServerBidiReactor<v1::QuantizeRequest, v1::QuantizeResponse> {
 public:
  EagerReactor() { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    bool write = false;
    bool finish = false;
    bool read = ok;
    {
      absl::MutexLock lock(&mu_);
      if (!ok) {
        reads_done_ = true;
        finish = FinishNowLocked();
      } else if (request_.has_header()) {
        const v1::TensorHeader& h = request_.header();
        v1::QuantizeResponse result;
        v1::ResultChunk* r = result.mutable_result();
        r->set_tensor_name(h.name());
        r->set_num_rows(h.rows());
        r->set_packed_codes(std::string(static_cast<size_t>(h.rows() * h.cols() / 2), '\0'));
        r->set_scales(std::string(static_cast<size_t>(h.rows() * h.cols() / 16), '\x01'));
        queue_.push_back(std::move(result));
        v1::QuantizeResponse summary;
        v1::TensorSummary* t = summary.mutable_summary();
        t->set_tensor_name(h.name());
        t->set_rows(h.rows());
        t->set_cols(h.cols());
        t->set_global_amax(h.global_amax());
        queue_.push_back(std::move(summary));
        write = !writing_;
        writing_ = true;
        paused_ = true;  // reads resume 300 ms after the answer went out
        read = false;
      }
    }
    if (write) StartWrite(&queue_.front());
    if (finish) Finish(grpc::Status::OK);
    if (read) StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    bool write = false;
    bool finish = false;
    bool resume = false;
    {
      absl::MutexLock lock(&mu_);
      queue_.pop_front();
      write = ok && !queue_.empty();
      writing_ = write;
      if (!ok) queue_.clear();
      resume = !write && paused_;
      paused_ = paused_ && !resume;
      finish = FinishNowLocked();
    }
    if (write) StartWrite(&queue_.front());
    if (resume) {
      if (resumer_.joinable()) resumer_.join();
      resumer_ = std::thread([this] {
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        StartRead(&request_);
      });
    }
    if (finish) Finish(grpc::Status::OK);
  }

  void OnDone() override {
    if (resumer_.joinable()) resumer_.join();
    delete this;
  }

 private:
  bool FinishNowLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!reads_done_ || writing_ || finished_) return false;
    finished_ = true;
    return true;
  }

  v1::QuantizeRequest request_;
  std::thread resumer_;
  absl::Mutex mu_;
  std::deque<v1::QuantizeResponse> queue_;  // front: the write in flight
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool paused_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

class EagerServer : public v1::Calibrator::CallbackService {
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest*,
                                          v1::ServerInfo* info) override {
    info->set_version("eager");
    info->mutable_limits()->set_max_receive_message_bytes(int64_t{64} << 20);
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  grpc::ServerBidiReactor<v1::QuantizeRequest, v1::QuantizeResponse>* Quantize(
      grpc::CallbackServerContext*) override {
    return new EagerReactor();
  }
};

TEST(ClientLibrary, SummaryBeforeTheRowsWereSentIsRefused) {
  EagerServer service;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ClientOptions options;
  options.addresses = {absl::StrCat("127.0.0.1:", port)};
  options.chunk_bytes = 4096;  // 64 chunks per tensor: the answer comes while they go out
  options.timeout = absl::Seconds(60);
  auto client = Client::Create(options);
  ASSERT_TRUE(client.ok()) << client.status();
  std::vector<std::vector<uint16_t>> weights;
  std::vector<TensorTask> tasks(3);
  for (size_t i = 0; i < tasks.size(); ++i) {
    weights.push_back(MakeExampleWeightsBf16(128, 1024, 30 + i));
    tasks[i].name = "t" + std::to_string(i);
    tasks[i].weights = {weights[i].data(), DType::kBFloat16, 128, 1024};
    tasks[i].params.method = Method::kMse;
    tasks[i].global_amax = *ComputeGlobalAmax(tasks[i].weights);
  }
  int delivered = 0;
  const absl::Status status = (*client)->QuantizeTensors(tasks, [&](size_t i, QuantizedTensor) {
    ++delivered;
    std::fill(weights[i].begin(), weights[i].end(), 0xffff);  // the caller reuses the memory
    return absl::OkStatus();
  });
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("summary before the tensor's rows were all sent"));
  EXPECT_EQ(delivered, 0);
  server->Shutdown();
}

TEST(ClientLibrary, RoundRobinSpreadsTensorsOverServers) {
  ServerProcess a, b, c;
  ClientOptions options;
  options.addresses = {a.address(), b.address(), c.address()};
  options.work_stealing = false;  // exact round robin
  auto client = Client::Create(options);
  ASSERT_TRUE(client.ok()) << client.status();
  std::vector<std::vector<uint16_t>> storage;
  const std::vector<TensorTask> tasks = SevenTasks(&storage);
  ClientCallStats stats;
  ASSERT_TRUE((*client)
                  ->QuantizeTensors(
                      tasks, [](size_t, QuantizedTensor) { return absl::OkStatus(); }, &stats)
                  .ok());
  EXPECT_EQ(stats.tensors_per_address, (std::vector<int64_t>{3, 2, 2}));
  EXPECT_EQ(stats.failed_attempts, 0);
}

TEST(ClientLibrary, TensorsOfADeadServerGoToTheLiveOnes) {
  ServerProcess live;
  ClientOptions options;
  options.addresses = {"127.0.0.1:" + std::to_string(DeadPort()), live.address()};
  options.work_stealing = false;  // the live server gets the dead one's tensors as orphans
  options.max_attempts = 2;
  options.initial_backoff = absl::Milliseconds(10);
  auto client = Client::Create(options);
  ASSERT_TRUE(client.ok()) << client.status();
  std::vector<std::vector<uint16_t>> storage;
  const std::vector<TensorTask> tasks = SevenTasks(&storage);
  ClientCallStats stats;
  absl::Status done = (*client)->QuantizeTensors(
      tasks, [](size_t, QuantizedTensor) { return absl::OkStatus(); }, &stats);
  ASSERT_TRUE(done.ok()) << done;
  EXPECT_EQ(stats.tensors_per_address, (std::vector<int64_t>{0, 7}));
  EXPECT_EQ(stats.failed_attempts, 2);
}

}  // namespace
}  // namespace nvfp4cal
