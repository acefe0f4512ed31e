#include "client/file_util.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>
#include <vector>

#include "absl/strings/str_cat.h"

namespace nvfp4cal {

namespace fs = std::filesystem;

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot open"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::InternalError(absl::StrCat(path, ": read failed"));
  return text.str();
}

absl::Status WriteTextFile(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::PermissionDeniedError(
        absl::StrCat(path, ": cannot create: ", std::strerror(errno)));
  }
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": write failed: ", std::strerror(errno)));
    }
    done += static_cast<size_t>(n);
  }
  const bool synced = ::fsync(fd) == 0;
  if (::close(fd) != 0 || !synced) {
    return absl::InternalError(absl::StrCat(path, ": flush failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status CopyPath(const std::string& from, const std::string& to) {
  std::error_code ec;
  fs::copy(from, to, fs::copy_options::recursive, ec);
  if (ec) return absl::InternalError(absl::StrCat("copy ", from, " -> ", to, ": ", ec.message()));
  return absl::OkStatus();
}

absl::StatusOr<std::string> MakeTempDirBeside(const std::string& path) {
  fs::path target = fs::absolute(fs::path(path)).lexically_normal();
  if (!target.has_filename()) target = target.parent_path();
  std::error_code ec;
  fs::create_directories(target.parent_path(), ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat(target.parent_path().string(), ": cannot create: ", ec.message()));
  }
  std::string templ =
      (target.parent_path() / ("." + target.filename().string() + ".nvfp4cal-tmp-XXXXXX")).string();
  std::vector<char> buffer(templ.begin(), templ.end());
  buffer.push_back('\0');
  if (mkdtemp(buffer.data()) == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat(templ, ": cannot create a temporary folder: ", std::strerror(errno)));
  }
  // mkdtemp makes the folder 0700; the output should get the usual permissions.
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::chmod(buffer.data(), 0777 & ~mask);
  return std::string(buffer.data());
}

absl::Status RemoveTree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) return absl::InternalError(absl::StrCat(path, ": cannot remove: ", ec.message()));
  return absl::OkStatus();
}

}  // namespace nvfp4cal
