#include "client/cli_args.h"

#include <algorithm>
#include <utility>

#include "CLI/CLI.hpp"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace nvfp4cal {
namespace {

// CLI11 splits the words of argv a little differently from our rules (docs/cli.md): it reads
// `-x` as a short option and a bare `--` as "only positional arguments follow", where we read
// both as positional arguments; it reads `---x` as a positional argument, where we read an
// option (which no command has); and it reads `--name=` as `--name` without a value, taking the
// next word, where we give `--name` the empty value. No word of argv can hold a NUL byte, so a
// NUL inserted where CLI11 looks makes it read the word our way, and erasing every NUL from what
// it collected gives back the word as typed (Unmark):
//   - a word that is not `--name[=value]` (nor -h) gets a leading NUL: CLI11 reads a positional
//     argument or, after an option, that option's value (which it takes whatever it is);
//   - `--name=value` becomes `--name=<NUL>value`: the value is never empty, and a switch refuses
//     every value (even `=true`, which CLI11 would accept);
//   - `--` followed by a character that CLI11 does not accept to start a name (`---x`, `--!x`)
//     gets a NUL after the dashes: CLI11 reads an option, which it does not know.
constexpr char kMark = '\0';

std::string MarkForCli11(const std::string& word) {
  if (word == "-h") return word;
  if (!absl::StartsWith(word, "--") || word == "--")
    return absl::StrCat(std::string(1, kMark), word);
  std::string marked = word;
  const size_t eq = marked.find('=');
  if (eq != std::string::npos) marked.insert(eq + 1, 1, kMark);
  std::string name, value;
  if (!CLI::detail::split_long(marked, name, value)) marked.insert(2, 1, kMark);
  return marked;
}

std::string Unmark(std::string word) {
  word.erase(std::remove(word.begin(), word.end(), kMark), word.end());
  return word;
}

// The end of every message: where to read the command's options.
std::string SeeHelp(const std::string& command) {
  return absl::StrCat(" (see nvfp4cal ", command, " --help)");
}

// "name" of `--name` or `--name=value`.
std::string OptionName(const std::string& word) {
  const size_t eq = word.find('=');
  return word.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
}

}  // namespace

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
  const std::string see = SeeHelp(command_);
  CLI::App app(summary_, absl::StrCat("nvfp4cal ", command_));
  std::vector<CLI::Option*> options;  // options[i] is specs_[i]
  CLI::Option* positional = nullptr;
  try {
    app.allow_extras(false);
    app.set_help_flag("-h,--help")->disable_flag_override();
    for (const Spec& s : specs_) {
      if (s.value_name.empty()) {
        options.push_back(app.add_flag("--" + s.name, s.help)->disable_flag_override());
      } else {
        options.push_back(app.add_option("--" + s.name, s.help)
                              ->multi_option_policy(s.repeated ? CLI::MultiOptionPolicy::TakeAll
                                                               : CLI::MultiOptionPolicy::TakeLast)
                              ->required(s.required));
      }
    }
    // Every positional argument, however many: the count is checked below, with our message.
    positional = app.add_option("positional")->expected(0, -1)->allow_extra_args();
  } catch (const CLI::Error& e) {  // a name twice, or one CLI11 cannot take
    return absl::InternalError(absl::StrCat("options of '", command_, "': ", e.what()));
  }

  std::vector<std::string> words;  // reversed: CLI::App::parse takes them off the back
  for (int i = argc - 1; i >= 0; --i) words.push_back(MarkForCli11(argv[i]));
  CliArgs args;
  bool required_missing = false;
  int stopped_at = -1;
  std::string unexpected;
  try {
    app.parse(words);
  } catch (const CLI::CallForHelp&) {
    args.help_ = true;
  } catch (const CLI::RequiredError&) {
    required_missing = true;
  } catch (const CLI::ArgumentMismatch&) {
    // Thrown while reading the word it has just taken off `words`.
    stopped_at = argc - static_cast<int>(words.size()) - 1;
  } catch (const CLI::ExtrasError&) {
    // Unknown options, read from app.remaining() below.
  } catch (const CLI::Error& e) {
    unexpected = e.what();
  }

  // The first error in argv order (docs/cli.md): CLI11 collects unknown options and reports them
  // after everything else, but holds only those before a word it stopped at.
  const std::vector<std::string> unknown = app.remaining();
  if (!unknown.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown option --", OptionName(Unmark(unknown.front())), " for '", command_, "'", see));
  }
  if (stopped_at >= 0) return StoppedAt(argc, argv, stopped_at);
  if (!unexpected.empty()) {
    return absl::InternalError(absl::StrCat("nvfp4cal ", command_, ": ", unexpected));
  }

  for (size_t i = 0; i < specs_.size(); ++i) {
    const Spec& s = specs_[i];
    if (s.value_name.empty()) {
      for (size_t n = 0; n < options[i]->count(); ++n) args.values_[s.name].push_back("true");
    } else {
      for (const std::string& value : options[i]->results()) {
        args.values_[s.name].push_back(Unmark(value));
      }
    }
  }
  for (const std::string& word : positional->results()) args.positional_.push_back(Unmark(word));
  if (args.help_) return args;
  if (required_missing) {
    for (const Spec& s : specs_) {
      if (s.required && !args.Has(s.name)) {
        return absl::InvalidArgumentError(absl::StrCat("nvfp4cal ", command_, ": --", s.name, " ",
                                                       s.value_name, " is required", see));
      }
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

absl::Status CliParser::StoppedAt(int argc, const char* const* argv, int at) const {
  const std::string see = SeeHelp(command_);
  const std::string word = argv[at];
  if (absl::StartsWith(word, "--")) {
    const std::string name = OptionName(word);
    const bool has_value = word.find('=') != std::string::npos;
    const Spec* spec = Find(name);
    if (spec == nullptr) {  // --help=x: our rules know only --help and -h
      return absl::InvalidArgumentError(
          absl::StrCat("unknown option --", name, " for '", command_, "'", see));
    }
    if (spec->value_name.empty() && has_value) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value", see));
    }
    if (!spec->value_name.empty() && !has_value && at == argc - 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " needs a value (", spec->value_name, ")", see));
    }
  }
  return absl::InternalError(
      absl::StrCat("nvfp4cal ", command_, ": the parser stopped at '", word, "' unexpectedly"));
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
