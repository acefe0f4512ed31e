// The --out folder of the commands that write one (quantize, dequantize, example): which folders
// may be written or replaced, and the final swap of the finished temporary folder onto --out.
//
// An --out must never be, or contain, an input of the run: paths are compared after resolving
// the symlinks of their existing part (realpath-style) and, for an existing --out, by device and
// inode too, so no switch lets a run delete what it reads. An existing --out must be a folder
// and is replaced only on request: OverwritePolicy::kNvfp4calOutput (--overwrite) replaces an
// empty folder or one an nvfp4cal command wrote (IsNvfp4calOutput), kAnything (--overwrite-any)
// any folder. Nothing is deleted before every check has passed, and the checks run again right
// before the swap.
//
//   nvfp4cal::OutputTarget target;
//   target.out_dir = "/models/llama-nvfp4";
//   target.overwrite = nvfp4cal::OverwritePolicy::kNvfp4calOutput;
//   target.inputs = {{"--model", "/models/llama"}, {"--hessians", "/data/h.safetensors"}};
//   absl::Status ok = nvfp4cal::CheckOutputTarget(target);  // before any work
//   absl::StatusOr<std::string> temp = nvfp4cal::MakeTempDirBeside(target.out_dir);
//   ... write the output into *temp ...
//   absl::Status done = nvfp4cal::ReplaceWithTempDir(*temp, target);
#ifndef NVFP4CAL_CLIENT_OUTPUT_DIR_H_
#define NVFP4CAL_CLIENT_OUTPUT_DIR_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace nvfp4cal {

// What may happen to an --out that exists already.
enum class OverwritePolicy {
  kNever,           // refused (no switch)
  kNvfp4calOutput,  // --overwrite: an empty folder, or one IsNvfp4calOutput recognises
  kAnything,        // --overwrite-any: any folder
};

// A path the run reads, with the option that named it (for messages).
struct RunInput {
  std::string flag;  // "--model"
  std::string path;  // empty: not given, ignored
};

struct OutputTarget {
  std::string out_dir;
  OverwritePolicy overwrite = OverwritePolicy::kNever;
  // Everything the run reads; out_dir must be none of them and contain none of them.
  std::vector<RunInput> inputs;
};

// Whether `target` may be written. INVALID_ARGUMENT "--out OUT contains --model DIR (...)" (or
// "is") naming both paths, and the resolved --out when symlinks changed it; FAILED_PRECONDITION
// when out_dir exists and is not a folder, or exists and the policy does not allow replacing it
// (naming the switch that would).
absl::Status CheckOutputTarget(const OutputTarget& target);

// Puts the finished folder `temp` (from MakeTempDirBeside) in place of target.out_dir: checks
// `target` again, then swaps atomically (renameat2 RENAME_EXCHANGE where the filesystem has
// it, else two renames) and removes the old output. On error `temp` is left for the caller to
// remove and out_dir is as it was.
absl::Status ReplaceWithTempDir(const std::string& temp, const OutputTarget& target);

// Whether the file `path` (option `flag`, e.g. "--stats-json") may be written: INVALID_ARGUMENT
// when it is, or lies inside, one of `inputs` (symlinks resolved), FAILED_PRECONDITION when it
// exists and is not a regular file or its folder does not exist, PERMISSION_DENIED when the
// folder is not writable.
absl::Status CheckOutputFile(const std::string& flag, const std::string& path,
                             const std::vector<RunInput>& inputs);

// Whether `dir` holds the producer record of an nvfp4cal command: hf_quant_config.json
// (quantize) or nvfp4cal.json (example, dequantize) with "producer": {"name": "nvfp4cal"}.
bool IsNvfp4calOutput(const std::string& dir);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_OUTPUT_DIR_H_
