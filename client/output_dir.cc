#include "client/output_dir.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "client/checkpoint.h"
#include "common/file_util.h"
#include "nlohmann/json.hpp"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;

fs::path WithoutTrailingSlash(fs::path path) {
  while (!path.has_filename() && path.has_relative_path()) path = path.parent_path();
  return path;
}

// The absolute path, without a trailing slash.
fs::path Absolute(const std::string& path) {
  std::error_code ec;
  return WithoutTrailingSlash(fs::absolute(path, ec).lexically_normal());
}

// The absolute path with the symlinks of its existing part resolved (realpath-style).
fs::path Resolved(const std::string& path) {
  std::error_code ec;
  const fs::path resolved = fs::weakly_canonical(Absolute(path), ec);
  return ec ? Absolute(path) : WithoutTrailingSlash(resolved);
}

// Whether `inner` is `outer` or lies below it, by path components.
bool PathWithin(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i) {
    if (i == inner.end() || *i != *o) return false;
  }
  return true;
}

// Whether the existing folder `out` is `input` or one of its ancestors by device and inode, which
// catches what paths do not (bind mounts, hard-linked folders).
bool SameFileAsAncestor(const fs::path& out, fs::path input) {
  std::error_code ec;
  for (;;) {
    if (fs::equivalent(out, input, ec)) return true;
    if (!input.has_relative_path()) return false;
    input = input.parent_path();
  }
}

absl::Status CheckInputs(const OutputTarget& target) {
  const fs::path out = Resolved(target.out_dir);
  std::error_code ec;
  const bool out_exists = fs::exists(out, ec);
  for (const RunInput& input : target.inputs) {
    if (input.path.empty()) continue;
    const fs::path in = Resolved(input.path);
    if (!PathWithin(in, out) && !(out_exists && SameFileAsAncestor(out, in))) continue;
    const bool same = in == out || (out_exists && fs::equivalent(out, in, ec));
    const std::string via = out == Absolute(target.out_dir)
                                ? ""
                                : absl::StrCat(" (--out resolves to ", out.string(), ")");
    return absl::InvalidArgumentError(absl::StrCat(
        "--out ", target.out_dir, same ? " is " : " contains ", input.flag, " ", input.path, via,
        ": replacing --out would delete an input of the run; choose an --out "
        "outside the inputs"));
  }
  return absl::OkStatus();
}

absl::Status CheckExisting(const OutputTarget& target) {
  std::error_code ec;
  const std::string& out = target.out_dir;
  if (!fs::exists(fs::symlink_status(out, ec))) return absl::OkStatus();
  if (!fs::is_directory(fs::status(out, ec))) {  // a file, a dangling symlink, ...
    return absl::FailedPreconditionError(
        absl::StrCat("--out ", out, " exists and is not a folder; nvfp4cal replaces only folders"));
  }
  switch (target.overwrite) {
    case OverwritePolicy::kNever:
      return absl::FailedPreconditionError(
          absl::StrCat("--out ", out, " already exists; pass --overwrite to replace it"));
    case OverwritePolicy::kNvfp4calOutput:
      if (fs::is_empty(out, ec) || IsNvfp4calOutput(out)) return absl::OkStatus();
      return absl::FailedPreconditionError(absl::StrCat(
          "--out ", out, " exists and is not an nvfp4cal output (no ", kHfQuantConfigFileName,
          " or ", kProducerRecordFileName,
          " naming producer nvfp4cal); --overwrite replaces only nvfp4cal outputs: pass "
          "--overwrite-any to replace it anyway"));
    case OverwritePolicy::kAnything:
      return absl::OkStatus();
  }
  return absl::OkStatus();
}

// rename(2) that fails with EEXIST instead of replacing an empty folder that appeared meanwhile.
int RenameNoReplace(const std::string& from, const std::string& to) {
  if (renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) return 0;
  if (errno != EINVAL && errno != ENOSYS) return -1;  // else the filesystem lacks the flag
  return ::rename(from.c_str(), to.c_str());
}

// Moves the old output aside, the new one in, and removes the old one; the fallback where the
// filesystem cannot exchange two names atomically.
absl::Status ReplaceInTwoSteps(const std::string& temp, const std::string& out) {
  const std::string aside = temp + "-old";  // owner-named like temp: a later run cleans it up
  if (::rename(out.c_str(), aside.c_str()) != 0) {
    return absl::InternalError(
        absl::StrCat("cannot move the old --out ", out, " aside: ", std::strerror(errno)));
  }
  if (::rename(temp.c_str(), out.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::rename(aside.c_str(), out.c_str());
    return absl::InternalError(absl::StrCat("cannot rename ", temp, " to ", out, ": ", why));
  }
  return RemoveTree(aside);
}

}  // namespace

absl::Status CheckOutputFile(const std::string& flag, const std::string& path,
                             const std::vector<RunInput>& inputs) {
  const fs::path file = Resolved(path);
  std::error_code ec;
  const bool exists = fs::exists(file, ec);
  for (const RunInput& input : inputs) {
    if (input.path.empty()) continue;
    const fs::path in = Resolved(input.path);
    if (PathWithin(file, in) || (exists && fs::equivalent(file, in, ec))) {
      return absl::InvalidArgumentError(absl::StrCat(
          flag, " ", path, " is or lies inside ", input.flag, " ", input.path,
          ": writing it could overwrite an input of the run; choose a path outside the inputs"));
    }
  }
  if (exists && !fs::is_regular_file(file, ec)) {
    return absl::FailedPreconditionError(
        absl::StrCat(flag, " ", path, " exists and is not a regular file"));
  }
  // Checked now, so that a run of minutes does not end in "cannot create".
  const fs::path folder = file.parent_path();
  if (!fs::is_directory(folder, ec)) {
    return absl::FailedPreconditionError(
        absl::StrCat(flag, " ", path, ": its folder ", folder.string(), " does not exist"));
  }
  if (::access(folder.c_str(), W_OK) != 0) {
    return absl::PermissionDeniedError(absl::StrCat(flag, " ", path,
                                                    ": cannot write in its folder ",
                                                    folder.string(), ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

bool IsNvfp4calOutput(const std::string& dir) {
  for (const char* record : {kHfQuantConfigFileName, kProducerRecordFileName}) {
    absl::StatusOr<std::string> text = ReadTextFile((fs::path(dir) / record).string());
    if (!text.ok()) continue;
    const nlohmann::json json = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (json.is_object() && json.contains("producer") && json["producer"].is_object() &&
        json["producer"].value("name", "") == "nvfp4cal") {
      return true;
    }
  }
  return false;
}

absl::Status CheckOutputTarget(const OutputTarget& target) {
  if (target.out_dir.empty()) return absl::InvalidArgumentError("--out is required");
  absl::Status inputs = CheckInputs(target);
  if (!inputs.ok()) return inputs;
  return CheckExisting(target);
}

absl::Status ReplaceWithTempDir(const std::string& temp, const OutputTarget& target) {
  absl::Status allowed = CheckOutputTarget(target);
  if (!allowed.ok()) return allowed;
  const std::string& out = target.out_dir;
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(out, ec))) {
    if (RenameNoReplace(temp, out) == 0) return absl::OkStatus();
    if (errno == EEXIST || errno == ENOTEMPTY) {
      return absl::FailedPreconditionError(
          absl::StrCat("--out ", out, " appeared during the run; pass --overwrite to replace it"));
    }
    return absl::InternalError(
        absl::StrCat("cannot rename ", temp, " to ", out, ": ", std::strerror(errno)));
  }
  // After the exchange `temp` names the old output, which goes.
  if (renameat2(AT_FDCWD, temp.c_str(), AT_FDCWD, out.c_str(), RENAME_EXCHANGE) == 0) {
    return RemoveTree(temp);
  }
  if (errno == EINVAL || errno == ENOSYS) return ReplaceInTwoSteps(temp, out);
  return absl::InternalError(
      absl::StrCat("cannot exchange ", temp, " and ", out, ": ", std::strerror(errno)));
}

}  // namespace nvfp4cal
