// File helpers with absl::Status errors that name the path (client, server and tools). Every file
// they read is opened through ReadableFile::Open, which never blocks and accepts regular files
// only: a FIFO, socket, device or folder where a file is expected is an error naming the path and
// its type, not a hang in open() or a read that never ends.
//
//   absl::StatusOr<std::string> text = nvfp4cal::ReadTextFile(dir + "/config.json");
//   absl::StatusOr<nvfp4cal::ReadableFile> file = nvfp4cal::ReadableFile::Open(path);
//   // mmap(..., file->size(), ..., file->fd(), 0); the descriptor closes with `file`
//   absl::Status s = nvfp4cal::WriteTextFile(out + "/config.json", json_text);
#ifndef NVFP4CAL_COMMON_FILE_UTIL_H_
#define NVFP4CAL_COMMON_FILE_UTIL_H_

#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace nvfp4cal {

// A regular file open for reading; owns the descriptor.
class ReadableFile {
 public:
  // Opens `path` (symlinks followed) with O_NONBLOCK, so that a FIFO without a writer cannot
  // block the open, checks with fstat that it is a regular file and clears O_NONBLOCK.
  // NOT_FOUND when it does not exist, PERMISSION_DENIED when it cannot be opened, and
  // INVALID_ARGUMENT "PATH: is a FIFO (named pipe), not a regular file" (a directory, a socket,
  // a character device, a block device) for anything else.
  static absl::StatusOr<ReadableFile> Open(const std::string& path);

  ReadableFile(ReadableFile&& other) noexcept;
  ReadableFile& operator=(ReadableFile&& other) noexcept;
  ReadableFile(const ReadableFile&) = delete;
  ReadableFile& operator=(const ReadableFile&) = delete;
  ~ReadableFile();

  int fd() const { return fd_; }
  // Size at open time (0 for files of /proc, which are read to their end regardless).
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // The rest of the file, read to its end. INTERNAL naming the path on a read error.
  absl::StatusOr<std::string> ReadAll();

 private:
  ReadableFile(std::string path, int fd, int64_t size)
      : path_(std::move(path)), fd_(fd), size_(size) {}

  std::string path_;
  int fd_ = -1;
  int64_t size_ = 0;
};

// The whole file, opened with ReadableFile::Open (same errors).
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

// Creates or truncates `path` with `text` and flushes it to disk.
absl::Status WriteTextFile(const std::string& path, const std::string& text);

// WriteTextFile into `path`.nvfp4cal-tmp-PID, then renamed onto `path`: a reader (or a run
// killed meanwhile) sees the old file or the whole new one, never a part.
absl::Status ReplaceTextFile(const std::string& path, const std::string& text);

// Copies a file or a folder (recursively, symlinks followed) to `to`, which must not exist.
// Files are read through ReadableFile::Open: a FIFO, socket or device anywhere in `from` is an
// error naming it.
absl::Status CopyPath(const std::string& from, const std::string& to);

// Removes a file or folder tree; OK when it does not exist.
absl::Status RemoveTree(const std::string& path);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_COMMON_FILE_UTIL_H_
