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
#include "server/gptq_work.h"
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
  // `weights` as checked (every method but gptq, whose backend checks its rows).
  std::optional<ValidatedRows> rows;
};

// The request's Hessian in header.hessian.layout: its diagonal blocks [cols / 16, 16, 16], and
// for method gptq also the whole matrix, admitted on `budget` (released with the last task).
struct ParsedHessian {
  std::shared_ptr<std::vector<float>> blocks;
  std::shared_ptr<FullHessian> full;
};

absl::StatusOr<ParsedHessian> ParseHessian(const v1::SubmitJobRequest& request,
                                           const TensorSpec& spec, FullHessianBudget* budget,
                                           ServerMetrics* metrics) {
  const v1::HessianLayout layout = request.header().hessian().layout();
  if (layout != v1::HESSIAN_LAYOUT_BLOCK_DIAGONAL && layout != v1::HESSIAN_LAYOUT_FULL) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "header.hessian.layout = %d of job tensor '%s' is not BLOCK_DIAGONAL or FULL",
        static_cast<int>(layout), spec.name));
  }
  const bool gptq = spec.params.method == Method::kGptq;
  if (gptq && layout != v1::HESSIAN_LAYOUT_FULL) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "header.hessian.layout = BLOCK_DIAGONAL of job tensor '%s', but method gptq propagates "
        "errors across blocks and needs the full matrix: send it as FULL",
        spec.name));
  }
  const bool full = layout == v1::HESSIAN_LAYOUT_FULL;
  const int64_t elements = full ? spec.cols * spec.cols : spec.cols * kBlockElements;
  const std::string& bytes = request.hessian();
  if (static_cast<int64_t>(bytes.size()) != elements * 4) {
    return absl::InvalidArgumentError(
        absl::StrFormat("hessian has %d bytes; layout %s for cols = %d needs %d (fp32)",
                        bytes.size(), full ? "FULL" : "BLOCK_DIAGONAL", spec.cols, elements * 4));
  }
  ParsedHessian parsed;
  parsed.blocks =
      std::make_shared<std::vector<float>>(static_cast<size_t>(spec.cols * kBlockElements));
  if (!full) {
    std::memcpy(parsed.blocks->data(), bytes.data(), bytes.size());
    return parsed;
  }
  std::vector<float> copy;
  float* values = nullptr;
  if (gptq) {
    const std::string what = absl::StrFormat("Hessian of job tensor '%s'", spec.name);
    absl::StatusOr<std::unique_ptr<FullHessianBudget::Reservation>> reservation =
        budget->Reserve(what, elements * 4);
    if (!reservation.ok()) {
      metrics->RecordFullHessianRefused("max_full_hessian_bytes");
      return reservation.status();
    }
    absl::StatusOr<std::shared_ptr<FullHessian>> matrix = FullHessian::Create(
        request.header().hessian().name().empty() ? spec.name : request.header().hessian().name(),
        spec.cols, *std::move(reservation), budget, metrics);
    if (!matrix.ok()) return matrix.status();
    parsed.full = *std::move(matrix);
    values = parsed.full->mutable_data();
  } else {
    copy.resize(static_cast<size_t>(elements));
    values = copy.data();
  }
  std::memcpy(values, bytes.data(), bytes.size());
  ExtractDiagonalBlocks(values, 0, elements, spec.cols, parsed.blocks->data());
  return parsed;
}

absl::StatusOr<ParsedJob> ParseJobRequest(const v1::SubmitJobRequest& request,
                                          const ServiceLimits& limits, FullHessianBudget* budget,
                                          ServerMetrics* metrics) {
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
  const bool gptq = spec->params.method == Method::kGptq;
  if (gptq && spec->cols > kMaxGptqColumns) {
    return absl::InvalidArgumentError(
        absl::StrFormat("header.cols = %d of gptq tensor '%s' exceeds the gptq limit %d",
                        spec->cols, spec->name, kMaxGptqColumns));
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
  ParsedJob parsed;
  parsed.weights = std::make_shared<const std::string>(request.weights());
  // The tensor as the kernels check it (shape, Hessian blocks, parameters); not for gptq.
  QuantizeRequest shape;
  shape.weights = {parsed.weights->data(), spec->dtype, spec->rows, spec->cols};
  shape.params = spec->params;
  if (request.hessian().empty()) {
    if (MethodNeedsHessian(spec->params.method)) {
      return absl::FailedPreconditionError(
          absl::StrFormat("hessian is empty but method %s of job tensor '%s' needs a Hessian",
                          MethodName(spec->params.method), spec->name));
    }
  } else {
    absl::StatusOr<ParsedHessian> hessian = ParseHessian(request, *spec, budget, metrics);
    if (!hessian.ok()) return hessian.status();
    if (gptq) {
      // gptq validates its full Hessian on a scheduler worker, with the factorisation (once).
      input->full_hessian = std::move(hessian->full);
    } else {
      input->hessian_pruning =
          ComputeSharedHessianPruning({hessian->blocks->data(), spec->cols / kBlockElements});
      input->hessian_blocks = std::move(hessian->blocks);
      shape.hessians = {input->hessian_blocks->data(), spec->cols / kBlockElements};
      input->hessian_pruning.AttachTo(&shape);
    }
  }
  std::optional<ValidatedTensor> checked;
  if (!gptq) {
    absl::StatusOr<ValidatedTensor> tensor = ValidateTensor(shape);
    if (!tensor.ok()) {
      return PrefixStatus(tensor.status(),
                          absl::StrCat(request.hessian().empty() ? "" : "Hessian of ",
                                       "job tensor '", spec->name, "': "));
    }
    checked = *std::move(tensor);
  }
  absl::StatusOr<WeightScan> scan = ScanWeights(shape.weights);
  if (!scan.ok()) {
    return PrefixStatus(scan.status(), absl::StrFormat("job tensor '%s' weights: ", spec->name));
  }
  if (spec->global_amax.has_value()) {
    if (absl::Status s = ValidateGlobalAmax(*spec->global_amax, scan->amax()); !s.ok()) {
      return PrefixStatus(s, absl::StrFormat("job tensor '%s': header.", spec->name));
    }
  }
  input->global_amax = spec->global_amax.value_or(scan->amax());
  if (checked.has_value()) {
    absl::StatusOr<ValidatedRows> rows =
        ValidateRows(*checked, input->global_amax, absl::MakeConstSpan(&*scan, 1));
    if (!rows.ok()) return rows.status();
    parsed.rows = *std::move(rows);
  }
  parsed.spec = *std::move(spec);
  parsed.input = std::move(input);
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
    : options_(options), scheduler_(scheduler), metrics_(metrics) {
  if (options_.full_hessians == nullptr) {
    own_full_hessians_ =
        std::make_unique<FullHessianBudget>(options_.limits.max_full_hessian_bytes, metrics);
  }
}

absl::StatusOr<v1::Job> JobManager::Submit(const v1::SubmitJobRequest& request,
                                           const Caller& caller) {
  absl::StatusOr<ParsedJob> parsed = ParseJobRequest(
      request, options_.limits,
      options_.full_hessians != nullptr ? options_.full_hessians : own_full_hessians_.get(),
      metrics_);
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
  FlowId scheduler_flow = 0;
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
    record.run = std::make_unique<TensorRun>(parsed->input, spec.rows, record.created);
    record.packed_codes.assign(static_cast<size_t>(spec.rows * spec.cols / 2), '\0');
    record.scales.assign(static_cast<size_t>(spec.rows * spec.cols / kBlockElements), '\0');
    FlowOptions flow_options;
    flow_options.priority = request.priority();
    if (request.timeout_ms() > 0) {
      flow_options.deadline = record.created + absl::Milliseconds(request.timeout_ms());
    }
    flow_options.name = absl::StrCat(record.id, " (tensor '", spec.name, "')");
    // OpenFlow runs no completions, so calling it under mu_ cannot re-enter OnItemDone.
    scheduler_flow = scheduler_->OpenFlow(flow_options);
    record.scheduler_flow = scheduler_flow;
    ids_[record.id] = seq;
    ++unfinished_;
  }
  metrics_->AddInflightJobs(1);

  // Enqueue outside mu_: a rejected or expiring item runs its completion on this thread. (The
  // run's tasks are made under mu_ and the run is read-only until its first completion.)
  std::vector<std::shared_ptr<RowRangeTask>> tasks;
  {
    absl::MutexLock lock(&mu_);
    tasks = jobs_.at(seq).run->MakeTasks(
        parsed->weights, 0, spec.rows,
        RowSplit{options_.limits.max_rows_per_item, options_.memory_budget_bytes},
        parsed->rows.has_value() ? &*parsed->rows : nullptr);
  }
  absl::Status rejected;
  for (const std::shared_ptr<RowRangeTask>& task : tasks) {
    const int64_t bytes = task->MemoryBytes();
    WorkItem item = MakeRowRangeItem(
        task, [this, seq, task](const WorkOutcome& outcome) { OnItemDone(seq, task, outcome); });
    rejected = scheduler_->Enqueue(scheduler_flow, std::move(item));
    if (!rejected.ok()) break;
    metrics_->AddDeviceMemoryInUse(bytes);
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
      scheduler_->CancelFlow(scheduler_flow, rejected);
      scheduler_->CloseFlow(scheduler_flow);
      absl::MutexLock lock(&mu_);
      EraseLocked(seq);
      return PrefixStatus(rejected, absl::StrFormat("SubmitJob of tensor '%s': ", spec.name));
    }
  }
  scheduler_->CloseFlow(scheduler_flow);
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
  FlowId scheduler_flow = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(seq);
    if (it == jobs_.end() || IsFinalJobState(it->second.state)) return;
    Record& record = it->second;
    if (!outcome.status.ok()) {
      failure = PrefixStatus(outcome.status,
                             absl::StrFormat("tensor '%s' rows [%d, %d): ", record.tensor_name,
                                             task->row_begin, task->row_begin + task->num_rows));
      scheduler_flow = record.scheduler_flow;
      FinalizeLocked(&record, v1::JOB_STATE_FAILED, failure, &delivery);
    } else {
      const size_t code_row = static_cast<size_t>(record.cols / 2);
      const size_t scale_row = static_cast<size_t>(record.cols / kBlockElements);
      std::memcpy(&record.packed_codes[static_cast<size_t>(task->row_begin) * code_row],
                  task->packed_codes.data(), task->packed_codes.size());
      std::memcpy(&record.scales[static_cast<size_t>(task->row_begin) * scale_row],
                  task->scales.data(), task->scales.size());
      const bool job_done = record.run->RecordDone(*task, outcome);
      record.rows_done = record.run->rows_done();
      metrics_->AddBlocksQuantized(task->stats.num_blocks);
      metrics_->AddBytesOut(static_cast<int64_t>(task->packed_codes.size() + task->scales.size()));
      record.state = v1::JOB_STATE_RUNNING;
      if (job_done) {
        record.summary = record.run->Summary(0, options_.clock());
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
  if (!failure.ok()) scheduler_->CancelFlow(scheduler_flow, failure);
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
  // Frees the run's statistics and its Hessian (a gptq job's full matrix and plans go with the
  // last task that still holds them).
  record->run.reset();
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
  FlowId scheduler_flow = 0;
  v1::Job job;
  {
    absl::MutexLock lock(&mu_);
    SweepLocked();
    Record* record = FindLocked(job_id, caller);
    if (record == nullptr) return absl::NotFoundError(NotFoundMessage(job_id));
    if (!IsFinalJobState(record->state)) {
      FinalizeLocked(record, v1::JOB_STATE_CANCELLED, reason, &delivery);
      cancel = true;
      scheduler_flow = record->scheduler_flow;
    }
    job = SnapshotLocked(*record);
  }
  if (cancel) scheduler_->CancelFlow(scheduler_flow, reason);
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
  std::vector<FlowId> scheduler_flows;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [seq, record] : jobs_) {
      if (!record.admitted || IsFinalJobState(record.state)) continue;
      deliveries.emplace_back();
      FinalizeLocked(&record, v1::JOB_STATE_CANCELLED, reason, &deliveries.back());
      scheduler_flows.push_back(record.scheduler_flow);
    }
  }
  for (FlowId job : scheduler_flows) scheduler_->CancelFlow(job, reason);
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
