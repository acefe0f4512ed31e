#include "client/trace.h"

#include <utility>

#include "nlohmann/json.hpp"

namespace nvfp4cal {

void Trace::Span(std::string name, std::string category, absl::Time begin, absl::Time end) {
  absl::MutexLock lock(&mu_);
  const int thread =
      threads_.emplace(std::this_thread::get_id(), static_cast<int>(threads_.size())).first->second;
  events_.push_back({std::move(name), std::move(category), Micros(begin),
                     Micros(end) - Micros(begin), thread, 0});
}

void Trace::Async(std::string name, std::string category, absl::Time begin, absl::Time end) {
  absl::MutexLock lock(&mu_);
  events_.push_back({std::move(name), std::move(category), Micros(begin),
                     Micros(end) - Micros(begin), -1, next_id_++});
}

std::string Trace::Json() const {
  absl::MutexLock lock(&mu_);
  nlohmann::json events = nlohmann::json::array();
  for (const auto& [id, row] : threads_) {
    events.push_back({{"ph", "M"},
                      {"name", "thread_name"},
                      {"pid", 1},
                      {"tid", row},
                      {"args", {{"name", "thread " + std::to_string(row)}}}});
  }
  for (const Event& e : events_) {
    if (e.thread >= 0) {
      events.push_back({{"ph", "X"},
                        {"name", e.name},
                        {"cat", e.category},
                        {"pid", 1},
                        {"tid", e.thread},
                        {"ts", e.begin_us},
                        {"dur", e.duration_us}});
      continue;
    }
    for (const char* phase : {"b", "e"}) {
      events.push_back({{"ph", phase},
                        {"name", e.name},
                        {"cat", e.category},
                        {"pid", 1},
                        {"tid", 0},
                        {"id", e.id},
                        {"ts", phase[0] == 'b' ? e.begin_us : e.begin_us + e.duration_us}});
    }
  }
  return nlohmann::json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump() + "\n";
}

}  // namespace nvfp4cal
