#include "server/stream_watchdog.h"

#include <algorithm>
#include <vector>

#include "server/quantize_session.h"

namespace nvfp4cal::server {

StreamWatchdog::StreamWatchdog(absl::Duration timeout)
    : period_(std::clamp(timeout / 4, absl::Milliseconds(5), absl::Seconds(1))),
      thread_([this] { Run(); }) {}

StreamWatchdog::~StreamWatchdog() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

void StreamWatchdog::Add(QuantizeSession* session) {
  absl::MutexLock lock(&mu_);
  sessions_.insert(session);
}

void StreamWatchdog::Remove(QuantizeSession* session) {
  absl::MutexLock lock(&mu_);
  sessions_.erase(session);
}

void StreamWatchdog::Run() {
  std::vector<QuantizeSession*> sessions;
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&stopping_), period_);
      if (stopping_) return;
      // A registered session is alive (Remove comes before its last Unref); the reference
      // keeps it so while it is checked outside the lock (CheckIdle may finish the call, and
      // gRPC may then run OnDone, which calls Remove, on this thread).
      sessions.assign(sessions_.begin(), sessions_.end());
      for (QuantizeSession* session : sessions) session->Ref();
    }
    const absl::Time now = absl::Now();
    for (QuantizeSession* session : sessions) {
      session->CheckIdle(now);
      session->Unref();
    }
  }
}

}  // namespace nvfp4cal::server
