#include "common/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <vector>

#include "absl/strings/str_cat.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;

std::string ErrnoText() { return std::strerror(errno); }

// "a FIFO (named pipe)", ... for the st_mode of something that is not a regular file.
std::string FileTypeName(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return absl::StrCat("of file type 0", mode & S_IFMT);
}

// Writes all of `data` to `fd`, retrying interrupted and partial writes.
bool WriteFully(int fd, const char* data, size_t size) {
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// Copies one regular file (permission bits kept); `to` must not exist.
absl::Status CopyFile(const std::string& from, const std::string& to) {
  absl::StatusOr<ReadableFile> in = ReadableFile::Open(from);
  if (!in.ok()) return in.status();
  struct stat st;
  const mode_t mode = fstat(in->fd(), &st) == 0 ? (st.st_mode & 07777) : 0644;
  const int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (out < 0) {
    return absl::PermissionDeniedError(absl::StrCat(to, ": cannot create: ", ErrnoText()));
  }
  std::vector<char> buffer(1 << 20);
  for (;;) {
    const ssize_t n = ::read(in->fd(), buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const std::string why = ErrnoText();
      ::close(out);
      return absl::InternalError(absl::StrCat(from, ": read failed: ", why));
    }
    if (n == 0) break;
    if (!WriteFully(out, buffer.data(), static_cast<size_t>(n))) {
      const std::string why = ErrnoText();
      ::close(out);
      return absl::InternalError(absl::StrCat(to, ": write failed: ", why));
    }
  }
  if (::close(out) != 0) {
    return absl::InternalError(absl::StrCat(to, ": write failed: ", ErrnoText()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ReadableFile> ReadableFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) {
    const std::string message = absl::StrCat(path, ": cannot open: ", ErrnoText());
    return errno == ENOENT ? absl::NotFoundError(message) : absl::PermissionDeniedError(message);
  }
  ReadableFile file(path, fd, 0);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    return absl::InternalError(absl::StrCat(path, ": cannot stat: ", ErrnoText()));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": is ", FileTypeName(st.st_mode), ", not a regular file"));
  }
  const int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    return absl::InternalError(absl::StrCat(path, ": fcntl failed: ", ErrnoText()));
  }
  file.size_ = static_cast<int64_t>(st.st_size);
  return file;
}

ReadableFile::ReadableFile(ReadableFile&& other) noexcept
    : path_(std::move(other.path_)), fd_(other.fd_), size_(other.size_) {
  other.fd_ = -1;
}

ReadableFile& ReadableFile::operator=(ReadableFile&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(other.path_);
    fd_ = other.fd_;
    size_ = other.size_;
    other.fd_ = -1;
  }
  return *this;
}

ReadableFile::~ReadableFile() {
  if (fd_ >= 0) ::close(fd_);
}

absl::StatusOr<std::string> ReadableFile::ReadAll() {
  std::string text;
  text.reserve(static_cast<size_t>(size_));
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd_, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::InternalError(absl::StrCat(path_, ": read failed: ", ErrnoText()));
    if (n == 0) return text;
    text.append(buffer, static_cast<size_t>(n));
  }
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  absl::StatusOr<ReadableFile> file = ReadableFile::Open(path);
  if (!file.ok()) return file.status();
  return file->ReadAll();
}

absl::Status WriteTextFile(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::PermissionDeniedError(absl::StrCat(path, ": cannot create: ", ErrnoText()));
  }
  if (!WriteFully(fd, text.data(), text.size())) {
    const std::string why = ErrnoText();
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": write failed: ", why));
  }
  const bool synced = ::fsync(fd) == 0;
  if (::close(fd) != 0 || !synced) {
    return absl::InternalError(absl::StrCat(path, ": flush failed: ", ErrnoText()));
  }
  return absl::OkStatus();
}

absl::Status ReplaceTextFile(const std::string& path, const std::string& text) {
  const std::string temp = absl::StrCat(path, ".nvfp4cal-tmp-", ::getpid());
  if (absl::Status written = WriteTextFile(temp, text); !written.ok()) {
    ::unlink(temp.c_str());
    return written;
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const std::string why = ErrnoText();
    ::unlink(temp.c_str());
    return absl::InternalError(absl::StrCat(path, ": cannot rename ", temp, " onto it: ", why));
  }
  return absl::OkStatus();
}

absl::Status CopyPath(const std::string& from, const std::string& to) {
  std::error_code ec;
  if (!fs::is_directory(from, ec)) return CopyFile(from, to);
  const bool created = fs::create_directory(to, from, ec);  // with the permissions of `from`
  if (ec || !created) {
    return absl::PermissionDeniedError(
        absl::StrCat(to, ": cannot create: ", ec ? ec.message() : "it exists"));
  }
  for (const fs::directory_entry& e : fs::directory_iterator(from, ec)) {
    absl::Status copied =
        CopyPath(e.path().string(), (fs::path(to) / e.path().filename()).string());
    if (!copied.ok()) return copied;
  }
  if (ec) return absl::InternalError(absl::StrCat(from, ": cannot list: ", ec.message()));
  return absl::OkStatus();
}

absl::Status RemoveTree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) return absl::InternalError(absl::StrCat(path, ": cannot remove: ", ec.message()));
  return absl::OkStatus();
}

}  // namespace nvfp4cal
