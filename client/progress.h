// Terminal output of `nvfp4cal quantize`: the progress bar and the final statistics table.
//
//   nvfp4cal::ProgressReporter progress(stderr, /*show_bar=*/isatty(2));
//   QuantizeCheckpoint(options, quantizer, &progress);   // bar redrawn in place, messages above
//   std::cout << nvfp4cal::FormatStatsTable(report);
#ifndef NVFP4CAL_CLIENT_PROGRESS_H_
#define NVFP4CAL_CLIENT_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include "absl/synchronization/mutex.h"
#include "client/quantize_checkpoint.h"

namespace nvfp4cal {

// QuantizeObserver that draws "[#####.....] 12/40 tensors  120.0/480.0 MB  35.2 MB/s  ETA 10s"
// on one line of a terminal and prints messages above it. Without the bar (not a terminal) only
// the messages are printed.
class ProgressReporter : public QuantizeObserver {
 public:
  ProgressReporter(FILE* out, bool show_bar) : out_(out), show_bar_(show_bar) {}

  void OnStart(int64_t tensors, int64_t bytes) override;
  void OnTensorDone(const std::string& name, int64_t bytes) override;
  void OnMessage(const std::string& line) override;
  // Ends the bar's line.
  void Finish();

 private:
  void DrawLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  FILE* const out_;
  const bool show_bar_;
  absl::Mutex mu_;
  int64_t tensors_total_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tensors_done_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_total_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_done_ ABSL_GUARDED_BY(mu_) = 0;
  bool drawn_ ABSL_GUARDED_BY(mu_) = false;
  std::chrono::steady_clock::time_point start_ ABSL_GUARDED_BY(mu_);
  std::chrono::steady_clock::time_point last_draw_ ABSL_GUARDED_BY(mu_);
};

// The per-layer table of NUMERICS §4: module, shape, method, Hessian used, objective before
// (the max method) and after, its change, blocks whose scale changed, and for dss the blocks
// with beta != 1 and offset != 0; then a total line.
std::string FormatStatsTable(const QuantizeReport& report);

// The same statistics as JSON (`quantize --stats-json`): {"label": {...}, "quantizer", "modules":
// [{module, rows, cols, method, hessian, blocks, objective_before, objective_after, mse_before,
// mse_after, hessian_error_before, hessian_error_after, blocks_scale_changed,
// blocks_beta_not_one, blocks_offset_not_zero, zero_hessian_blocks, global_amax, global_scale,
// gptq: {...} for gptq}], "not_quantized": [{module, reason}], "totals": {...}, "seconds":
// {read, copy, quantize, write, server_kernel, server_queue}, "bytes": {in, out}}.
std::string FormatStatsJson(const QuantizeReport& report);

// "1.5 MB", "3.2 GB".
std::string FormatBytes(int64_t bytes);

}  // namespace nvfp4cal

#endif  // NVFP4CAL_CLIENT_PROGRESS_H_
