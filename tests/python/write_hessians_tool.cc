// Test helper: writes a Hessians file with the C++ HessianAccumulator and WriteHessiansFile
// from activations dumped by the Python tests, so that tests/python can compare the Python
// capture's file with the C++ writer's.
//
//   write_hessians_tool SPEC OUT
//
// SPEC, one directive per line:
//   hessian ENTRY IN FULL FILE   raw little-endian fp32 activations [tokens, IN] of ENTRY
//                                ("<module>.hessian"); FULL 1 keeps [IN, IN], 0 the blocks
//   alias ALIAS TARGET           `__metadata__` alias
//   output_amax MODULE VALUE     `<module>.output_amax`
// Hessians are divided by their token count (as nvfp4cal.capture's default). Exit 1 with the
// status on stderr on any error.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "client/hessian_accumulator.h"

namespace {

int Fail(const std::string& message) {
  std::cerr << "write_hessians_tool: " << message << "\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return Fail("usage: write_hessians_tool SPEC OUT");
  std::ifstream spec(argv[1]);
  if (!spec) return Fail(std::string("cannot open ") + argv[1]);
  std::vector<std::unique_ptr<nvfp4cal::HessianAccumulator>> accumulators;
  std::vector<nvfp4cal::NamedHessian> hessians;
  std::vector<std::pair<std::string, std::string>> aliases;
  std::vector<std::pair<std::string, float>> output_amax;
  std::string line;
  while (std::getline(spec, line)) {
    std::istringstream in(line);
    std::string kind;
    if (!(in >> kind)) continue;
    if (kind == "hessian") {
      std::string name, file;
      int64_t features = 0;
      int full = 0;
      if (!(in >> name >> features >> full >> file)) return Fail("bad line: " + line);
      std::ifstream data(file, std::ios::binary);
      std::vector<char> bytes((std::istreambuf_iterator<char>(data)),
                              std::istreambuf_iterator<char>());
      const int64_t tokens = static_cast<int64_t>(bytes.size()) / 4 / features;
      auto acc = std::make_unique<nvfp4cal::HessianAccumulator>(features, full != 0);
      const absl::Status added =
          acc->AddBatch(reinterpret_cast<const float*>(bytes.data()), tokens);
      if (!added.ok()) return Fail(std::string(added.message()));
      hessians.push_back({name, acc.get()});
      accumulators.push_back(std::move(acc));
    } else if (kind == "alias") {
      std::string alias, target;
      if (!(in >> alias >> target)) return Fail("bad line: " + line);
      aliases.emplace_back(alias, target);
    } else if (kind == "output_amax") {
      std::string module;
      float value = 0.0f;
      if (!(in >> module >> value)) return Fail("bad line: " + line);
      output_amax.emplace_back(module, value);
    } else {
      return Fail("unknown directive: " + line);
    }
  }
  const absl::Status written =
      nvfp4cal::WriteHessiansFile(argv[2], hessians,
                                  /*divide_by_tokens=*/true, aliases, output_amax);
  if (!written.ok()) return Fail(std::string(written.message()));
  return 0;
}
