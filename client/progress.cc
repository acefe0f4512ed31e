#include "client/progress.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace nvfp4cal {
namespace {

std::string Percent(int64_t part, int64_t whole) {
  if (whole <= 0) return "-";
  return absl::StrFormat("%.1f%%", 100.0 * static_cast<double>(part) / static_cast<double>(whole));
}

std::string Change(double before, double after) {
  if (before <= 0.0) return "-";
  return absl::StrFormat("%+.1f%%", 100.0 * (after - before) / before);
}

}  // namespace

std::string FormatBytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (b >= 1e9) return absl::StrFormat("%.2f GB", b / 1e9);
  if (b >= 1e6) return absl::StrFormat("%.1f MB", b / 1e6);
  if (b >= 1e3) return absl::StrFormat("%.1f kB", b / 1e3);
  return absl::StrFormat("%d B", bytes);
}

void ProgressReporter::OnStart(int64_t tensors, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  tensors_total_ = tensors;
  bytes_total_ = bytes;
  start_ = std::chrono::steady_clock::now();
  last_draw_ = start_ - std::chrono::seconds(1);
  DrawLocked();
}

void ProgressReporter::OnTensorDone(const std::string& /*name*/, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  ++tensors_done_;
  bytes_done_ += bytes;
  DrawLocked();
}

void ProgressReporter::OnMessage(const std::string& line) {
  absl::MutexLock lock(&mu_);
  if (show_bar_ && drawn_) std::fprintf(out_, "\r\033[K");
  std::fprintf(out_, "%s\n", line.c_str());
  if (show_bar_ && drawn_) {
    last_draw_ = std::chrono::steady_clock::now() - std::chrono::seconds(1);
    DrawLocked();
  }
  std::fflush(out_);
}

void ProgressReporter::Finish() {
  absl::MutexLock lock(&mu_);
  if (show_bar_ && drawn_) {
    last_draw_ = std::chrono::steady_clock::now() - std::chrono::seconds(1);
    DrawLocked();
    std::fprintf(out_, "\n");
    std::fflush(out_);
  }
  drawn_ = false;
}

void ProgressReporter::DrawLocked() {
  if (!show_bar_) return;
  const auto now = std::chrono::steady_clock::now();
  // At most 10 redraws a second, but always the last one.
  if (tensors_done_ < tensors_total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  const double seconds = std::chrono::duration<double>(now - start_).count();
  const double fraction =
      bytes_total_ > 0 ? static_cast<double>(bytes_done_) / static_cast<double>(bytes_total_) : 0;
  constexpr int kWidth = 28;
  const int filled = std::clamp(static_cast<int>(fraction * kWidth), 0, kWidth);
  const double rate = seconds > 0 ? static_cast<double>(bytes_done_) / seconds : 0.0;
  std::string eta = "-";
  if (rate > 0 && bytes_done_ < bytes_total_) {
    eta =
        absl::StrFormat("%.0fs", std::ceil(static_cast<double>(bytes_total_ - bytes_done_) / rate));
  } else if (bytes_done_ >= bytes_total_) {
    eta = "0s";
  }
  std::fprintf(out_, "\r\033[K[%s%s] %lld/%lld tensors  %s/%s  %s/s  ETA %s",
               std::string(static_cast<size_t>(filled), '#').c_str(),
               std::string(static_cast<size_t>(kWidth - filled), '.').c_str(),
               static_cast<long long>(tensors_done_), static_cast<long long>(tensors_total_),
               FormatBytes(bytes_done_).c_str(), FormatBytes(bytes_total_).c_str(),
               FormatBytes(static_cast<int64_t>(rate)).c_str(), eta.c_str());
  std::fflush(out_);
  drawn_ = true;
}

std::string FormatStatsJson(const QuantizeReport& report) {
  using Json = nlohmann::ordered_json;
  Json modules = Json::array();
  Json totals = {{"modules", report.modules.size()}, {"blocks", 0},
                 {"objective_before", 0.0},          {"objective_after", 0.0},
                 {"blocks_scale_changed", 0},        {"blocks_beta_not_one", 0},
                 {"blocks_offset_not_zero", 0}};
  for (const ModuleReport& m : report.modules) {
    const TensorStats& s = m.stats;
    Json j = {{"module", m.module},
              {"rows", m.rows},
              {"cols", m.cols},
              {"method", std::string(MethodName(s.method))},
              {"hessian", m.hessian_entry},
              {"blocks", s.num_blocks},
              {"objective_before", s.objective_before},
              {"objective_after", s.objective_after},
              {"mse_before", s.mse_before},
              {"mse_after", s.mse_after},
              {"hessian_error_before", s.hessian_error_before},
              {"hessian_error_after", s.hessian_error_after},
              {"blocks_scale_changed", s.blocks_scale_changed},
              {"blocks_beta_not_one", s.blocks_beta_not_one},
              {"blocks_offset_not_zero", s.blocks_offset_not_zero},
              {"zero_hessian_blocks", s.zero_hessian_blocks},
              {"global_amax", s.global_amax},
              {"global_scale", s.global_scale}};
    if (s.method == Method::kGptq) {
      j["gptq"] = {{"damping_relative", s.gptq.damping_relative},
                   {"damping_increases", s.gptq.damping_increases},
                   {"factor_seconds", s.gptq.factor_seconds},
                   {"quantize_seconds", s.gptq.quantize_seconds}};
      // Computed only when asked (--gptq-compare); absent rather than a misleading 0.
      if (s.params.gptq.compare_local_hessian) {
        j["gptq"]["full_hessian_error"] = s.gptq.full_hessian_error;
        j["gptq"]["full_hessian_error_local_hessian"] = s.gptq.full_hessian_error_local_hessian;
        j["gptq"]["compare_seconds"] = s.gptq.compare_seconds;
      }
    }
    modules.push_back(std::move(j));
    totals["blocks"] = totals["blocks"].get<int64_t>() + s.num_blocks;
    totals["objective_before"] = totals["objective_before"].get<double>() + s.objective_before;
    totals["objective_after"] = totals["objective_after"].get<double>() + s.objective_after;
    for (const char* key :
         {"blocks_scale_changed", "blocks_beta_not_one", "blocks_offset_not_zero"}) {
      totals[key] = totals[key].get<int64_t>() + modules.back()[key].get<int64_t>();
    }
  }
  Json skipped = Json::array();
  for (const std::string& line : report.skipped) {
    const size_t colon = line.find(": ");
    skipped.push_back({{"module", line.substr(0, colon)},
                       {"reason", colon == std::string::npos ? "" : line.substr(colon + 2)}});
  }
  Json root = {{"label",
                {{"quant_algo", report.quant_algo},
                 {"kv_cache_quant_algo", report.kv_cache_scales > 0 ? Json("FP8") : Json()}}},
               {"quantizer", report.quantizer},
               {"modules", std::move(modules)},
               {"not_quantized", std::move(skipped)},
               {"totals", std::move(totals)},
               {"seconds",
                {{"read", report.read_seconds},
                 {"scan", report.scan_seconds},
                 {"copy", report.copy_seconds},
                 {"hessian_read", report.hessian_read_seconds},
                 {"quantize", report.quantize_seconds},
                 {"write", report.write_seconds},
                 {"total", report.total_seconds},
                 {"server_kernel", report.server_kernel_seconds},
                 {"server_queue", report.server_queue_seconds}}},
               {"bytes", {{"in", report.bytes_in}, {"out", report.bytes_out}}},
               {"memory", {{"peak_rss_bytes", report.peak_rss_bytes}}}};
  return root.dump(2) + "\n";
}

std::string FormatStatsTable(const QuantizeReport& report) {
  size_t name_width = 6;
  for (const ModuleReport& m : report.modules) name_width = std::max(name_width, m.module.size());
  const int w = static_cast<int>(name_width);
  std::string out = absl::StrFormat("%-*s  %-11s  %-13s  %-3s  %12s  %12s  %8s  %8s  %8s  %8s\n", w,
                                    "module", "shape", "method", "H", "obj before", "obj after",
                                    "change", "scales", "beta!=1", "off!=0");
  double before = 0, after = 0;
  int64_t blocks = 0, changed = 0, beta = 0, offset = 0;
  for (const ModuleReport& m : report.modules) {
    const TensorStats& s = m.stats;
    const bool dss = s.method == Method::kDss;
    out += absl::StrFormat("%-*s  %-11s  %-13s  %-3s  %12.5g  %12.5g  %8s  %8s  %8s  %8s\n", w,
                           m.module, absl::StrCat(m.rows, "x", m.cols),
                           std::string(MethodName(s.method)),
                           m.hessian_entry.empty() ? "no" : "yes", s.objective_before,
                           s.objective_after, Change(s.objective_before, s.objective_after),
                           Percent(s.blocks_scale_changed, s.num_blocks),
                           dss ? Percent(s.blocks_beta_not_one, s.num_blocks) : "-",
                           dss ? Percent(s.blocks_offset_not_zero, s.num_blocks) : "-");
    before += s.objective_before;
    after += s.objective_after;
    blocks += s.num_blocks;
    changed += s.blocks_scale_changed;
    beta += s.blocks_beta_not_one;
    offset += s.blocks_offset_not_zero;
  }
  out += absl::StrFormat("%-*s  %-11s  %-13s  %-3s  %12.5g  %12.5g  %8s  %8s  %8s  %8s\n", w,
                         absl::StrCat("total (", report.modules.size(), ")"), "", "", "", before,
                         after, Change(before, after), Percent(changed, blocks),
                         Percent(beta, blocks), Percent(offset, blocks));
  // gptq: the full-Hessian error, where propagation across blocks shows.
  double full_local = 0, full_gptq = 0;
  int gptq_modules = 0;
  std::string gptq_rows;
  for (const ModuleReport& m : report.modules) {
    if (m.stats.method != Method::kGptq || !m.stats.params.gptq.compare_local_hessian) continue;
    const GptqStats& g = m.stats.gptq;
    gptq_rows += absl::StrFormat("%-*s  %14.6g  %14.6g  %8s  %8.3g\n", w, m.module,
                                 g.full_hessian_error_local_hessian, g.full_hessian_error,
                                 Change(g.full_hessian_error_local_hessian, g.full_hessian_error),
                                 g.damping_relative);
    full_local += g.full_hessian_error_local_hessian;
    full_gptq += g.full_hessian_error;
    ++gptq_modules;
  }
  if (gptq_modules > 0) {
    out += absl::StrFormat(
        "\nfull-Hessian error tr(E H E^T), local_hessian vs gptq on the same tensor:\n"
        "%-*s  %14s  %14s  %8s  %8s\n",
        w, "module", "local_hessian", "gptq", "change", "damping");
    out += gptq_rows;
    out += absl::StrFormat("%-*s  %14.6g  %14.6g  %8s\n", w,
                           absl::StrCat("total (", gptq_modules, ")"), full_local, full_gptq,
                           Change(full_local, full_gptq));
  }
  return out;
}

}  // namespace nvfp4cal
