// Server log lines (stderr), rate limited so that a hostile client cannot flood the log.
//
//   LogLine(absl::StrCat("Quantize from ", context->peer(), ": ", status.ToString()));
//
// At most kMaxLinesPerSecond lines per second are written; the lines dropped are counted and
// announced with the next line written.
#ifndef NVFP4CAL_SERVER_LOG_H_
#define NVFP4CAL_SERVER_LOG_H_

#include <string_view>

namespace nvfp4cal::server {

inline constexpr int kMaxLinesPerSecond = 20;

// Writes "nvfp4cal-server: <line>\n" to stderr unless the rate limit is reached.
void LogLine(std::string_view line);

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_LOG_H_
