#include "server/log.h"

#include <cstdint>
#include <iostream>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"

namespace nvfp4cal::server {
namespace {

struct RateLimit {
  absl::Mutex mu;
  absl::Time window_start ABSL_GUARDED_BY(mu) = absl::InfinitePast();
  int lines_in_window ABSL_GUARDED_BY(mu) = 0;
  int64_t dropped ABSL_GUARDED_BY(mu) = 0;
};

}  // namespace

void LogLine(std::string_view line) {
  static RateLimit* const limit = new RateLimit();
  std::string text;
  {
    absl::MutexLock lock(&limit->mu);
    const absl::Time now = absl::Now();
    if (now - limit->window_start >= absl::Seconds(1)) {
      limit->window_start = now;
      limit->lines_in_window = 0;
    }
    if (limit->lines_in_window >= kMaxLinesPerSecond) {
      ++limit->dropped;
      return;
    }
    ++limit->lines_in_window;
    if (limit->dropped > 0) {
      absl::StrAppend(&text, "nvfp4cal-server: (", limit->dropped,
                      " log lines dropped by the rate limit)\n");
      limit->dropped = 0;
    }
    absl::StrAppend(&text, "nvfp4cal-server: ", absl::string_view(line.data(), line.size()), "\n");
  }
  std::cerr << text << std::flush;
}

}  // namespace nvfp4cal::server
