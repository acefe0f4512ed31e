// Server failures during a CLI run with several servers: one server SIGKILLed mid-run and
// restarted on the same port (its tensors go to the others, the output is byte-identical to
// in-process), and every server killed (the CLI fails with exit 1 naming a server, and leaves
// neither an output folder nor a temporary one).
#include <sys/wait.h>

#include <chrono>
#include <filesystem>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/client/test_util.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using ::nvfp4cal::testing::LeftoverTempFolders;
using ::nvfp4cal::testing::ProcessResult;
using ::nvfp4cal::testing::ReadTree;
using ::nvfp4cal::testing::RunCli;
using ::nvfp4cal::testing::ServerProcess;
using ::nvfp4cal::testing::TempFolder;
using ::testing::HasSubstr;

class ServerFaults : public ::testing::Test {
 protected:
  void SetUp() override {
    // Large enough that a remote run takes seconds on one CPU thread per server.
    ASSERT_EQ(RunCli({"example", "--out", dir_ / "model", "--layers", "6", "--hidden", "512",
                      "--intermediate", "1376"})
                  .exit_code,
              0);
  }

  std::vector<std::string> Quantize(const std::string& out, std::vector<std::string> extra) {
    // mse: seconds per run on one CPU thread per server, enough to kill servers mid-run (dss
    // took a minute per run and made these the slowest tests of the suite).
    std::vector<std::string> args = {
        "quantize", "--model",  dir_ / "model", "--hessians", dir_ / "model/hessians.safetensors",
        "--out",    dir_ / out, "--method",     "mse",        "--quiet"};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }

  static std::string PortOf(const std::string& address) {
    return address.substr(address.rfind(':') + 1);
  }

  TempFolder dir_{"faults"};
};

TEST_F(ServerFaults, KilledAndRestartedServerIsRoutedAroundAndOutputIsComplete) {
  ServerProcess a({"--cpu_threads_per_worker=1"});
  ServerProcess b({"--cpu_threads_per_worker=1"});
  auto c = std::make_unique<ServerProcess>(std::vector<std::string>{"--cpu_threads_per_worker=1"});
  const std::string c_address = c->address();
  const std::string servers = a.address() + "," + b.address() + "," + c_address;
  auto run = std::async(std::launch::async, [&] {
    return RunCli(Quantize("remote", {"--server", servers, "--retries", "6"}));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  ASSERT_EQ(run.wait_for(std::chrono::seconds(0)), std::future_status::timeout)
      << "the run ended before the server could be killed";
  c->Kill();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  c = std::make_unique<ServerProcess>(
      std::vector<std::string>{"--cpu_threads_per_worker=1", "--address=" + c_address});
  EXPECT_EQ(c->address(), c_address);
  const ProcessResult r = run.get();
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // The in-process reference, after the remote run (it would compete with the servers for the
  // CPU and stretch the window in which the run must still be going).
  const ProcessResult in_process = RunCli(Quantize("local", {}));
  ASSERT_EQ(in_process.exit_code, 0) << in_process.err;
  const auto local = ReadTree(dir_ / "local");
  const auto remote = ReadTree(dir_ / "remote");
  ASSERT_EQ(local.size(), remote.size());
  for (const auto& [name, bytes] : local) {
    ASSERT_EQ(remote.count(name), 1u) << name;
    EXPECT_TRUE(remote.at(name) == bytes) << name << " differs";
  }
  EXPECT_THAT(LeftoverTempFolders(dir_ / "remote"), ::testing::IsEmpty());
}

TEST_F(ServerFaults, EveryServerKilledFailsCleanlyWithoutAnOutputFolder) {
  ServerProcess a({"--cpu_threads_per_worker=1"});
  ServerProcess b({"--cpu_threads_per_worker=1"});
  const std::string servers = a.address() + "," + b.address();
  auto run = std::async(std::launch::async, [&] {
    return RunCli(Quantize("remote", {"--server", servers, "--retries", "2"}));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  ASSERT_EQ(run.wait_for(std::chrono::seconds(0)), std::future_status::timeout)
      << "the run ended before the servers could be killed";
  a.Kill();
  b.Kill();
  const ProcessResult r = run.get();
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("nvfp4cal quantize: error: "));
  EXPECT_THAT(r.err, ::testing::AnyOf(HasSubstr(a.address()), HasSubstr(b.address())));
  EXPECT_FALSE(fs::exists(dir_ / "remote"));
  EXPECT_THAT(LeftoverTempFolders(dir_ / "remote"), ::testing::IsEmpty());
}

}  // namespace
}  // namespace nvfp4cal
