#include "client/result_writer.h"

#include <algorithm>

#include "common/thread_name.h"

namespace nvfp4cal {

ResultWriter::ResultWriter(int threads, int64_t max_queued_bytes)
    : max_queued_bytes_(std::max<int64_t>(max_queued_bytes, 1)) {
  for (int k = 0; k < std::max(threads, 1); ++k) threads_.emplace_back([this] { Run(); });
}

ResultWriter::~ResultWriter() { (void)Finish(); }

absl::Status ResultWriter::Submit(int64_t bytes, std::function<absl::Status()> write) {
  absl::MutexLock lock(&mu_);
  auto room = [&] {
    mu_.AssertHeld();
    return !error_.ok() || bytes_ == 0 || bytes_ + bytes <= max_queued_bytes_;
  };
  mu_.Await(absl::Condition(&room));
  if (!error_.ok()) return error_;
  bytes_ += bytes;
  queue_.emplace_back(bytes, std::move(write));
  return absl::OkStatus();
}

absl::Status ResultWriter::Finish() {
  {
    absl::MutexLock lock(&mu_);
    finishing_ = true;
  }
  for (std::thread& t : threads_) t.join();
  threads_.clear();
  absl::MutexLock lock(&mu_);
  return error_;
}

void ResultWriter::Run() {
  NameThisThread("nvf-write");
  for (;;) {
    std::pair<int64_t, std::function<absl::Status()>> job;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [&] {
        mu_.AssertHeld();
        return !queue_.empty() || finishing_;
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // finishing, nothing left
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    // Queued writes run even after a failure (Submit's contract); the first failure is what
    // Finish returns. (The results' inputs were given back before they were queued.)
    absl::Status status = job.second();
    absl::MutexLock lock(&mu_);
    bytes_ -= job.first;
    if (!status.ok() && error_.ok()) error_ = std::move(status);
  }
}

}  // namespace nvfp4cal
