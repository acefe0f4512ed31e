// ServerProcess: the real nvfp4cal-server binary as a child process, for tests that need the
// process itself (flags, signals, exit codes, start-up log) or that must not share an address
// space with the server (the reflection client). Stdout is read line by line; stderr goes to a
// temporary file that Stderr() returns.
//
//   ServerProcess server({NVFP4CAL_SERVER_BINARY, "--address=127.0.0.1:0", "--metrics_address="});
//   const std::string address = server.ReadLineStartingWith("listening on ");
//   ...
//   server.Signal(SIGTERM);
//   EXPECT_EQ(server.Wait(), 0);
#ifndef NVFP4CAL_TESTS_SERVER_SERVER_PROCESS_H_
#define NVFP4CAL_TESTS_SERVER_SERVER_PROCESS_H_

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

extern char** environ;

namespace nvfp4cal::server::testing {

class ServerProcess {
 public:
  explicit ServerProcess(const std::vector<std::string>& args) {
    char stderr_template[] = "/tmp/nvfp4cal-server-stderr-XXXXXX";
    const int stderr_fd = mkstemp(stderr_template);
    EXPECT_GE(stderr_fd, 0);
    stderr_path_ = stderr_template;
    int fds[2];
    EXPECT_EQ(pipe(fds), 0);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_adddup2(&actions, stderr_fd, STDERR_FILENO);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    EXPECT_EQ(posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    close(stderr_fd);
    out_ = fdopen(fds[0], "r");
  }
  ~ServerProcess() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_ != nullptr) fclose(out_);
    if (!stderr_path_.empty()) unlink(stderr_path_.c_str());
  }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  // Returns the next stdout line starting with `prefix` (without it), or "" at EOF.
  std::string ReadLineStartingWith(const std::string& prefix) {
    char line[512];
    while (fgets(line, sizeof(line), out_) != nullptr) {
      std::string s(line);
      if (s.rfind(prefix, 0) == 0) {
        s = s.substr(prefix.size());
        while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
        return s;
      }
    }
    return "";
  }
  void Signal(int signal) { kill(pid_, signal); }
  // Waits for the exit; the exit code, or -1 when killed by a signal.
  int Wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    reaped_ = true;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  // What the process wrote to stderr so far (complete once Wait returned).
  std::string Stderr() const {
    std::ifstream in(stderr_path_);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  FILE* out_ = nullptr;
  std::string stderr_path_;
};

}  // namespace nvfp4cal::server::testing

#endif  // NVFP4CAL_TESTS_SERVER_SERVER_PROCESS_H_
