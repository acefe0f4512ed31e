// The nvfp4cal binary and its --out folder (docs/cli.md "Output folder"): an --out that is or
// contains an input of the run is refused, symlinks resolved, whatever the switches;
// --overwrite replaces only a folder an nvfp4cal command wrote and --overwrite-any any folder;
// temporary folders left by killed runs are removed by the next run beside the same --out
// when their owner is gone, and left alone (and named) otherwise.
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/client/test_util.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using ::nvfp4cal::testing::ProcessResult;
using ::nvfp4cal::testing::ReadAll;
using ::nvfp4cal::testing::RunCli;
using ::nvfp4cal::testing::SpawnProcess;
using ::nvfp4cal::testing::TempFolder;
using ::nvfp4cal::testing::WaitForTempFolder;
using ::nvfp4cal::testing::WriteAll;
using ::testing::HasSubstr;
using ::testing::Not;

// Options of `example` for a model small enough to quantize in a blink.
std::vector<std::string> SmallExample(const std::string& out) {
  return {"example", "--out",          out,   "--layers", "1", "--hidden",
          "64",      "--intermediate", "128", "--vocab",  "64"};
}

std::vector<std::string> With(std::vector<std::string> args,
                              const std::vector<std::string>& extra) {
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

// A model folder parent/model (with its Hessians inside) from `example`.
class OutputFolder : public ::testing::Test {
 protected:
  void SetUp() override {
    parent_ = dir_ / "parent";
    model_ = parent_ + "/model";
    hessians_ = model_ + "/hessians.safetensors";
    const ProcessResult r = RunCli(SmallExample(model_));
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  std::vector<std::string> Quantize(const std::string& out) const {
    return {"quantize", "--model", model_,     "--hessians", hessians_,
            "--out",    out,       "--method", "max",        "--quiet"};
  }

  // The model folder is complete: the run did not touch it.
  void ExpectModelIntact() const {
    EXPECT_TRUE(fs::exists(model_ + "/model.safetensors"));
    EXPECT_TRUE(fs::exists(model_ + "/config.json"));
    EXPECT_TRUE(fs::exists(hessians_));
  }

  TempFolder dir_{"cli_output"};
  std::string parent_, model_, hessians_;
};

TEST_F(OutputFolder, QuantizeRefusesAnOutThatIsOrContainsAnInput) {
  for (const char* overwrite : {"--overwrite", "--overwrite-any"}) {
    // --out is the model's parent: replacing it would delete the model.
    ProcessResult r = RunCli(With(Quantize(parent_), {overwrite}));
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_THAT(r.err, HasSubstr("--out " + parent_ + " contains --model " + model_));
    ExpectModelIntact();
    // --out is the model folder itself.
    r = RunCli(With(Quantize(model_), {overwrite}));
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_THAT(r.err, HasSubstr("--out " + model_ + " is --model " + model_));
    ExpectModelIntact();
  }
  // A symlink to the parent resolves to it.
  const std::string link = dir_ / "link";
  fs::create_directory_symlink(parent_, link);
  ProcessResult r = RunCli(With(Quantize(link), {"--overwrite-any"}));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("--out " + link + " contains --model " + model_));
  EXPECT_THAT(r.err, HasSubstr("(--out resolves to " + fs::canonical(parent_).string()));
  ExpectModelIntact();
  EXPECT_TRUE(fs::is_symlink(link));

  // The Hessians file outside the model folder.
  const std::string hessians_dir = dir_ / "hessians";
  fs::create_directories(hessians_dir);
  fs::copy_file(hessians_, hessians_dir + "/h.safetensors");
  hessians_ = hessians_dir + "/h.safetensors";
  r = RunCli(With(Quantize(hessians_dir), {"--overwrite-any"}));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("--out " + hessians_dir + " contains --hessians " + hessians_));
  EXPECT_TRUE(fs::exists(hessians_));

  // Files of the remote options: checked before any server is contacted.
  const std::string secrets = dir_ / "secrets";
  fs::create_directories(secrets);
  WriteAll(secrets + "/token", "secret-token\n");
  r = RunCli(With(Quantize(secrets), {"--overwrite-any", "--server", "127.0.0.1:1", "--retries",
                                      "1", "--token-file", secrets + "/token"}));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err,
              HasSubstr("--out " + secrets + " contains --token-file " + secrets + "/token"));
  EXPECT_EQ(ReadAll(secrets + "/token"), "secret-token\n");
}

TEST_F(OutputFolder, DequantizeRefusesAnOutThatIsOrContainsItsIn) {
  const std::string quantized = parent_ + "/q";
  ProcessResult r = RunCli(Quantize(quantized));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunCli({"dequantize", "--in", quantized, "--out", parent_, "--overwrite-any"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("--out " + parent_ + " contains --in " + quantized));
  r = RunCli({"dequantize", "--in", quantized, "--out", quantized, "--overwrite"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("--out " + quantized + " is --in " + quantized));
  EXPECT_TRUE(fs::exists(quantized + "/model.safetensors"));
  ExpectModelIntact();
}

TEST_F(OutputFolder, OverwriteReplacesOnlyWhatAnNvfp4calCommandWrote) {
  // Each command's own earlier output is replaced with --overwrite.
  const std::string example = dir_ / "example";
  const std::string quantized = dir_ / "q";
  const std::string dense = dir_ / "d";
  const std::vector<std::vector<std::string>> commands = {
      SmallExample(example),
      Quantize(quantized),
      {"dequantize", "--in", quantized, "--out", dense}};
  for (const std::vector<std::string>& command : commands) {
    ProcessResult r = RunCli(command);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = RunCli(command);
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_THAT(r.err, HasSubstr("already exists; pass --overwrite to replace it"));
    r = RunCli(With(command, {"--overwrite"}));
    EXPECT_EQ(r.exit_code, 0) << command[0] << ": " << r.err;
  }
  // An output of another command is an nvfp4cal output too.
  ProcessResult r = RunCli(With(SmallExample(quantized), {"--overwrite"}));
  EXPECT_EQ(r.exit_code, 0) << r.err;

  // A folder of the user's is not replaced with --overwrite, only with --overwrite-any.
  const std::string data = dir_ / "data";
  for (const std::vector<std::string>& command :
       {SmallExample(data), Quantize(data), {"dequantize", "--in", dir_ / "q2", "--out", data}}) {
    if (command[0] == "dequantize") {
      ASSERT_EQ(RunCli(Quantize(dir_ / "q2")).exit_code, 0);
    }
    fs::create_directories(data);
    WriteAll(data + "/notes.txt", "mine");
    r = RunCli(With(command, {"--overwrite"}));
    EXPECT_EQ(r.exit_code, 1) << command[0];
    EXPECT_THAT(r.err, HasSubstr("--out " + data +
                                 " exists and is not an nvfp4cal output (no hf_quant_config.json "
                                 "or nvfp4cal.json naming producer nvfp4cal); --overwrite "
                                 "replaces only nvfp4cal outputs: pass --overwrite-any"));
    EXPECT_EQ(ReadAll(data + "/notes.txt"), "mine");
    r = RunCli(With(command, {"--overwrite-any"}));
    EXPECT_EQ(r.exit_code, 0) << command[0] << ": " << r.err;
    EXPECT_FALSE(fs::exists(data + "/notes.txt"));
    fs::remove_all(data);
  }

  // An empty folder holds nothing to lose.
  fs::create_directories(data);
  r = RunCli(With(SmallExample(data), {"--overwrite"}));
  EXPECT_EQ(r.exit_code, 0) << r.err;

  // A file is never replaced by an output folder.
  const std::string file = dir_ / "file";
  WriteAll(file, "keep");
  r = RunCli(With(SmallExample(file), {"--overwrite-any"}));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("--out " + file + " exists and is not a folder"));
  EXPECT_EQ(ReadAll(file), "keep");
}

TEST(Cli, EveryWritingCommandListsOverwriteAny) {
  for (const char* command : {"quantize", "example", "dequantize"}) {
    const ProcessResult help = RunCli({command, "--help"});
    EXPECT_THAT(help.out, HasSubstr("--overwrite-any")) << command;
  }
}

// The start time of a process in clock ticks after boot (/proc/PID/stat field 22).
std::string StartTicks(pid_t pid) {
  const std::string stat = ReadAll("/proc/" + std::to_string(pid) + "/stat");
  std::istringstream fields(stat.substr(stat.rfind(')') + 2));
  std::string field;
  for (int i = 3; i <= 22; ++i) fields >> field;
  return field;
}

// The owner part of a temporary folder's name (docs/cli.md): PID, start ticks, PID namespace
// inode, first 8 hex digits of the boot id.
std::string OwnerToken(pid_t pid, const std::string& start_ticks,
                       std::string boot = std::string()) {
  const std::string ns = fs::read_symlink("/proc/self/ns/pid").string();  // "pid:[4026531836]"
  if (boot.empty()) boot = ReadAll("/proc/sys/kernel/random/boot_id").substr(0, 8);
  return std::to_string(pid) + "-" + start_ticks + "-" +
         ns.substr(ns.find('[') + 1, ns.find(']') - ns.find('[') - 1) + "-" + boot;
}

// A process that has ended: its PID and start ticks.
std::pair<pid_t, std::string> EndedProcess() {
  const char* argv[] = {"/bin/sleep", "30", nullptr};
  pid_t pid = -1;
  EXPECT_EQ(posix_spawn(&pid, argv[0], nullptr, nullptr, const_cast<char**>(argv), environ), 0);
  const std::string start = StartTicks(pid);
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  return {pid, start};
}

TEST(StaleTemporaryFolders, TheNextRunRemovesThoseWhoseOwnerIsGone) {
  TempFolder dir("stale");
  const std::string out = dir / "ex";
  const auto [dead_pid, dead_start] = EndedProcess();
  const std::string me = std::to_string(getpid());
  const std::string my_start = StartTicks(getpid());
  const std::string reused_start = std::to_string(std::stoull(my_start) + 1);
  const std::string dead =
      dir / (".ex.nvfp4cal-tmp-" + OwnerToken(dead_pid, dead_start) + "-a1B2c3");
  // This PID, but another start time: the owner's PID was reused.
  const std::string reused =
      dir / (".ex.nvfp4cal-tmp-" + OwnerToken(getpid(), reused_start) + "-d4E5f6");
  const std::string live = dir / (".ex.nvfp4cal-tmp-" + OwnerToken(getpid(), my_start) + "-g7H8i9");
  const std::string elsewhere =
      dir / (".ex.nvfp4cal-tmp-" + OwnerToken(getpid(), my_start, "00000000") + "-j1K2l3");
  const std::string foreign = dir / ".ex.nvfp4cal-tmp-Qx7abc";
  const std::string other_out =
      dir / (".other.nvfp4cal-tmp-" + OwnerToken(dead_pid, dead_start) + "-m4N5o6");
  for (const std::string& folder : {dead, reused, live, elsewhere, foreign, other_out}) {
    fs::create_directories(folder + "/sub");
    WriteAll(folder + "/sub/model.safetensors", "partial");
  }

  const ProcessResult r = RunCli(SmallExample(out));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_FALSE(fs::exists(reused));
  EXPECT_THAT(r.err,
              HasSubstr("nvfp4cal example: removed stale temporary folder " + dead +
                        " (its owner, process " + std::to_string(dead_pid) + ", is gone)\n"));
  EXPECT_THAT(r.err, HasSubstr("nvfp4cal example: removed stale temporary folder " + reused +
                               " (its owner, process " + me + ", is gone)\n"));
  // Alive, or not judged from here: left alone and named.
  EXPECT_TRUE(fs::exists(live + "/sub/model.safetensors"));
  EXPECT_THAT(
      r.err, HasSubstr("note: left " + live + ": its owner, process " + me + ", is still running"));
  EXPECT_TRUE(fs::exists(elsewhere + "/sub/model.safetensors"));
  EXPECT_THAT(r.err, HasSubstr("note: left " + elsewhere + ": its owner, process " + me +
                               ", ran on another machine, container or boot"));
  EXPECT_TRUE(fs::exists(foreign + "/sub/model.safetensors"));
  EXPECT_THAT(r.err, HasSubstr("note: left " + foreign +
                               ": its owner cannot be told from the name; remove it by hand "
                               "when no nvfp4cal run writes " +
                               out));
  // Another --out's folders are not this run's business.
  EXPECT_TRUE(fs::exists(other_out));
  EXPECT_THAT(r.err, Not(HasSubstr(other_out)));
  // The run's own temporary folder is gone too: only the ones above remain.
  size_t left = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) {
    left += e.path().filename().string().find(".nvfp4cal-tmp-") != std::string::npos;
  }
  EXPECT_EQ(left, 4u);
}

// A loopback TCP port that accepts connections into its backlog and never answers: a gRPC
// client waits on it.
class SilentListener {
 public:
  SilentListener() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (bind(fd_, reinterpret_cast<sockaddr*>(&addr), len) != 0 || listen(fd_, 16) != 0 ||
        getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ADD_FAILURE() << "cannot listen on loopback";
    }
    port_ = ntohs(addr.sin_port);
  }
  ~SilentListener() { close(fd_); }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  int fd_ = -1;
  int port_ = 0;
};

TEST_F(OutputFolder, ARunKilledMidwayLeavesAFolderTheNextRunRemoves) {
  const std::string out = dir_ / "q";
  SilentListener server;
  std::vector<std::string> args = With(Quantize(out), {"--server", server.address()});
  args.insert(args.begin(), NVFP4CAL_CLI_BINARY);
  const pid_t pid = SpawnProcess(args, "/dev/null", "/dev/null");
  ASSERT_GT(pid, 0);
  // The run writes into its temporary folder, then waits on the silent server: kill it there.
  const std::string temp = WaitForTempFolder(out, std::chrono::seconds(30));
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_FALSE(temp.empty()) << "the run never made its temporary folder";
  ASSERT_TRUE(fs::exists(temp));
  EXPECT_FALSE(fs::exists(out));

  const ProcessResult r = RunCli(Quantize(out));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("nvfp4cal quantize: removed stale temporary folder " + temp +
                               " (its owner, process " + std::to_string(pid) + ", is gone)"));
  EXPECT_FALSE(fs::exists(temp));
  EXPECT_TRUE(fs::exists(out + "/model.safetensors"));
  EXPECT_THAT(testing::LeftoverTempFolders(out), ::testing::IsEmpty());
}

// SIGINT or SIGTERM while tensors are being copied and quantized: the run stops at the next
// tensor with "interrupted", exit 1, and leaves neither the output nor its temporary folder.
TEST_F(OutputFolder, StopSignalMidRunLeavesNothing) {
  const std::string big = dir_ / "big";
  const ProcessResult made =
      RunCli({"example", "--out", big, "--layers", "2", "--hidden", "512", "--intermediate", "1408",
              "--heads", "8", "--kv-heads", "2", "--vocab", "4096"});
  ASSERT_EQ(made.exit_code, 0) << made.err;
  for (const int sig : {SIGINT, SIGTERM}) {
    const std::string out = dir_ / ("stopped" + std::to_string(sig));
    const std::string err = dir_ / ("stopped" + std::to_string(sig) + ".err");
    std::vector<std::string> args = {NVFP4CAL_CLI_BINARY,
                                     "quantize",
                                     "--model",
                                     big,
                                     "--hessians",
                                     big + "/hessians.safetensors",
                                     "--out",
                                     out,
                                     "--method",
                                     "dss",
                                     "--device",
                                     "cpu",
                                     "--threads",
                                     "1",
                                     "--quiet"};
    const pid_t pid = SpawnProcess(args, "/dev/null", err);
    ASSERT_GT(pid, 0);
    // Signal once the run writes into its temporary folder (the untouched tensors' copy and the
    // search are under way).
    const bool started = !WaitForTempFolder(out, std::chrono::seconds(30)).empty();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    kill(pid, sig);
    int status = 0;
    waitpid(pid, &status, 0);
    ASSERT_TRUE(started) << "the run never made its temporary folder";
    ASSERT_TRUE(WIFEXITED(status)) << "signal " << sig << " killed the process";
    EXPECT_EQ(WEXITSTATUS(status), 1);
    EXPECT_THAT(ReadAll(err), HasSubstr("interrupted"));
    EXPECT_FALSE(fs::exists(out));
    EXPECT_THAT(testing::LeftoverTempFolders(out), ::testing::IsEmpty());
  }
}

}  // namespace
}  // namespace nvfp4cal
