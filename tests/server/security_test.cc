// Transport security and bearer tokens: TLS results byte-identical to plaintext, plaintext and
// wrongly-trusting clients refused, mTLS with and without client certificates, tokens
// (missing, wrong, right) on every Calibrator method, health reachable without a token and on
// the plaintext health port, and on the real binary: token file reload on SIGHUP with no token
// ever in its output. Certificates are made at test time by make_test_certs.sh (openssl).
#include <sys/types.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/calibration_server.h"
#include "server/token_authenticator.h"
#include "tests/server/server_process.h"
#include "tests/server/test_client.h"

namespace nvfp4cal::server {
namespace {

namespace fs = std::filesystem;
using ::nvfp4cal::server::testing::AppendTensor;
using ::nvfp4cal::server::testing::JobRequestOf;
using ::nvfp4cal::server::testing::MakeTensor;
using ::nvfp4cal::server::testing::Reference;
using ::nvfp4cal::server::testing::RunSession;
using ::nvfp4cal::server::testing::ServerProcess;
using ::nvfp4cal::server::testing::SessionResult;
using ::nvfp4cal::server::testing::TestTensor;
using ::testing::HasSubstr;
using ::testing::Not;

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

void WriteFile(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

// Certificates shared by every test of the binary (made once per process, removed at its exit:
// ctest runs each test in a process of its own, and the keys must not pile up in /tmp).
class Pki {
 public:
  static const Pki& Get() {
    static const Pki* pki = new Pki();
    return *pki;
  }
  bool ok() const { return ok_; }
  fs::path dir() const { return dir_; }
  std::string Pem(const std::string& name) const { return ReadFile(dir_ / name); }

 private:
  Pki() {
    char tmpl[] = "/tmp/nvfp4cal-pki-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) return;
    dir_ = tmpl;
    owner_ = getpid();
    std::atexit(RemoveAtExit);
    const std::string command = std::string("bash '") + NVFP4CAL_MAKE_CERTS + "' '" +
                                dir_.string() + "' > '" + (dir_ / "log").string() + "' 2>&1";
    ok_ = std::system(command.c_str()) == 0;
  }
  // Only in the process that made the folder (not in a forked child that exits).
  static void RemoveAtExit() {
    const Pki& pki = Get();
    if (getpid() != pki.owner_) return;
    std::error_code ignored;
    fs::remove_all(pki.dir_, ignored);
  }
  fs::path dir_;
  pid_t owner_ = 0;
  bool ok_ = false;
};

#define REQUIRE_PKI()                                              \
  if (!Pki::Get().ok())                                            \
  GTEST_SKIP() << "openssl could not make the test certificates: " \
               << ReadFile(Pki::Get().dir() / "log")

ServerOptions BaseOptions() {
  ServerOptions options;
  options.address = "127.0.0.1:0";
  options.metrics_address = "";
  options.devices.device = "cpu";
  options.devices.cpu_threads_per_worker = 1;
  options.drain_timeout = absl::Seconds(5);
  options.limits.max_rows_per_item = 16;
  return options;
}

ServerOptions TlsOptions() {
  ServerOptions options = BaseOptions();
  const fs::path dir = Pki::Get().dir();
  options.security.tls_cert_path = dir / "server.pem";
  options.security.tls_key_path = dir / "server.key";
  return options;
}

// A channel trusting `ca` (and presenting a client certificate when `client` is given).
std::shared_ptr<grpc::Channel> TlsChannel(const std::string& address, const std::string& ca,
                                          const std::string& client = "") {
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = Pki::Get().Pem(ca);
  if (!client.empty()) {
    ssl.pem_cert_chain = Pki::Get().Pem(client + ".pem");
    ssl.pem_private_key = Pki::Get().Pem(client + ".key");
  }
  return grpc::CreateChannel(address, grpc::SslCredentials(ssl));
}

std::vector<TestTensor> SampleTensors() {
  TestTensor a = MakeTensor("a", 40, 64, DType::kBFloat16, "dss", "h", 11);
  a.global_amax = 8.0f;
  TestTensor b = MakeTensor("b", 24, 32, DType::kFloat32, "max", "", 12);
  return {a, b};
}

SessionResult RunOn(const std::shared_ptr<grpc::Channel>& channel,
                    const std::vector<TestTensor>& tensors, const std::string& token = "") {
  std::vector<v1::QuantizeRequest> requests;
  for (const TestTensor& t : tensors) AppendTensor(t, &requests);
  auto stub = v1::Calibrator::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
  return RunSession(stub.get(), requests, &context);
}

grpc::Status InfoCall(const std::shared_ptr<grpc::Channel>& channel, const std::string& token,
                      const std::string& raw_authorization = "") {
  auto stub = v1::Calibrator::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
  if (!raw_authorization.empty()) context.AddMetadata("authorization", raw_authorization);
  v1::ServerInfo info;
  return stub->GetServerInfo(&context, v1::GetServerInfoRequest(), &info);
}

grpc::health::v1::HealthCheckResponse::ServingStatus Health(
    const std::shared_ptr<grpc::Channel>& channel, const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return response.status();
}

TEST(TokenAuthenticator, ConstantTimeEqualsComparesWholeStrings) {
  EXPECT_TRUE(ConstantTimeEquals("secret-token", "secret-token"));
  EXPECT_FALSE(ConstantTimeEquals("secret-token", "secret-tokeX"));
  EXPECT_FALSE(ConstantTimeEquals("secret-token", "secret-token2"));
  EXPECT_FALSE(ConstantTimeEquals("secret-token", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("", "x"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  // A string equal to the other plus NUL bytes differs (the length counts).
  EXPECT_FALSE(ConstantTimeEquals(std::string("ab\0", 3), "ab"));
}

TEST(TokenAuthenticator, ParsesCommentsBlankLinesAdminAndRejectsEmptyFiles) {
  std::vector<AcceptedToken> tokens;
  ASSERT_TRUE(
      ParseTokenFile("# team tokens\n\n  alpha-1 \nbeta-2\r\n#gamma\nroot-3  admin\n", &tokens)
          .ok());
  ASSERT_EQ(tokens.size(), 3u);
  EXPECT_EQ(tokens[0].token, "alpha-1");
  EXPECT_FALSE(tokens[0].admin);
  EXPECT_EQ(tokens[1].token, "beta-2");
  EXPECT_EQ(tokens[2].token, "root-3");
  EXPECT_TRUE(tokens[2].admin);
  const absl::Status empty = ParseTokenFile("# nothing\n\n", &tokens);
  EXPECT_EQ(empty.code(), absl::StatusCode::kInvalidArgument);
  const absl::Status spaced = ParseTokenFile("two words\n", &tokens);
  EXPECT_EQ(spaced.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spaced.message()), Not(HasSubstr("two")));
  const absl::Status twice = ParseTokenFile("same\nsame admin\n", &tokens);
  EXPECT_EQ(twice.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(twice.message()), HasSubstr("line 2: the token appears twice"));
}

TEST(TokenAuthenticator, ChecksTheBearerValue) {
  TokenAuthenticator auth;
  ASSERT_TRUE(auth.SetTokens({{"tok-a", false}, {"tok-b", true}}).ok());
  const std::string_view right = "Bearer tok-b";
  const std::string_view wrong = "Bearer tok-c";
  const std::string_view basic = "Basic dG9rLWE=";
  const std::string_view prefix_only = "Bearer tok-";
  EXPECT_TRUE(auth.CheckAuthorization(&right).ok());
  EXPECT_EQ(auth.CheckAuthorization(&wrong).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(auth.CheckAuthorization(&basic).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(auth.CheckAuthorization(&prefix_only).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(auth.CheckAuthorization(nullptr).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(auth.CheckAuthorization(&wrong).message()), Not(HasSubstr("tok-")));
  std::multimap<grpc::string_ref, grpc::string_ref> metadata;
  metadata.emplace("authorization", "Bearer tok-b");
  const absl::StatusOr<Caller> caller = auth.Identify(metadata);
  ASSERT_TRUE(caller.ok());
  EXPECT_EQ(caller->identity, "tok-b");
  EXPECT_TRUE(caller->admin);
}

TEST(Tls, ResultsAreByteIdenticalToPlaintextAndTheKernels) {
  REQUIRE_PKI();
  CalibrationServer plain(BaseOptions());
  ASSERT_TRUE(plain.Start().ok());
  CalibrationServer tls(TlsOptions());
  ASSERT_TRUE(tls.Start().ok());
  const std::vector<TestTensor> tensors = SampleTensors();
  const SessionResult over_plain =
      RunOn(grpc::CreateChannel(plain.address(), grpc::InsecureChannelCredentials()), tensors);
  const SessionResult over_tls = RunOn(TlsChannel(tls.address(), "ca.pem"), tensors);
  ASSERT_TRUE(over_plain.status.ok()) << over_plain.status.error_message();
  ASSERT_TRUE(over_tls.status.ok()) << over_tls.status.error_message();
  for (const TestTensor& t : tensors) {
    SCOPED_TRACE(t.name);
    const auto& p = over_plain.tensors.at(t.name);
    const auto& s = over_tls.tensors.at(t.name);
    EXPECT_EQ(s.packed_codes, p.packed_codes);
    EXPECT_EQ(s.scales, p.scales);
    ASSERT_TRUE(s.summary.has_value() && p.summary.has_value());
    EXPECT_EQ(s.summary->global_scale(), p.summary->global_scale());
    EXPECT_EQ(s.summary->stats().SerializeAsString(), p.summary->stats().SerializeAsString());
    const QuantizedTensor ref = Reference(t);
    EXPECT_EQ(s.packed_codes, std::string(ref.packed_codes.begin(), ref.packed_codes.end()));
    EXPECT_EQ(s.scales, std::string(ref.scales.begin(), ref.scales.end()));
  }
}

TEST(Tls, PlaintextClientAndWrongCaAreRefused) {
  REQUIRE_PKI();
  CalibrationServer tls(TlsOptions());
  ASSERT_TRUE(tls.Start().ok());
  const grpc::Status plain =
      InfoCall(grpc::CreateChannel(tls.address(), grpc::InsecureChannelCredentials()), "");
  EXPECT_EQ(plain.error_code(), grpc::StatusCode::UNAVAILABLE) << plain.error_message();
  const grpc::Status wrong_ca = InfoCall(TlsChannel(tls.address(), "wrong-ca.pem"), "");
  EXPECT_EQ(wrong_ca.error_code(), grpc::StatusCode::UNAVAILABLE) << wrong_ca.error_message();
  EXPECT_TRUE(InfoCall(TlsChannel(tls.address(), "ca.pem"), "").ok());
}

TEST(Tls, RequiredClientCertificateIsEnforced) {
  REQUIRE_PKI();
  ServerOptions options = TlsOptions();
  options.security.tls_client_ca_path = Pki::Get().dir() / "ca.pem";
  options.security.tls_require_client_cert = true;
  CalibrationServer mtls(options);
  ASSERT_TRUE(mtls.Start().ok());
  const grpc::Status none = InfoCall(TlsChannel(mtls.address(), "ca.pem"), "");
  EXPECT_EQ(none.error_code(), grpc::StatusCode::UNAVAILABLE) << none.error_message();
  const grpc::Status foreign = InfoCall(TlsChannel(mtls.address(), "ca.pem", "wrong-client"), "");
  EXPECT_EQ(foreign.error_code(), grpc::StatusCode::UNAVAILABLE) << foreign.error_message();
  const SessionResult with_cert =
      RunOn(TlsChannel(mtls.address(), "ca.pem", "client"), SampleTensors());
  EXPECT_TRUE(with_cert.status.ok()) << with_cert.status.error_message();
  EXPECT_EQ(with_cert.tensors.size(), 2u);
}

TEST(Tls, InconsistentOptionsAreRejectedAtStart) {
  REQUIRE_PKI();
  ServerOptions no_key = BaseOptions();
  no_key.security.tls_cert_path = Pki::Get().dir() / "server.pem";
  EXPECT_EQ(CalibrationServer(no_key).Start().code(), absl::StatusCode::kInvalidArgument);
  ServerOptions ca_without_tls = BaseOptions();
  ca_without_tls.security.tls_client_ca_path = Pki::Get().dir() / "ca.pem";
  EXPECT_EQ(CalibrationServer(ca_without_tls).Start().code(), absl::StatusCode::kInvalidArgument);
  ServerOptions missing = TlsOptions();
  missing.security.tls_key_path = Pki::Get().dir() / "no-such.key";
  EXPECT_EQ(CalibrationServer(missing).Start().code(), absl::StatusCode::kNotFound);
  ServerOptions no_tokens = BaseOptions();
  no_tokens.security.auth_token_file = Pki::Get().dir() / "no-such-tokens";
  EXPECT_EQ(CalibrationServer(no_tokens).Start().code(), absl::StatusCode::kNotFound);
}

class TokenTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/nvfp4cal-tokens-XXXXXX";
    dir_ = mkdtemp(tmpl);
    WriteFile(dir_ / "tokens", "# accepted\ngood-token-1\ngood-token-2\nroot-token admin\n");
    ServerOptions options = BaseOptions();
    options.security.auth_token_file = dir_ / "tokens";
    server_ = std::make_unique<CalibrationServer>(options);
    ASSERT_TRUE(server_->Start().ok());
    channel_ = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  }
  void TearDown() override {
    server_.reset();
    fs::remove_all(dir_);
  }
  fs::path dir_;
  std::unique_ptr<CalibrationServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
};

TEST_F(TokenTest, MissingOrWrongTokenIsUnauthenticatedOnEveryMethod) {
  for (const std::string& token : {std::string(), std::string("bad-token")}) {
    SCOPED_TRACE("token '" + token + "'");
    EXPECT_EQ(InfoCall(channel_, token).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    const SessionResult session = RunOn(channel_, SampleTensors(), token);
    EXPECT_EQ(session.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_TRUE(session.tensors.empty());
    auto stub = v1::Calibrator::NewStub(channel_);
    auto with_token = [&](grpc::ClientContext* c) {
      if (!token.empty()) c->AddMetadata("authorization", "Bearer " + token);
    };
    {
      grpc::ClientContext c;
      with_token(&c);
      v1::Job job;
      EXPECT_EQ(stub->SubmitJob(&c, JobRequestOf(SampleTensors()[1]), &job).error_code(),
                grpc::StatusCode::UNAUTHENTICATED);
    }
    {
      grpc::ClientContext c;
      with_token(&c);
      v1::GetJobRequest request;
      request.set_job_id("job-1");
      v1::Job job;
      EXPECT_EQ(stub->GetJob(&c, request, &job).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    }
    {
      grpc::ClientContext c;
      with_token(&c);
      v1::CancelJobRequest request;
      request.set_job_id("job-1");
      v1::Job job;
      EXPECT_EQ(stub->CancelJob(&c, request, &job).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    }
    {
      grpc::ClientContext c;
      with_token(&c);
      v1::ListJobsResponse page;
      EXPECT_EQ(stub->ListJobs(&c, v1::ListJobsRequest(), &page).error_code(),
                grpc::StatusCode::UNAUTHENTICATED);
    }
    {
      grpc::ClientContext c;
      with_token(&c);
      v1::WatchJobRequest request;
      request.set_job_id("job-1");
      auto reader = stub->WatchJob(&c, request);
      v1::Job job;
      EXPECT_FALSE(reader->Read(&job));
      EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
    }
  }
  EXPECT_EQ(InfoCall(channel_, "", "Basic Z29vZC10b2tlbi0x").error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(TokenTest, AcceptedTokensWorkAndHealthNeedsNone) {
  EXPECT_TRUE(InfoCall(channel_, "good-token-1").ok());
  const SessionResult session = RunOn(channel_, SampleTensors(), "good-token-2");
  ASSERT_TRUE(session.status.ok()) << session.status.error_message();
  const QuantizedTensor ref = Reference(SampleTensors()[0]);
  EXPECT_EQ(session.tensors.at("a").packed_codes,
            std::string(ref.packed_codes.begin(), ref.packed_codes.end()));
  EXPECT_EQ(Health(channel_, kLivenessService), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(Health(channel_, kReadinessService), grpc::health::v1::HealthCheckResponse::SERVING);
}

// Each token sees only the jobs it submitted; another token's job answers NOT_FOUND as an
// unknown one would (Get, Cancel, Watch) and is not listed; an admin token sees every job.
// (Before: any authenticated client could list, read and cancel every other client's jobs.)
TEST_F(TokenTest, EachTokenSeesOnlyItsOwnJobsAndAdminSeesAll) {
  auto stub = v1::Calibrator::NewStub(channel_);
  auto context_for = [](grpc::ClientContext* c, const std::string& token) {
    c->AddMetadata("authorization", "Bearer " + token);
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  };
  std::string mine;
  {
    grpc::ClientContext c;
    context_for(&c, "good-token-1");
    v1::Job job;
    ASSERT_TRUE(stub->SubmitJob(&c, JobRequestOf(SampleTensors()[1]), &job).ok());
    mine = job.job_id();
  }
  auto get = [&](const std::string& token) {
    grpc::ClientContext c;
    context_for(&c, token);
    v1::GetJobRequest request;
    request.set_job_id(mine);
    v1::Job job;
    return stub->GetJob(&c, request, &job);
  };
  auto listed = [&](const std::string& token) {
    grpc::ClientContext c;
    context_for(&c, token);
    v1::ListJobsResponse page;
    EXPECT_TRUE(stub->ListJobs(&c, v1::ListJobsRequest(), &page).ok());
    return page.jobs_size();
  };
  EXPECT_TRUE(get("good-token-1").ok());
  EXPECT_TRUE(get("root-token").ok());
  const grpc::Status other = get("good-token-2");
  EXPECT_EQ(other.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(listed("good-token-1"), 1);
  EXPECT_EQ(listed("good-token-2"), 0);
  EXPECT_EQ(listed("root-token"), 1);
  {
    grpc::ClientContext c;
    context_for(&c, "good-token-2");
    v1::CancelJobRequest request;
    request.set_job_id(mine);
    v1::Job job;
    EXPECT_EQ(stub->CancelJob(&c, request, &job).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext c;
    context_for(&c, "good-token-2");
    v1::WatchJobRequest request;
    request.set_job_id(mine);
    auto reader = stub->WatchJob(&c, request);
    v1::Job job;
    EXPECT_FALSE(reader->Read(&job));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext c;
    context_for(&c, "root-token");
    v1::CancelJobRequest request;
    request.set_job_id(mine);
    v1::Job job;
    EXPECT_TRUE(stub->CancelJob(&c, request, &job).ok());
  }
}

TEST_F(TokenTest, ReloadReplacesTokensAndKeepsThemOnABadFile) {
  WriteFile(dir_ / "tokens", "rotated-token\n");
  ASSERT_TRUE(server_->ReloadTokens().ok());
  EXPECT_EQ(InfoCall(channel_, "good-token-1").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(InfoCall(channel_, "rotated-token").ok());
  WriteFile(dir_ / "tokens", "# emptied by mistake\n");
  EXPECT_EQ(server_->ReloadTokens().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(InfoCall(channel_, "rotated-token").ok());
}

TEST(HealthPort, PlaintextHealthPortServesProbesOfATlsServer) {
  REQUIRE_PKI();
  ServerOptions options = TlsOptions();
  options.security.health_address = "127.0.0.1:0";
  options.security.auth_token_file = Pki::Get().dir() / "tokens";
  WriteFile(Pki::Get().dir() / "tokens", "probe-test-token\n");
  CalibrationServer server(options);
  ASSERT_TRUE(server.Start().ok());
  ASSERT_FALSE(server.health_address().empty());
  auto health = grpc::CreateChannel(server.health_address(), grpc::InsecureChannelCredentials());
  EXPECT_EQ(Health(health, kLivenessService), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(Health(health, kReadinessService), grpc::health::v1::HealthCheckResponse::SERVING);
  // The health port serves nothing else, with or without a token.
  EXPECT_EQ(InfoCall(health, "probe-test-token").error_code(), grpc::StatusCode::UNIMPLEMENTED);
  // The main port needs TLS and the token.
  EXPECT_TRUE(InfoCall(TlsChannel(server.address(), "ca.pem"), "probe-test-token").ok());
  server.Drain();
}

// The real binary: tokens rotated by rewriting the file and sending SIGHUP; neither the old
// nor the new token, nor the rejected one, appears in anything the server prints.
TEST(ServerBinary, TokenFileIsReloadedOnSighupAndNeverLogged) {
  REQUIRE_PKI();
  const fs::path dir = Pki::Get().dir();
  const std::string old_token = "old-secret-9f2c1e";
  const std::string new_token = "new-secret-7b4d0a";
  const std::string wrong_token = "wrong-secret-3a8e55";
  WriteFile(dir / "binary-tokens", old_token + "\n");
  ServerProcess server(
      {NVFP4CAL_SERVER_BINARY, "--address=127.0.0.1:0", "--metrics_address=", "--device=cpu",
       "--tls_cert=" + (dir / "server.pem").string(), "--tls_key=" + (dir / "server.key").string(),
       "--auth_token_file=" + (dir / "binary-tokens").string()});
  const std::string address = server.ReadLineStartingWith("listening on ");
  ASSERT_FALSE(address.empty()) << server.Stderr();
  auto channel = TlsChannel(address, "ca.pem");
  EXPECT_TRUE(InfoCall(channel, old_token).ok());
  EXPECT_EQ(InfoCall(channel, wrong_token).error_code(), grpc::StatusCode::UNAUTHENTICATED);

  WriteFile(dir / "binary-tokens", "# rotated\n" + new_token + "\n");
  server.Signal(SIGHUP);
  bool rotated = false;
  for (int i = 0; i < 100 && !rotated; ++i) {
    rotated = InfoCall(channel, old_token).error_code() == grpc::StatusCode::UNAUTHENTICATED;
    if (!rotated) usleep(50'000);
  }
  EXPECT_TRUE(rotated) << "old token still accepted 5 s after SIGHUP";
  EXPECT_TRUE(InfoCall(channel, new_token).ok());
  const SessionResult session = RunOn(channel, SampleTensors(), new_token);
  EXPECT_TRUE(session.status.ok()) << session.status.error_message();

  // A broken file on SIGHUP keeps the current tokens.
  WriteFile(dir / "binary-tokens", "\n");
  server.Signal(SIGHUP);
  usleep(300'000);
  EXPECT_TRUE(InfoCall(channel, new_token).ok());

  channel.reset();  // an idle open connection would slow down the drain
  server.Signal(SIGTERM);
  EXPECT_EQ(server.Wait(), 0);
  const std::string log = server.Stderr();
  EXPECT_THAT(log, HasSubstr("SIGHUP: reloaded --auth_token_file"));
  EXPECT_THAT(log, HasSubstr("SIGHUP: tokens unchanged"));
  for (const std::string& token : {old_token, new_token, wrong_token}) {
    EXPECT_THAT(log, Not(HasSubstr(token)));
    EXPECT_THAT(log, Not(HasSubstr(token.substr(0, 10))));
  }
}

}  // namespace
}  // namespace nvfp4cal::server
