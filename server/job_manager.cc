#include "server/job_manager.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nvfp4cal/kernels/validation.h"
#include "proto/wire_codec.h"
#include "server/tensor_spec.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "payloads are little-endian and copied as is");

namespace nvfp4cal::server {
namespace {

constexpr int kDefaultPageSize = 100;
constexpr int kMaxPageSize = 1000;

// A checked SubmitJobRequest, ready to be split into row ranges.
struct ParsedJob {
  TensorSpec spec;
  std::shared_ptr<const TensorInput> input;
  std::shared_ptr<const std::string> weights;
};

// Hessian blocks [cols / 16, 16, 16] from the request's bytes in header.hessian.layout.
absl::StatusOr<std::shared_ptr<std::vector<float>>> ParseHessian(
    const v1::SubmitJobRequest& request, const TensorSpec& spec) {
  const v1::HessianLayout layout = request.header().hessian().layout();
  if (layout != v1::HESSIAN_LAYOUT_BLOCK_DIAGONAL && layout != v1::HESSIAN_LAYOUT_FULL) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "header.hessian.layout = %d of job tensor '%s' is not BLOCK_DIAGONAL or FULL",
        static_cast<int>(layout), spec.name));
  }
  const bool full = layout == v1::HESSIAN_LAYOUT_FULL;
  const int64_t elements = full ? spec.cols * spec.cols : spec.cols * kBlockElements;
  const std::string& bytes = request.hessian();
  if (static_cast<int64_t>(bytes.size()) != elements * 4) {
    return absl::InvalidArgumentError(
        absl::StrFormat("hessian has %d bytes; layout %s for cols = %d needs %d (fp32)",
                        bytes.size(), full ? "FULL" : "BLOCK_DIAGONAL", spec.cols, elements * 4));
  }
  auto blocks =
      std::make_shared<std::vector<float>>(static_cast<size_t>(spec.cols * kBlockElements));
  if (full) {
    std::vector<float> values(static_cast<size_t>(elements));
    std::memcpy(values.data(), bytes.data(), bytes.size());
    ExtractDiagonalBlocks(values.data(), 0, elements, spec.cols, blocks->data());
  } else {
    std::memcpy(blocks->data(), bytes.data(), bytes.size());
  }
  return blocks;
}

absl::StatusOr<ParsedJob> ParseJobRequest(const v1::SubmitJobRequest& request,
                                          const ServiceLimits& limits) {
  const int64_t request_bytes = static_cast<int64_t>(request.ByteSizeLong());
  if (request_bytes > limits.max_job_request_bytes) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "SubmitJob request has %d bytes; max_job_request_bytes = %d (stream larger tensors "
        "with Quantize)",
        request_bytes, limits.max_job_request_bytes));
  }
  if (request.priority() < kMinPriority || request.priority() > kMaxPriority) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "priority = %d is out of range [%d, %d]", request.priority(), kMinPriority, kMaxPriority));
  }
  if (request.timeout_ms() < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("timeout_ms = %d must be >= 0 (0 = no limit)", request.timeout_ms()));
  }
  absl::StatusOr<TensorSpec> spec = ParseTensorHeader(request.header(), limits);
  if (!spec.ok()) return spec.status();
  if (spec->params.method == Method::kGptq) {
    // A full Hessian is cols^2 * 4 bytes and its factorisation is prepared once per Hessian and
    // shared by the tensors using it: that is what a Quantize session holds, not a job.
    return absl::UnimplementedError(absl::StrFormat(
        "job tensor '%s': SubmitJob does not run method gptq (its full Hessian and factorisation "
        "are kept per Quantize session); stream it with Quantize",
        spec->name));
  }
  if (static_cast<int64_t>(request.weights().size()) != spec->WeightBytes()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weights has %d bytes; %d rows x %d cols of %s need %d", request.weights().size(),
        spec->rows, spec->cols, DTypeName(spec->dtype), spec->WeightBytes()));
  }
  auto input = std::make_shared<TensorInput>();
  input->name = spec->name;
  input->dtype = spec->dtype;
  input->cols = spec->cols;
  input->params = spec->params;
  if (request.hessian().empty()) {
    if (MethodNeedsHessian(spec->params.method)) {
      return absl::FailedPreconditionError(
          absl::StrFormat("hessian is empty but method %s of job tensor '%s' needs a Hessian",
                          MethodName(spec->params.method), spec->name));
    }
  } else {
    absl::StatusOr<std::shared_ptr<std::vector<float>>> blocks = ParseHessian(request, *spec);
    if (!blocks.ok()) return blocks.status();
    QuantizeRequest shape;
    static const float kDummy = 0.0f;  // only the shape is read here
    shape.weights = {&kDummy, spec->dtype, 1, spec->cols};
    shape.hessians = {(*blocks)->data(), spec->cols / kBlockElements};
    shape.params = spec->params;
    if (absl::Status s = ValidateShapeHessiansAndParams(shape); !s.ok()) {
      return PrefixStatus(s, absl::StrFormat("Hessian of job tensor '%s': ", spec->name));
    }
    input->hessian_blocks = *std::move(blocks);
  }
  const WeightView view{request.weights().data(), spec->dtype, spec->rows, spec->cols};
  absl::StatusOr<float> amax = ScanWeightRows(view, 0, spec->rows);
  if (!amax.ok()) {
    return PrefixStatus(amax.status(), absl::StrFormat("job tensor '%s' weights: ", spec->name));
  }
  if (spec->global_amax.has_value()) {
    if (absl::Status s = ValidateGlobalAmax(*spec->global_amax, *amax); !s.ok()) {
      return PrefixStatus(s, absl::StrFormat("job tensor '%s': header.", spec->name));
    }
  }
  input->global_amax = spec->global_amax.value_or(*amax);
  ParsedJob parsed;
  parsed.spec = *std::move(spec);
  parsed.input = std::move(input);
  parsed.weights = std::make_shared<const std::string>(request.weights());
  return parsed;
}

int64_t UnixMillisOrZero(absl::Time t) {
  return t == absl::InfiniteFuture() ? 0 : absl::ToUnixMillis(t);
}

}  // namespace

bool IsFinalJobState(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

JobManager::JobManager(const JobManagerOptions& options, Scheduler* scheduler,
                       ServerMetrics* metrics)
    : options_(options), scheduler_(scheduler), metrics_(metrics) {}

absl::StatusOr<v1::Job> JobManager::Submit(const v1::SubmitJobRequest& request,
                                           const Caller& caller) {
  absl::StatusOr<ParsedJob> parsed = ParseJobRequest(request, options_.limits);
  if (!parsed.ok()) return parsed.status();
  const TensorSpec& spec = parsed->spec;
  // GetJob returns the result in one message: refuse now what could never be fetched.
  const int64_t result_bytes = spec.rows * (spec.cols / 2 + spec.cols / kBlockElements);
  const int64_t result_room =
      options_.limits.max_send_message_bytes - ServiceLimits::kMessageOverheadBytes;
  if (result_bytes > result_room) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "tensor '%s': the job's result would be %d bytes of codes and scales, more than one "
        "GetJob response holds under max_send_message_bytes = %d; stream it with Quantize",
        spec.name, result_bytes, options_.limits.max_send_message_bytes));
  }
  uint64_t seq = 0;
  JobId scheduler_job = 0;
  {
    absl::MutexLock lock(&mu_);
    SweepLocked();
    if (absl::Status room = MakeRoomLocked(); !room.ok()) return room;
    seq = next_seq_++;
    Record& record = jobs_[seq];
    record.seq = seq;
    record.id = absl::StrCat("job-", seq);
    record.owner = caller.identity;
    record.tensor_name = spec.name;
    record.rows = spec.rows;
    record.cols = spec.cols;
    record.created = options_.clock();
    record.input = parsed->input;
    record.packed_codes.assign(static_cast<size_t>(spec.rows * spec.cols / 2), '\0');
    record.scales.assign(static_cast<size_t>(spec.rows * spec.cols / kBlockElements), '\0');
    JobOptions job_options;
    job_options.priority = request.priority();
    if (request.timeout_ms() > 0) {
      job_options.deadline = record.created + absl::Milliseconds(request.timeout_ms());
    }
    job_options.name = absl::StrCat(record.id, " (tensor '", spec.name, "')");
    // CreateJob runs no completions, so calling it under mu_ cannot re-enter OnItemDone.
    scheduler_job = scheduler_->CreateJob(job_options);
    record.scheduler_job = scheduler_job;
    ids_[record.id] = seq;
    ++unfinished_;
  }
  metrics_->AddInflightJobs(1);

  // Enqueue outside mu_: a rejected or expiring item runs its completion on this thread.
  const int64_t row_bytes = spec.cols * DTypeSize(spec.dtype);
  const int64_t step = std::max<int64_t>(1, options_.limits.max_rows_per_item);
  absl::Status rejected;
  for (int64_t first = 0; first < spec.rows && rejected.ok(); first += step) {
    auto task = std::make_shared<RowRangeTask>();
    task->tensor = parsed->input;
    task->weights = parsed->weights;
    task->byte_offset = static_cast<size_t>(first * row_bytes);
    task->row_begin = first;
    task->num_rows = std::min(step, spec.rows - first);
    const int64_t bytes = task->MemoryBytes();
    WorkItem item = MakeRowRangeItem(
        task, [this, seq, task](const WorkOutcome& outcome) { OnItemDone(seq, task, outcome); });
    rejected = scheduler_->Enqueue(scheduler_job, std::move(item));
    if (rejected.ok()) metrics_->AddDeviceMemoryInUse(bytes);
  }
  metrics_->SetQueueDepth(scheduler_->Stats().queued_items);
  if (!rejected.ok()) {
    bool failed_by_item = false;
    {
      absl::MutexLock lock(&mu_);
      Record& record = jobs_.at(seq);
      failed_by_item = IsFinalJobState(record.state);
      if (!failed_by_item) {
        // Not admitted: its completions are ignored from here on and the job is forgotten.
        record.state = v1::JOB_STATE_FAILED;
        --unfinished_;
      }
    }
    if (!failed_by_item) {
      metrics_->AddInflightJobs(-1);
      scheduler_->CancelJob(scheduler_job, rejected);
      scheduler_->ReleaseJob(scheduler_job);
      absl::MutexLock lock(&mu_);
      EraseLocked(seq);
      return PrefixStatus(rejected, absl::StrFormat("SubmitJob of tensor '%s': ", spec.name));
    }
  }
  scheduler_->ReleaseJob(scheduler_job);
  metrics_->AddBytesIn(static_cast<int64_t>(request.weights().size() + request.hessian().size()));
  absl::MutexLock lock(&mu_);
  Record& record = jobs_.at(seq);
  record.admitted = true;
  return SnapshotLocked(record);
}

void JobManager::OnItemDone(uint64_t seq, const std::shared_ptr<RowRangeTask>& task,
                            const WorkOutcome& outcome) {
  metrics_->AddDeviceMemoryInUse(-task->MemoryBytes());
  metrics_->SetQueueDepth(scheduler_->Stats().queued_items);
  if (outcome.worker >= 0) {
    metrics_->ObserveQueueWait(outcome.queue_wait);
    metrics_->ObserveKernelTime(outcome.kernel_time);
  }
  Delivery delivery;
  absl::Status failure;
  JobId scheduler_job = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(seq);
    if (it == jobs_.end() || IsFinalJobState(it->second.state)) return;
    Record& record = it->second;
    if (!outcome.status.ok()) {
      failure = PrefixStatus(outcome.status,
                             absl::StrFormat("tensor '%s' rows [%d, %d): ", record.tensor_name,
                                             task->row_begin, task->row_begin + task->num_rows));
      scheduler_job = record.scheduler_job;
      FinalizeLocked(&record, v1::JOB_STATE_FAILED, failure, &delivery);
    } else {
      const size_t code_row = static_cast<size_t>(record.cols / 2);
      const size_t scale_row = static_cast<size_t>(record.cols / kBlockElements);
      std::memcpy(&record.packed_codes[static_cast<size_t>(task->row_begin) * code_row],
                  task->packed_codes.data(), task->packed_codes.size());
      std::memcpy(&record.scales[static_cast<size_t>(task->row_begin) * scale_row],
                  task->scales.data(), task->scales.size());
      record.range_stats[task->row_begin] = task->stats;
      record.rows_done += task->num_rows;
      record.queue_wait += outcome.queue_wait;
      record.kernel_time += outcome.kernel_time;
      metrics_->AddBlocksQuantized(task->stats.num_blocks);
      metrics_->AddBytesOut(static_cast<int64_t>(task->packed_codes.size() + task->scales.size()));
      record.state = v1::JOB_STATE_RUNNING;
      if (record.rows_done == record.rows) {
        TensorStats total = record.range_stats.begin()->second;
        for (auto range = std::next(record.range_stats.begin()); range != record.range_stats.end();
             ++range) {
          AccumulateStats(range->second, &total);
        }
        v1::TensorSummary& summary = record.summary;
        summary.set_tensor_name(record.tensor_name);
        summary.set_tensor_index(0);
        summary.set_rows(record.rows);
        summary.set_cols(record.cols);
        summary.set_global_amax(record.input->global_amax);
        summary.set_global_scale(GlobalScaleFromAmax(record.input->global_amax));
        StatsToProto(total, summary.mutable_stats());
        summary.mutable_timings()->set_total_us(
            absl::ToInt64Microseconds(options_.clock() - record.created));
        summary.mutable_timings()->set_queue_wait_us(absl::ToInt64Microseconds(record.queue_wait));
        summary.mutable_timings()->set_kernel_us(absl::ToInt64Microseconds(record.kernel_time));
        FinalizeLocked(&record, v1::JOB_STATE_SUCCEEDED, absl::OkStatus(), &delivery);
      } else {
        ++record.version;
        delivery.observers = record.observers;
        delivery.job = SnapshotLocked(record);
        delivery.version = record.version;
      }
    }
  }
  // A row range failed on its own: drop the job's other queued work.
  if (!failure.ok()) scheduler_->CancelJob(scheduler_job, failure);
  Deliver(delivery);
}

void JobManager::FinalizeLocked(Record* record, v1::JobState state, const absl::Status& error,
                                Delivery* delivery) {
  record->state = state;
  record->error = error;
  record->finished = options_.clock();
  --unfinished_;
  metrics_->AddInflightJobs(-1);
  // "JOB_STATE_SUCCEEDED" -> "SUCCEEDED".
  metrics_->RecordJobFinished(v1::JobState_Name(state).substr(10));
  if (state != v1::JOB_STATE_SUCCEEDED) {
    std::string().swap(record->packed_codes);
    std::string().swap(record->scales);
  }
  record->range_stats.clear();
  record->input.reset();
  ++record->version;
  delivery->observers = std::move(record->observers);
  record->observers.clear();
  delivery->job = SnapshotLocked(*record);
  delivery->version = record->version;
}

absl::StatusOr<v1::Job> JobManager::Get(const std::string& job_id, bool include_result,
                                        const Caller& caller) {
  if (absl::Status s = CheckStringLength("job_id", job_id); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  SweepLocked();
  const Record* record = FindLocked(job_id, caller);
  if (record == nullptr) return absl::NotFoundError(NotFoundMessage(job_id));
  v1::Job job = SnapshotLocked(*record);
  if (include_result && record->state == v1::JOB_STATE_SUCCEEDED) {
    v1::JobResult* result = job.mutable_result();
    result->set_packed_codes(record->packed_codes);
    result->set_scales(record->scales);
    *result->mutable_summary() = record->summary;
    const int64_t bytes = static_cast<int64_t>(job.ByteSizeLong());
    if (bytes > options_.limits.max_send_message_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("the result of %s is %d bytes; max_send_message_bytes = %d", job_id,
                          bytes, options_.limits.max_send_message_bytes));
    }
  }
  return job;
}

absl::StatusOr<v1::Job> JobManager::Cancel(const std::string& job_id, const Caller& caller) {
  if (absl::Status s = CheckStringLength("job_id", job_id); !s.ok()) return s;
  const absl::Status reason = absl::CancelledError("cancelled by CancelJob");
  Delivery delivery;
  bool cancel = false;
  JobId scheduler_job = 0;
  v1::Job job;
  {
    absl::MutexLock lock(&mu_);
    SweepLocked();
    Record* record = FindLocked(job_id, caller);
    if (record == nullptr) return absl::NotFoundError(NotFoundMessage(job_id));
    if (!IsFinalJobState(record->state)) {
      FinalizeLocked(record, v1::JOB_STATE_CANCELLED, reason, &delivery);
      cancel = true;
      scheduler_job = record->scheduler_job;
    }
    job = SnapshotLocked(*record);
  }
  if (cancel) scheduler_->CancelJob(scheduler_job, reason);
  Deliver(delivery);
  return job;
}

absl::StatusOr<v1::ListJobsResponse> JobManager::List(const v1::ListJobsRequest& request,
                                                      const Caller& caller) {
  if (request.page_size() < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("page_size = %d must be >= 0 (0 = %d)",
                                                      request.page_size(), kDefaultPageSize));
  }
  const int page_size =
      request.page_size() == 0 ? kDefaultPageSize : std::min(request.page_size(), kMaxPageSize);
  if (absl::Status s = CheckStringLength("page_token", request.page_token()); !s.ok()) return s;
  uint64_t before = std::numeric_limits<uint64_t>::max();
  if (!request.page_token().empty() && !absl::SimpleAtoi(request.page_token(), &before)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "page_token = '%s' is not a token this server handed out", request.page_token()));
  }
  v1::ListJobsResponse response;
  absl::MutexLock lock(&mu_);
  SweepLocked();
  uint64_t last_seq = 0;
  for (auto it = jobs_.lower_bound(before); it != jobs_.begin();) {
    --it;
    if (!Visible(it->second, caller)) continue;
    if (response.jobs_size() == page_size) {
      // One more job exists beyond the page: the next page starts below the last one listed.
      response.set_next_page_token(absl::StrCat(last_seq));
      break;
    }
    *response.add_jobs() = SnapshotLocked(it->second);
    last_seq = it->first;
  }
  return response;
}

absl::Status JobManager::Watch(const std::string& job_id, std::shared_ptr<JobObserver> observer,
                               const Caller& caller) {
  if (absl::Status s = CheckStringLength("job_id", job_id); !s.ok()) return s;
  Delivery delivery;
  {
    absl::MutexLock lock(&mu_);
    SweepLocked();
    Record* record = FindLocked(job_id, caller);
    if (record == nullptr) return absl::NotFoundError(NotFoundMessage(job_id));
    delivery.observers.push_back(observer);
    delivery.job = SnapshotLocked(*record);
    delivery.version = record->version;
    if (!IsFinalJobState(record->state)) record->observers.push_back(std::move(observer));
  }
  Deliver(delivery);
  return absl::OkStatus();
}

void JobManager::Unwatch(const std::string& job_id, const JobObserver* observer) {
  absl::MutexLock lock(&mu_);
  auto id = ids_.find(job_id);
  if (id == ids_.end()) return;
  std::vector<std::shared_ptr<JobObserver>>& observers = jobs_.at(id->second).observers;
  observers.erase(std::remove_if(observers.begin(), observers.end(),
                                 [observer](const std::shared_ptr<JobObserver>& o) {
                                   return o.get() == observer;
                                 }),
                  observers.end());
}

bool JobManager::WaitUntilIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return unfinished_ == 0; };
  return mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

void JobManager::CancelAll(const absl::Status& reason) {
  std::vector<Delivery> deliveries;
  std::vector<JobId> scheduler_jobs;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [seq, record] : jobs_) {
      if (!record.admitted || IsFinalJobState(record.state)) continue;
      deliveries.emplace_back();
      FinalizeLocked(&record, v1::JOB_STATE_CANCELLED, reason, &deliveries.back());
      scheduler_jobs.push_back(record.scheduler_job);
    }
  }
  for (JobId job : scheduler_jobs) scheduler_->CancelJob(job, reason);
  for (const Delivery& delivery : deliveries) Deliver(delivery);
}

int64_t JobManager::unfinished_jobs() const {
  absl::MutexLock lock(&mu_);
  return unfinished_;
}

void JobManager::SweepLocked() {
  const absl::Time now = options_.clock();
  std::vector<uint64_t> expired;
  for (const auto& [seq, record] : jobs_) {
    if (IsFinalJobState(record.state) && record.admitted &&
        record.finished + options_.limits.job_retention <= now) {
      expired.push_back(seq);
    }
  }
  for (uint64_t seq : expired) EraseLocked(seq);
}

absl::Status JobManager::MakeRoomLocked() {
  if (static_cast<int64_t>(jobs_.size()) < options_.limits.max_jobs) return absl::OkStatus();
  const Record* oldest = nullptr;
  for (const auto& [seq, record] : jobs_) {
    if (!record.admitted || !IsFinalJobState(record.state)) continue;
    if (oldest == nullptr || record.finished < oldest->finished) oldest = &record;
  }
  if (oldest == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("too many jobs: max_jobs = %d and all %d kept jobs are unfinished",
                        options_.limits.max_jobs, jobs_.size()));
  }
  EraseLocked(oldest->seq);
  return absl::OkStatus();
}

JobManager::Record* JobManager::FindLocked(const std::string& job_id, const Caller& caller) {
  auto id = ids_.find(job_id);
  if (id == ids_.end()) return nullptr;
  Record& record = jobs_.at(id->second);
  return Visible(record, caller) ? &record : nullptr;
}

void JobManager::EraseLocked(uint64_t seq) {
  auto it = jobs_.find(seq);
  if (it == jobs_.end()) return;
  ids_.erase(it->second.id);
  jobs_.erase(it);
}

std::string JobManager::NotFoundMessage(const std::string& job_id) const {
  return absl::StrFormat(
      "job_id = '%s' is not a job this server keeps (unknown, or forgotten: finished jobs are "
      "kept for job_retention = %s, at most max_jobs = %d)",
      job_id, absl::FormatDuration(options_.limits.job_retention), options_.limits.max_jobs);
}

v1::Job JobManager::SnapshotLocked(const Record& record) const {
  v1::Job job;
  job.set_job_id(record.id);
  job.set_state(record.state);
  job.set_tensor_name(record.tensor_name);
  job.set_rows_total(record.rows);
  job.set_rows_done(record.rows_done);
  if (!record.error.ok()) {
    job.set_error_code(static_cast<int32_t>(record.error.code()));
    job.set_error_message(std::string(record.error.message()));
  }
  job.set_created_unix_ms(absl::ToUnixMillis(record.created));
  job.set_finished_unix_ms(UnixMillisOrZero(record.finished));
  return job;
}

void JobManager::Deliver(const Delivery& delivery) {
  for (const std::shared_ptr<JobObserver>& observer : delivery.observers) {
    observer->OnJobUpdate(delivery.job, delivery.version);
  }
}

}  // namespace nvfp4cal::server
