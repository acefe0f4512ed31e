// CliParser, the argument parser of every nvfp4cal subcommand (on CLI11): how words become
// options, values and positional arguments, and the exact message of each bad command line
// (docs/cli.md, "Arguments"). The rules are those of the hand-written parser it replaced; the
// cases where CLI11 alone would read a word differently (`-x`, `--`, `--name=`, `--switch=true`,
// `---x`) are pinned here.
#include "client/cli_args.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace nvfp4cal {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

absl::StatusOr<CliArgs> ParseWords(const CliParser& parser, const std::vector<std::string>& words) {
  std::vector<const char*> argv;
  for (const std::string& word : words) argv.push_back(word.c_str());
  return parser.Parse(static_cast<int>(argv.size()), argv.data());
}

// A quantize-like command: a required option, dashed names, a repeatable option, switches and
// no positional argument.
CliParser Quantize() {
  CliParser p("quantize", "Quantize a checkpoint.");
  p.AddOption("model", "DIR", "checkpoint folder", /*required=*/true);
  p.AddOption("kv-cache", "none|fp8", "KV cache quantization", false, "none");
  p.AddOption("beta-step", "X", "grid spacing", false, "0.05");
  p.AddRepeated("include", "GLOB", "quantize only matching modules");
  p.AddSwitch("overwrite", "replace an existing --out");
  p.AddSwitch("no-default-excludes", "quantize lm_head too");
  return p;
}

// An inspect-like command: one positional argument.
CliParser Inspect() {
  CliParser p("inspect", "Summary of a checkpoint.");
  p.SetPositional("DIR", 1);
  p.AddSwitch("json", "JSON output");
  p.AddOption("against", "DIR", "compare with");
  return p;
}

// The message of a failed parse, or "parsed" when it did not fail.
std::string ErrorOf(const CliParser& parser, const std::vector<std::string>& words) {
  const absl::StatusOr<CliArgs> args = ParseWords(parser, words);
  if (args.ok()) return "parsed";
  EXPECT_EQ(args.status().code(), absl::StatusCode::kInvalidArgument) << args.status();
  return std::string(args.status().message());
}

TEST(CliParser, ValueAfterSpaceOrEqualsAndDashedNames) {
  const absl::StatusOr<CliArgs> args =
      ParseWords(Quantize(),
                 {"--model", "m", "--kv-cache=fp8", "--beta-step", "0.1", "--no-default-excludes"});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_EQ(args->Get("model"), "m");
  EXPECT_EQ(args->Get("kv-cache"), "fp8");
  EXPECT_EQ(args->Get("beta-step"), "0.1");
  EXPECT_TRUE(args->Switch("no-default-excludes"));
  EXPECT_FALSE(args->Switch("overwrite"));
  EXPECT_FALSE(args->Has("include"));
  EXPECT_EQ(args->Get("include", "fallback"), "fallback");
  EXPECT_THAT(args->GetAll("include"), IsEmpty());
  EXPECT_THAT(args->positional(), IsEmpty());
  EXPECT_FALSE(args->help());
}

TEST(CliParser, LastOccurrenceOfASingleOptionWins) {
  const absl::StatusOr<CliArgs> args =
      ParseWords(Quantize(), {"--model", "a", "--model=b", "--model", "c"});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_EQ(args->Get("model"), "c");
  EXPECT_THAT(args->GetAll("model"), ElementsAre("a", "b", "c"));
}

TEST(CliParser, RepeatableOptionKeepsEveryValueInOrder) {
  const absl::StatusOr<CliArgs> args = ParseWords(
      Quantize(), {"--include", "b*", "--model", "m", "--include=a*", "--include", "c*"});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_THAT(args->GetAll("include"), ElementsAre("b*", "a*", "c*"));
  EXPECT_EQ(args->Get("include"), "c*");
}

TEST(CliParser, EqualsInsideAValueBelongsToTheValue) {
  const absl::StatusOr<CliArgs> args =
      ParseWords(Quantize(), {"--include=a=b", "--model=x=y=", "--include", "c=d"});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_THAT(args->GetAll("include"), ElementsAre("a=b", "c=d"));
  EXPECT_EQ(args->Get("model"), "x=y=");
}

// `--name=` gives the empty value; it does not take the next word (CLI11 alone would).
TEST(CliParser, EmptyValues) {
  const absl::StatusOr<CliArgs> args =
      ParseWords(Quantize(), {"--kv-cache=", "--model", "m", "--include", "", "--include="});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_TRUE(args->Has("kv-cache"));
  EXPECT_EQ(args->Get("kv-cache", "fallback"), "");
  EXPECT_EQ(args->Get("model"), "m");
  EXPECT_THAT(args->GetAll("include"), ElementsAre("", ""));
  EXPECT_THAT(args->positional(), IsEmpty());
}

// The word after an option that needs a value is that value, whatever it is.
TEST(CliParser, ValueStartingWithDashIsTakenAsIs) {
  const absl::StatusOr<CliArgs> args =
      ParseWords(Quantize(), {"--beta-step", "-5", "--model", "-x", "--include", "--", "--include",
                              "-", "--include", "--overwrite", "--include", "--help", "--include",
                              "-h", "--include", "--bogus=1", "--kv-cache=-y"});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_EQ(args->Get("beta-step"), "-5");
  EXPECT_EQ(args->Get("model"), "-x");
  EXPECT_EQ(args->Get("kv-cache"), "-y");
  EXPECT_THAT(args->GetAll("include"),
              ElementsAre("--", "-", "--overwrite", "--help", "-h", "--bogus=1"));
  EXPECT_FALSE(args->Switch("overwrite"));
  EXPECT_FALSE(args->help());
}

TEST(CliParser, OptionNamesAreExactAndCaseSensitive) {
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "--mod", "x"}),
            "unknown option --mod for 'quantize' (see nvfp4cal quantize --help)");
  EXPECT_EQ(ErrorOf(Quantize(), {"--Model", "m"}),
            "unknown option --Model for 'quantize' (see nvfp4cal quantize --help)");
}

// A word that does not start with `--`, and `--` itself, is a positional argument: `-x` and
// `--` too (CLI11 alone reads a short option and the end of the options).
TEST(CliParser, EveryOtherWordIsAPositionalArgumentInOrder) {
  for (const std::string word : {"-x", "-", "-5", "--", "-hx", "-h=1", "-help", "[a,b]", ""}) {
    const absl::StatusOr<CliArgs> args = ParseWords(Inspect(), {"--json", word});
    ASSERT_TRUE(args.ok()) << word << ": " << args.status();
    EXPECT_THAT(args->positional(), ElementsAre(word));
    EXPECT_TRUE(args->Switch("json"));
  }
  CliParser two("diff", "Two folders.");
  two.SetPositional("A B", 2);
  two.AddSwitch("json", "JSON output");
  const absl::StatusOr<CliArgs> args = ParseWords(two, {"b", "--json", "-a"});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_THAT(args->positional(), ElementsAre("b", "-a"));
  // Options still count after `--`.
  EXPECT_EQ(ErrorOf(Inspect(), {"--", "dir", "--json"}),
            "nvfp4cal inspect takes 1 argument(s) (DIR), got 2 (see nvfp4cal inspect --help)");
}

TEST(CliParser, WrongNumberOfPositionalArguments) {
  EXPECT_EQ(ErrorOf(Inspect(), {}),
            "nvfp4cal inspect takes 1 argument(s) (DIR), got 0 (see nvfp4cal inspect --help)");
  EXPECT_EQ(ErrorOf(Inspect(), {"a", "b"}),
            "nvfp4cal inspect takes 1 argument(s) (DIR), got 2 (see nvfp4cal inspect --help)");
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "stray"}),
            "nvfp4cal quantize takes 0 argument(s), got 1 (see nvfp4cal quantize --help)");
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "-x"}),
            "nvfp4cal quantize takes 0 argument(s), got 1 (see nvfp4cal quantize --help)");
}

TEST(CliParser, UnknownOptionNamesItAndTheCommand) {
  const std::string bogus = "unknown option --bogus for 'quantize' (see nvfp4cal quantize --help)";
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "--bogus"}), bogus);
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "--bogus=3"}), bogus);
  EXPECT_EQ(ErrorOf(Quantize(), {"--bogus", "value", "--model", "m"}), bogus);
  // Names no option has, which CLI11 alone would read as positional arguments or a flag.
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "---x"}),
            "unknown option ---x for 'quantize' (see nvfp4cal quantize --help)");
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "--!x=1"}),
            "unknown option --!x for 'quantize' (see nvfp4cal quantize --help)");
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "--=x"}),
            "unknown option -- for 'quantize' (see nvfp4cal quantize --help)");
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "--help=yes"}),
            "unknown option --help for 'quantize' (see nvfp4cal quantize --help)");
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "--h"}),
            "unknown option --h for 'quantize' (see nvfp4cal quantize --help)");
}

// Any value, even the empty one or `true` (which CLI11 alone accepts), is refused.
TEST(CliParser, SwitchTakesNoValue) {
  for (const std::string word : {"--overwrite=x", "--overwrite=true",
                                 "--overwrite=", "--overwrite={}", "--overwrite=false"}) {
    EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", word}),
              "--overwrite takes no value (see nvfp4cal quantize --help)")
        << word;
  }
  EXPECT_EQ(ErrorOf(Quantize(), {"--no-default-excludes=1", "--model", "m"}),
            "--no-default-excludes takes no value (see nvfp4cal quantize --help)");
  // A switch does not take the next word either.
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "--overwrite", "yes"}),
            "nvfp4cal quantize takes 0 argument(s), got 1 (see nvfp4cal quantize --help)");
}

TEST(CliParser, SwitchGivenTwiceIsOn) {
  const absl::StatusOr<CliArgs> args =
      ParseWords(Quantize(), {"--overwrite", "--model", "m", "--overwrite"});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_TRUE(args->Switch("overwrite"));
  EXPECT_THAT(args->GetAll("overwrite"), ElementsAre("true", "true"));
}

TEST(CliParser, MissingValue) {
  EXPECT_EQ(ErrorOf(Quantize(), {"--model"}),
            "--model needs a value (DIR) (see nvfp4cal quantize --help)");
  EXPECT_EQ(ErrorOf(Quantize(), {"--model", "m", "--kv-cache"}),
            "--kv-cache needs a value (none|fp8) (see nvfp4cal quantize --help)");
  EXPECT_EQ(ErrorOf(Inspect(), {"dir", "--against"}),
            "--against needs a value (DIR) (see nvfp4cal inspect --help)");
}

TEST(CliParser, MissingRequiredOption) {
  const std::string required =
      "nvfp4cal quantize: --model DIR is required (see nvfp4cal quantize --help)";
  EXPECT_EQ(ErrorOf(Quantize(), {}), required);
  EXPECT_EQ(ErrorOf(Quantize(), {"--overwrite", "--kv-cache", "fp8"}), required);
  // --include took `--model` as its value.
  EXPECT_EQ(ErrorOf(Quantize(), {"--include", "--model"}), required);
  // The first required option missing, in the order they were added.
  CliParser two("dequantize", "Dense copy.");
  two.AddOption("in", "DIR", "input", true);
  two.AddOption("out", "DIR", "output", true);
  EXPECT_EQ(ErrorOf(two, {}),
            "nvfp4cal dequantize: --in DIR is required (see nvfp4cal dequantize --help)");
  EXPECT_EQ(ErrorOf(two, {"--in", "a"}),
            "nvfp4cal dequantize: --out DIR is required (see nvfp4cal dequantize --help)");
}

// --help / -h anywhere skips the required and positional checks, not the others.
TEST(CliParser, HelpAnywhereSkipsTheRequiredChecks) {
  for (const std::vector<std::string>& words :
       std::vector<std::vector<std::string>>{{"--help"},
                                             {"-h"},
                                             {"--kv-cache", "fp8", "-h", "stray"},
                                             {"--help", "--model", "m", "--help"}}) {
    const absl::StatusOr<CliArgs> args = ParseWords(Quantize(), words);
    ASSERT_TRUE(args.ok()) << words[0] << ": " << args.status();
    EXPECT_TRUE(args->help());
  }
  const absl::StatusOr<CliArgs> args = ParseWords(Inspect(), {"--against", "b", "--help"});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_TRUE(args->help());
  EXPECT_EQ(args->Get("against"), "b");
  EXPECT_EQ(ErrorOf(Quantize(), {"--help", "--bogus"}),
            "unknown option --bogus for 'quantize' (see nvfp4cal quantize --help)");
  EXPECT_EQ(ErrorOf(Quantize(), {"-h", "--overwrite=1"}),
            "--overwrite takes no value (see nvfp4cal quantize --help)");
  EXPECT_EQ(ErrorOf(Quantize(), {"-h", "--model"}),
            "--model needs a value (DIR) (see nvfp4cal quantize --help)");
}

// The first error in argv order wins; then a missing required option; then the positional
// argument count.
TEST(CliParser, FirstErrorInArgvOrder) {
  const std::string bogus = "unknown option --bogus for 'quantize' (see nvfp4cal quantize --help)";
  const std::string no_value = "--overwrite takes no value (see nvfp4cal quantize --help)";
  EXPECT_EQ(ErrorOf(Quantize(), {"--bogus", "--overwrite=1"}), bogus);
  EXPECT_EQ(ErrorOf(Quantize(), {"--overwrite=1", "--bogus"}), no_value);
  EXPECT_EQ(ErrorOf(Quantize(), {"--bogus", "--model"}), bogus);
  EXPECT_EQ(ErrorOf(Quantize(), {"--overwrite=1", "--model"}), no_value);
  EXPECT_EQ(ErrorOf(Quantize(), {"stray", "--bogus"}), bogus);
  EXPECT_EQ(ErrorOf(Quantize(), {"stray"}),
            "nvfp4cal quantize: --model DIR is required (see nvfp4cal quantize --help)");
}

TEST(CliParser, HelpText) {
  CliParser p("quantize", "Quantize a checkpoint.");
  p.AddOption("model", "DIR", "checkpoint folder", true);
  p.AddOption("kv-cache", "none|fp8", "KV cache quantization", false, "none");
  p.AddRepeated("include", "GLOB", "quantize only matching modules");
  p.AddSwitch("overwrite",
              "replace an existing --out that an earlier nvfp4cal run wrote; a folder that is not "
              "one is left alone");
  p.AddOption("a-very-long-option-name", "VALUE", "wide");
  EXPECT_EQ(p.Help(),
            "usage: nvfp4cal quantize --model DIR [options]\n"
            "\n"
            "Quantize a checkpoint.\n"
            "\n"
            "options:\n"
            "  --model DIR                checkpoint folder\n"
            "  --kv-cache none|fp8        KV cache quantization [default: none]\n"
            "  --include GLOB             quantize only matching modules (repeatable)\n"
            "  --overwrite                replace an existing --out that an earlier nvfp4cal run "
            "wrote; a folder\n"
            "                             that is not one is left alone\n"
            "  --a-very-long-option-name VALUE\n"
            "                             wide\n"
            "  --help                     this text\n");
  EXPECT_EQ(Inspect().Help(),
            "usage: nvfp4cal inspect [options] DIR\n"
            "\n"
            "Summary of a checkpoint.\n"
            "\n"
            "options:\n"
            "  --json                     JSON output\n"
            "  --against DIR              compare with\n"
            "  --help                     this text\n");
}

}  // namespace
}  // namespace nvfp4cal
