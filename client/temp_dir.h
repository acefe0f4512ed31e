// Temporary output folders beside --out, named after the process that owns them, so that a later
// run can tell a folder left behind by a killed run from one that a running process still fills.
//
// Name: `.<out name>.nvfp4cal-tmp-<pid>-<start>-<pidns>-<boot>-XXXXXX`: the owner's PID, its
// start time in clock ticks after boot (field 22 of /proc/<pid>/stat, so a reused PID is not
// mistaken for the owner), the inode number of its PID namespace and the first 8 hex digits of
// the boot id (a PID names a process only within one namespace of one boot), then mkdtemp's
// random part. Where /proc cannot tell these, the owner part is left out.
//
//   absl::StatusOr<std::string> temp = nvfp4cal::MakeTempDirBeside("/models/llama-nvfp4");
//   for (const nvfp4cal::TempDirCleanup& c : nvfp4cal::CleanTempDirsBeside("/models/llama-nvfp4"))
//     if (c.owner == nvfp4cal::TempDirCleanup::Owner::kGone) ...  // removed (c.removed says)
#ifndef NVFP4CAL_CLIENT_TEMP_DIR_H_
#define NVFP4CAL_CLIENT_TEMP_DIR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace nvfp4cal {

// Creates an empty folder next to `path` (same parent, so a rename onto `path` is atomic),
// named as above, with the usual permissions (umask applied). Creates the parent when missing.
absl::StatusOr<std::string> MakeTempDirBeside(const std::string& path);

// Whether `file_name` is one of a temporary folder (of any --out): such folders are never inputs.
bool IsTempDirName(const std::string& file_name);

// One temporary folder of an --out found by CleanTempDirsBeside.
struct TempDirCleanup {
  enum class Owner {
    kGone,       // its owner has exited: the folder was removed (see `removed`)
    kRunning,    // its owner still runs (a concurrent run): left alone
    kElsewhere,  // owned in another PID namespace or boot (another machine or container, or
                 // before a reboot): cannot be judged from here, left alone
    kOtherUser,  // belongs to another user: left alone
    kUnknown,    // its name carries no owner (another tool, an older nvfp4cal): left alone
  };
  std::string path;
  Owner owner = Owner::kUnknown;
  // The owner's PID when the name carries one.
  int64_t pid = 0;
  // Outcome of removing a kGone folder.
  absl::Status removed;
};

// Finds the temporary folders of `out_dir` (entries `.<name>.nvfp4cal-tmp-*` beside it, and
// `<name>.nvfp4cal-old-*` of older versions) and removes those whose owner is gone. One record
// per folder found, in name order. Never touches the folders of another --out.
std::vector<TempDirCleanup> CleanTempDirsBeside(const std::string& out_dir);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_TEMP_DIR_H_
