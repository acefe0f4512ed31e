#include "client/cli_args.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace nvfp4cal {

std::string CliArgs::Get(const std::string& name, const std::string& fallback) const {
  const auto it = values_.find(name);
  return it == values_.end() || it->second.empty() ? fallback : it->second.back();
}

std::vector<std::string> CliArgs::GetAll(const std::string& name) const {
  const auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

void CliParser::AddOption(const std::string& name, const std::string& value_name,
                          const std::string& help, bool required, const std::string& default_text) {
  specs_.push_back({name, value_name, help, required, false, default_text});
}

void CliParser::AddRepeated(const std::string& name, const std::string& value_name,
                            const std::string& help) {
  specs_.push_back({name, value_name, help, false, true, ""});
}

void CliParser::AddSwitch(const std::string& name, const std::string& help) {
  specs_.push_back({name, "", help, false, false, ""});
}

void CliParser::SetPositional(const std::string& names, int count) {
  positional_names_ = names;
  positional_count_ = count;
}

const CliParser::Spec* CliParser::Find(const std::string& name) const {
  for (const Spec& s : specs_) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

absl::StatusOr<CliArgs> CliParser::Parse(int argc, const char* const* argv) const {
  CliArgs args;
  const std::string see = absl::StrCat(" (see nvfp4cal ", command_, " --help)");
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      args.help_ = true;
      continue;
    }
    if (!absl::StartsWith(arg, "--") || arg == "--") {
      args.positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::string value;
    bool has_value = false;
    const size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const Spec* spec = Find(name);
    if (spec == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown option --", name, " for '", command_, "'", see));
    }
    if (spec->value_name.empty()) {
      if (has_value) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value", see));
      }
      args.values_[name].push_back("true");
      continue;
    }
    if (!has_value) {
      if (i + 1 >= argc) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " needs a value (", spec->value_name, ")", see));
      }
      value = argv[++i];
    }
    args.values_[name].push_back(value);
  }
  if (args.help_) return args;
  for (const Spec& s : specs_) {
    if (s.required && !args.Has(s.name)) {
      return absl::InvalidArgumentError(absl::StrCat("nvfp4cal ", command_, ": --", s.name, " ",
                                                     s.value_name, " is required", see));
    }
  }
  if (static_cast<int>(args.positional_.size()) != positional_count_) {
    return absl::InvalidArgumentError(
        absl::StrCat("nvfp4cal ", command_, " takes ", positional_count_, " argument(s)",
                     positional_names_.empty() ? "" : absl::StrCat(" (", positional_names_, ")"),
                     ", got ", args.positional_.size(), see));
  }
  return args;
}

std::string CliParser::Help() const {
  std::string out = absl::StrCat("usage: nvfp4cal ", command_);
  for (const Spec& s : specs_) {
    if (s.required) absl::StrAppend(&out, " --", s.name, " ", s.value_name);
  }
  if (std::any_of(specs_.begin(), specs_.end(), [](const Spec& s) { return !s.required; })) {
    absl::StrAppend(&out, " [options]");
  }
  if (!positional_names_.empty()) absl::StrAppend(&out, " ", positional_names_);
  absl::StrAppend(&out, "\n\n", summary_, "\n\noptions:\n");
  for (const Spec& s : specs_) {
    std::string left = absl::StrCat("  --", s.name);
    if (!s.value_name.empty()) absl::StrAppend(&left, " ", s.value_name);
    std::string help = s.help;
    if (s.repeated) absl::StrAppend(&help, " (repeatable)");
    if (!s.default_text.empty()) absl::StrAppend(&help, " [default: ", s.default_text, "]");
    // Help text wrapped at 100 columns, indented under its option.
    std::vector<std::string> lines(1);
    for (absl::string_view word : absl::StrSplit(help, ' ', absl::SkipEmpty())) {
      if (!lines.back().empty() && lines.back().size() + 1 + word.size() > 71) lines.emplace_back();
      if (!lines.back().empty()) lines.back() += ' ';
      absl::StrAppend(&lines.back(), word);
    }
    if (left.size() < 28) {
      absl::StrAppendFormat(&out, "%-28s %s\n", left, lines[0]);
    } else {
      absl::StrAppend(&out, left, "\n", std::string(29, ' '), lines[0], "\n");
    }
    for (size_t i = 1; i < lines.size(); ++i) {
      absl::StrAppend(&out, std::string(29, ' '), lines[i], "\n");
    }
  }
  absl::StrAppend(&out, "  --help                     this text\n");
  return out;
}

}  // namespace nvfp4cal
