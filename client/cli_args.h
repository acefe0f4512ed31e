// The command-line parser of the nvfp4cal subcommands: `--name value`, `--name=value`,
// repeatable options and switches, with generated --help text. Parsing is CLI11's (Debian's
// libcli11-dev, kept inside cli_args.cc); the rules and messages are docs/cli.md's.
//
//   nvfp4cal::CliParser parser("quantize", "Quantize a checkpoint to NVFP4.");
//   parser.AddOption("model", "DIR", "Hugging Face checkpoint folder", /*required=*/true);
//   parser.AddRepeated("include", "GLOB", "quantize only matching modules");
//   parser.AddSwitch("overwrite", "replace an existing --out");
//   absl::StatusOr<nvfp4cal::CliArgs> args = parser.Parse(argc - 2, argv + 2);
//   std::string model = args->Get("model");
#ifndef NVFP4CAL_CLIENT_CLI_ARGS_H_
#define NVFP4CAL_CLIENT_CLI_ARGS_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace nvfp4cal {

// Parsed arguments of one subcommand.
class CliArgs {
 public:
  bool Has(const std::string& name) const { return values_.count(name) != 0; }
  // The last value given, or `fallback`.
  std::string Get(const std::string& name, const std::string& fallback = "") const;
  // Every value of a repeatable option, in order.
  std::vector<std::string> GetAll(const std::string& name) const;
  bool Switch(const std::string& name) const { return Has(name); }
  // Arguments that are not options.
  const std::vector<std::string>& positional() const { return positional_; }
  bool help() const { return help_; }

 private:
  friend class CliParser;
  std::map<std::string, std::vector<std::string>> values_;
  std::vector<std::string> positional_;
  bool help_ = false;
};

class CliParser {
 public:
  CliParser(std::string command, std::string summary)
      : command_(std::move(command)), summary_(std::move(summary)) {}

  // An option taking one value (the last occurrence wins).
  void AddOption(const std::string& name, const std::string& value_name, const std::string& help,
                 bool required = false, const std::string& default_text = "");
  // An option that may be given several times.
  void AddRepeated(const std::string& name, const std::string& value_name, const std::string& help);
  // A flag without a value.
  void AddSwitch(const std::string& name, const std::string& help);
  // Positional arguments: their names for the usage line and how many are required.
  void SetPositional(const std::string& names, int count);

  // INVALID_ARGUMENT naming the unknown option, the switch given a value, the missing value or
  // required option, or the wrong number of positional arguments; the first error in argv
  // order wins. A word starting with `--` (other than `--` itself) is an option, every other
  // word a positional argument, and the word after an option that needs a value is that value
  // whatever it is. --help / -h anywhere sets help() and skips the required checks.
  absl::StatusOr<CliArgs> Parse(int argc, const char* const* argv) const;

  // The --help text.
  std::string Help() const;

 private:
  struct Spec {
    std::string name;
    std::string value_name;  // empty for switches
    std::string help;
    bool required = false;
    bool repeated = false;
    std::string default_text;
  };
  const Spec* Find(const std::string& name) const;
  // The error of argv[at], the word where CLI11 stopped with a mismatch.
  absl::Status StoppedAt(int argc, const char* const* argv, int at) const;

  std::string command_;
  std::string summary_;
  std::vector<Spec> specs_;
  std::string positional_names_;
  int positional_count_ = 0;
};

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_CLI_ARGS_H_
