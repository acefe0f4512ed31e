// Helpers of the client tests: temporary folders, running the CLI binary and the server binary
// as child processes (killed by PID, never by name), comparing output folders byte for byte.
#ifndef NVFP4CAL_TESTS_CLIENT_TEST_UTIL_H_
#define NVFP4CAL_TESTS_CLIENT_TEST_UTIL_H_

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

extern char** environ;

namespace nvfp4cal::testing {

// A fresh folder under the test temp dir, removed at destruction.
class TempFolder {
 public:
  explicit TempFolder(const std::string& tag) {
    static int counter = 0;
    path_ = ::testing::TempDir() + "nvfp4cal_" + tag + "_" + std::to_string(getpid()) + "_" +
            std::to_string(counter++);
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempFolder() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

struct ProcessResult {
  int exit_code = -1;
  std::string out;
  std::string err;
  // The process was still running after the time limit and was killed (SIGKILL, by PID).
  bool timed_out = false;
};

// Starts `args` (args[0] is the binary) with stdout and stderr written to the given files
// (truncated; "/dev/null" to drop them) and stdin from /dev/null. The PID, or -1 (and a test
// failure) when it cannot start.
inline pid_t SpawnProcess(const std::vector<std::string>& args, const std::string& out_path,
                          const std::string& err_path) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int spawned = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (spawned != 0) {
    ADD_FAILURE() << "cannot start " << args[0];
    return -1;
  }
  return pid;
}

// Runs `args` (args[0] is the binary) to completion with stdout and stderr captured; with a
// positive `timeout_seconds`, a process still running then is killed and reported timed_out.
inline ProcessResult RunProcess(const std::vector<std::string>& args,
                                double timeout_seconds = 0.0) {
  const std::string base = ::testing::TempDir() + "nvfp4cal_proc_" + std::to_string(getpid());
  const std::string out_path = base + ".out";
  const std::string err_path = base + ".err";
  ProcessResult result;
  const pid_t pid = SpawnProcess(args, out_path, err_path);
  if (pid < 0) return result;
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
  while (timeout_seconds > 0.0 && waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      result.timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (timeout_seconds <= 0.0 || result.timed_out) waitpid(pid, &status, 0);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  result.out = ReadAll(out_path);
  result.err = ReadAll(err_path);
  std::remove(out_path.c_str());
  std::remove(err_path.c_str());
  return result;
}

// The nvfp4cal CLI with arguments; killed after `timeout_seconds` when positive.
inline ProcessResult RunCli(std::vector<std::string> args, double timeout_seconds = 0.0) {
  args.insert(args.begin(), NVFP4CAL_CLI_BINARY);
  return RunProcess(args, timeout_seconds);
}

// A real nvfp4cal-server on a free loopback port. Stopped (SIGTERM, then SIGKILL after 10 s)
// by PID at destruction.
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> extra_flags = {}) {
    std::vector<std::string> args = {NVFP4CAL_SERVER_BINARY, "--address=127.0.0.1:0",
                                     "--metrics_address=", "--cpu_threads_per_worker=1",
                                     "--drain_timeout=5s"};
    args.insert(args.end(), extra_flags.begin(), extra_flags.end());
    int fds[2];
    if (pipe(fds) != 0) {
      ADD_FAILURE() << "pipe failed";
      return;
    }
    err_path_ = ::testing::TempDir() + "nvfp4cal_server_" + std::to_string(getpid()) + "_" +
                std::to_string(reinterpret_cast<uintptr_t>(this)) + ".err";
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path_.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    out_ = fdopen(fds[0], "r");
    char line[512];
    while (pid_ > 0 && fgets(line, sizeof(line), out_) != nullptr) {
      std::string s(line);
      const std::string prefix = "listening on ";
      if (s.rfind(prefix, 0) == 0) {
        address_ = s.substr(prefix.size());
        while (!address_.empty() && (address_.back() == '\n' || address_.back() == '\r')) {
          address_.pop_back();
        }
        break;
      }
    }
    if (address_.empty()) ADD_FAILURE() << "server did not start: " << ReadAll(err_path_);
  }
  ~ServerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      int status = 0;
      bool exited = false;
      for (int i = 0; i < 1000 && !exited; ++i) {
        exited = waitpid(pid_, &status, WNOHANG) == pid_;
        if (!exited) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      if (!exited) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
      }
    }
    if (out_ != nullptr) fclose(out_);
    std::remove(err_path_.c_str());
  }
  const std::string& address() const { return address_; }
  // Kills the server at once (SIGKILL: no drain, connections reset) and reaps it.
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
  FILE* out_ = nullptr;
  std::string address_;
  std::string err_path_;
};

// Relative path -> bytes of every regular file under `dir`.
inline std::map<std::string, std::string> ReadTree(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) {
      files[std::filesystem::relative(e.path(), dir).string()] = ReadAll(e.path().string());
    }
  }
  return files;
}

// Files of the folder next to `path` whose names mark them as nvfp4cal temporary folders.
inline std::vector<std::string> LeftoverTempFolders(const std::string& path) {
  std::vector<std::string> found;
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  for (const auto& e : std::filesystem::directory_iterator(parent)) {
    const std::string name = e.path().filename().string();
    if (name.find(".nvfp4cal-tmp-") != std::string::npos ||
        name.find(".nvfp4cal-old-") != std::string::npos) {
      found.push_back(name);
    }
  }
  return found;
}

// Waits up to `timeout` for a run writing `out` to make its temporary folder beside it
// (".<name of out>.nvfp4cal-tmp-..."); its path, or "" when none appeared.
inline std::string WaitForTempFolder(const std::string& out, std::chrono::seconds timeout) {
  const std::filesystem::path target(out);
  const std::string prefix = "." + target.filename().string() + ".nvfp4cal-tmp-";
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    for (const auto& e : std::filesystem::directory_iterator(target.parent_path())) {
      if (e.path().filename().string().rfind(prefix, 0) == 0) return e.path().string();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return "";
}

}  // namespace nvfp4cal::testing

#endif  // NVFP4CAL_TESTS_CLIENT_TEST_UTIL_H_
