// The independent Python/numpy reader (nvfp4_reader.py) on checkpoints the CLI wrote: it parses
// the safetensors bytes by hand, dequantizes and compares with `nvfp4cal dequantize`, and for the
// max method recomputes every scale byte and code itself. (Every method's bytes are compared
// with kernels/ in quantize_test.cc; here max checks the numerics, dss the default path.) (Every
// method's bytes are compared with kernels/ in quantize_test.cc; here max checks the numerics, dss
// the default path.)
#include <filesystem>
#include <string>
#include <tuple>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/client/test_util.h"

namespace nvfp4cal {
namespace {

namespace fs = std::filesystem;
using ::nvfp4cal::testing::ProcessResult;
using ::nvfp4cal::testing::RunCli;
using ::nvfp4cal::testing::RunProcess;
using ::nvfp4cal::testing::TempFolder;
using ::testing::HasSubstr;

class PythonReader : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(PythonReader, AgreesWithTheCppOutput) {
  const auto& [model, method] = GetParam();
  if (!fs::exists(NVFP4CAL_TEST_PYTHON)) GTEST_SKIP() << "no " << NVFP4CAL_TEST_PYTHON;
  if (RunProcess({NVFP4CAL_TEST_PYTHON, "-c", "import numpy"}).exit_code != 0) {
    GTEST_SKIP() << NVFP4CAL_TEST_PYTHON << " has no numpy";
  }
  TempFolder dir("python");
  std::string model_dir = dir / "model";
  if (model == "example") {
    ASSERT_EQ(RunCli({"example", "--out", model_dir, "--shards", "2"}).exit_code, 0);
  } else {
    const std::string source = NVFP4CAL_DEV_LM_DIR;
    if (!fs::exists(source + "/model.safetensors")) GTEST_SKIP() << "no dev-lm at " << source;
    fs::create_directories(model_dir);
    for (const char* f : {"config.json", "model.safetensors", "hessians.safetensors"}) {
      fs::copy_file(source + "/" + f, model_dir + "/" + f);
    }
  }
  const ProcessResult q =
      RunCli({"quantize", "--model", model_dir, "--hessians", model_dir + "/hessians.safetensors",
              "--out", dir / "q", "--method", method, "--quiet"});
  ASSERT_EQ(q.exit_code, 0) << q.err;
  const ProcessResult d =
      RunCli({"dequantize", "--in", dir / "q", "--out", dir / "d", "--dtype", "float32"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  const ProcessResult py = RunProcess(
      {NVFP4CAL_TEST_PYTHON, NVFP4CAL_READER_SCRIPT, dir / "q", model_dir, dir / "d", method});
  EXPECT_EQ(py.exit_code, 0) << py.out << py.err;
  EXPECT_THAT(py.out, HasSubstr("python reader: ok, " +
                                std::string(model == "example" ? "14" : "28") + " modules"));
}

INSTANTIATE_TEST_SUITE_P(ModelsAndMethods, PythonReader,
                         ::testing::Combine(::testing::Values("example", "devlm"),
                                            ::testing::Values("max", "dss")),
                         [](const auto& param_info) {
                           return std::get<0>(param_info.param) + "_" +
                                  std::get<1>(param_info.param);
                         });

}  // namespace
}  // namespace nvfp4cal
