// Small file helpers of the client with absl::Status errors that name the path.
//
//   absl::StatusOr<std::string> text = nvfp4cal::ReadTextFile(dir + "/config.json");
//   absl::Status s = nvfp4cal::WriteTextFile(out + "/config.json", json_text);
//   absl::StatusOr<std::string> tmp = nvfp4cal::MakeTempDirBeside("/models/out");
#ifndef NVFP4CAL_CLIENT_FILE_UTIL_H_
#define NVFP4CAL_CLIENT_FILE_UTIL_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace nvfp4cal {

// The whole file. NOT_FOUND when it does not exist.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

// Creates or truncates `path` with `text` and flushes it to disk.
absl::Status WriteTextFile(const std::string& path, const std::string& text);

// Copies a file or a folder (recursively) to `to`, which must not exist.
absl::Status CopyPath(const std::string& from, const std::string& to);

// Creates an empty folder next to `path` (same parent, so a rename onto `path` is atomic),
// named ".<name>.nvfp4cal-tmp-XXXXXX". Creates the parent when missing.
absl::StatusOr<std::string> MakeTempDirBeside(const std::string& path);

// Removes a file or folder tree; OK when it does not exist.
absl::Status RemoveTree(const std::string& path);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_FILE_UTIL_H_
