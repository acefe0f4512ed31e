#include "client/temp_dir.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>
#include <system_error>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;

constexpr char kTempMarker[] = ".nvfp4cal-tmp-";
constexpr char kOldMarker[] = ".nvfp4cal-old-";  // names of versions before owner-named folders

// Who owns a temporary folder: see temp_dir.h.
struct Owner {
  int64_t pid = 0;
  uint64_t start_ticks = 0;
  uint64_t pid_namespace = 0;
  std::string boot;  // 8 lowercase hex digits
};

// State (field 3) and start time (field 22) of /proc/<pid>/stat; NOT_FOUND when no such process.
struct ProcStat {
  char state = '?';
  uint64_t start_ticks = 0;
};

absl::StatusOr<ProcStat> ReadProcStat(const std::string& pid) {
  absl::StatusOr<std::string> text = ReadTextFile(absl::StrCat("/proc/", pid, "/stat"));
  if (!text.ok()) return text.status();
  // The command name (field 2) is in parentheses and may hold spaces and parentheses itself.
  const size_t close = text->rfind(')');
  if (close == std::string::npos) return absl::InternalError("unreadable /proc stat");
  const std::vector<std::string> fields =
      absl::StrSplit(text->substr(close + 1), ' ', absl::SkipEmpty());
  ProcStat stat;
  if (fields.size() < 20 || fields[0].size() != 1 ||
      !absl::SimpleAtoi(fields[19], &stat.start_ticks)) {
    return absl::InternalError("unreadable /proc stat");
  }
  stat.state = fields[0][0];
  return stat;
}

// This process as the owner of the folders it makes; nullopt where /proc cannot tell.
std::optional<Owner> CurrentOwner() {
  Owner owner;
  owner.pid = static_cast<int64_t>(getpid());
  absl::StatusOr<ProcStat> stat = ReadProcStat("self");
  if (!stat.ok()) return std::nullopt;
  owner.start_ticks = stat->start_ticks;
  std::error_code ec;
  const std::string ns = fs::read_symlink("/proc/self/ns/pid", ec).string();  // "pid:[40265...]"
  const size_t open = ns.find('[');
  const size_t close = ns.find(']');
  if (ec || open == std::string::npos || close == std::string::npos ||
      !absl::SimpleAtoi(ns.substr(open + 1, close - open - 1), &owner.pid_namespace)) {
    return std::nullopt;
  }
  absl::StatusOr<std::string> boot = ReadTextFile("/proc/sys/kernel/random/boot_id");
  if (!boot.ok() || boot->size() < 8) return std::nullopt;
  owner.boot = absl::AsciiStrToLower(boot->substr(0, 8));
  return owner;
}

bool IsHex8(const std::string& s) {
  return s.size() == 8 &&
         std::all_of(s.begin(), s.end(), [](char c) { return absl::ascii_isxdigit(c); });
}

// The owner named by what follows ".<name>.nvfp4cal-tmp-"; nullopt for another name.
std::optional<Owner> ParseOwner(const std::string& rest) {
  const std::vector<std::string> parts = absl::StrSplit(rest, '-');
  Owner owner;
  if (parts.size() < 5 || !absl::SimpleAtoi(parts[0], &owner.pid) || owner.pid <= 0 ||
      !absl::SimpleAtoi(parts[1], &owner.start_ticks) ||
      !absl::SimpleAtoi(parts[2], &owner.pid_namespace) || !IsHex8(parts[3])) {
    return std::nullopt;
  }
  owner.boot = parts[3];
  return owner;
}

// Whether the owner of a folder has exited, judged from this process.
TempDirCleanup::Owner Judge(const Owner& owner, const std::optional<Owner>& self) {
  using State = TempDirCleanup::Owner;
  if (!self.has_value() || owner.pid_namespace != self->pid_namespace || owner.boot != self->boot) {
    return State::kElsewhere;
  }
  absl::StatusOr<ProcStat> stat = ReadProcStat(std::to_string(owner.pid));
  if (absl::IsNotFound(stat.status())) return State::kGone;
  if (!stat.ok()) return State::kRunning;  // cannot tell: keep it
  // A zombie has exited; another start time is another process under a reused PID.
  if (stat->state == 'Z' || stat->state == 'X' || stat->start_ticks != owner.start_ticks) {
    return State::kGone;
  }
  return State::kRunning;
}

}  // namespace

bool IsTempDirName(const std::string& file_name) {
  return absl::StrContains(file_name, kTempMarker) || absl::StrContains(file_name, kOldMarker);
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
  std::string owner_part;
  if (const std::optional<Owner> self = CurrentOwner()) {
    owner_part = absl::StrCat(self->pid, "-", self->start_ticks, "-", self->pid_namespace, "-",
                              self->boot, "-");
  }
  const std::string templ = (target.parent_path() / absl::StrCat(".", target.filename().string(),
                                                                 kTempMarker, owner_part, "XXXXXX"))
                                .string();
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

std::vector<TempDirCleanup> CleanTempDirsBeside(const std::string& out_dir) {
  fs::path target = fs::absolute(fs::path(out_dir)).lexically_normal();
  if (!target.has_filename()) target = target.parent_path();
  const std::string name = target.filename().string();
  const std::string temp_prefix = absl::StrCat(".", name, kTempMarker);
  const std::string old_prefix = absl::StrCat(name, kOldMarker);
  const std::optional<Owner> self = CurrentOwner();
  std::vector<TempDirCleanup> found;
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(target.parent_path(), ec)) {
    const std::string entry = e.path().filename().string();
    const bool temp = absl::StartsWith(entry, temp_prefix);
    if (!temp && !absl::StartsWith(entry, old_prefix)) continue;
    TempDirCleanup c;
    c.path = e.path().string();
    const std::optional<Owner> owner =
        temp ? ParseOwner(entry.substr(temp_prefix.size())) : std::nullopt;
    struct stat st;
    if (owner.has_value()) c.pid = owner->pid;
    if (!owner.has_value() || lstat(c.path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      c.owner = TempDirCleanup::Owner::kUnknown;
    } else if (st.st_uid != geteuid()) {
      c.owner = TempDirCleanup::Owner::kOtherUser;
    } else {
      c.owner = Judge(*owner, self);
    }
    if (c.owner == TempDirCleanup::Owner::kGone) c.removed = RemoveTree(c.path);
    found.push_back(std::move(c));
  }
  std::sort(found.begin(), found.end(),
            [](const TempDirCleanup& a, const TempDirCleanup& b) { return a.path < b.path; });
  return found;
}

}  // namespace nvfp4cal
