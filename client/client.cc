#include "client/client.h"

#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "client/file_util.h"
#include "grpcpp/grpcpp.h"
#include "proto/grpc_status.h"
#include "proto/wire_codec.h"

namespace nvfp4cal {
namespace {

using QuantizeStream = grpc::ClientReaderWriter<v1::QuantizeRequest, v1::QuantizeResponse>;

absl::Duration Backoff(const ClientOptions& options, int failures) {
  absl::Duration d = options.initial_backoff;
  for (int i = 1; i < failures && d < options.max_backoff; ++i) d *= 2;
  return std::min(d, options.max_backoff);
}

bool Retryable(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable;
}

// Whether the job runs gptq with its full Hessian (sent whole rather than as blocks).
bool SendsFullHessian(const TensorJob& job) {
  return job.params.method == Method::kGptq && job.full_hessian.data != nullptr &&
         !job.hessian_key.empty();
}

}  // namespace

// One QuantizeTensors call: a shared queue of units (tensors sharing a Hessian travel together)
// and one worker thread per address, each running Quantize sessions with its server.
class Client::Call {
 public:
  Call(Client* client, absl::Span<const TensorJob> jobs, const QuantizeResultCallback& on_result)
      : client_(client), jobs_(jobs), on_result_(on_result), delivered_(jobs.size(), false) {}

  absl::Status Run(ClientCallStats* stats) {
    // Units: jobs sharing a Hessian key travel together; then round robin over the addresses.
    std::vector<Unit> units;
    std::map<std::string, size_t> unit_of_key;
    for (size_t i = 0; i < jobs_.size(); ++i) {
      const std::string& key = jobs_[i].hessian_key;
      if (!key.empty()) {
        const auto it = unit_of_key.find(key);
        if (it != unit_of_key.end()) {
          units[it->second].push_back(i);
          continue;
        }
        unit_of_key[key] = units.size();
      }
      units.push_back({i});
    }
    // A session keeps a Hessian whole only when the header defining it is a gptq tensor's, so
    // gptq tensors go first within a unit whose block-method tensors share the Hessian.
    for (Unit& unit : units) {
      std::stable_partition(unit.begin(), unit.end(),
                            [this](size_t j) { return SendsFullHessian(jobs_[j]); });
    }
    const size_t n = client_->stubs_.size();
    const size_t start = client_->next_address_.fetch_add(1) % n;
    {
      absl::MutexLock lock(&mu_);
      queues_.resize(n);
      tensors_per_address_.assign(n, 0);
      for (size_t u = 0; u < units.size(); ++u) {
        queues_[(start + u) % n].push_back(std::move(units[u]));
      }
    }
    {
      absl::MutexLock lock(&mu_);
      alive_workers_ = static_cast<int>(n);
    }
    std::vector<std::thread> workers;
    for (size_t a = 0; a < n; ++a) workers.emplace_back([this, a] { Worker(a); });
    for (std::thread& t : workers) t.join();
    absl::MutexLock lock(&mu_);
    if (stats != nullptr) {
      stats->tensors_per_address = tensors_per_address_;
      stats->failed_attempts = failed_attempts_;
    }
    if (!first_error_.ok()) return first_error_;
    for (size_t i = 0; i < jobs_.size(); ++i) {
      if (!delivered_[i]) {
        return absl::InternalError(absl::StrCat(jobs_[i].name, ": no result was received"));
      }
    }
    return absl::OkStatus();
  }

 private:
  using Unit = std::vector<size_t>;

  // One Quantize stream with one server.
  struct Session {
    struct Pending {
      size_t job = 0;
      std::vector<uint8_t> codes;
      std::vector<uint8_t> scales;
      int64_t rows_covered = 0;
      bool done = false;
    };
    grpc::ClientContext context;
    std::unique_ptr<QuantizeStream> stream;
    std::thread reader;
    absl::Mutex mu;
    std::map<std::string, Pending> pending ABSL_GUARDED_BY(mu);
    absl::Status reader_error ABSL_GUARDED_BY(mu);
    std::set<std::string> hessians_sent;
    // What the server holds for the Hessians sent: diagonal blocks (every Hessian) and full
    // matrices (gptq), against max_session_hessian_bytes / max_session_full_hessian_bytes.
    int64_t hessian_bytes = 0;
    int64_t full_hessian_bytes = 0;
    // Tensor names the server keeps for the session, against max_session_tensor_name_bytes.
    int64_t name_bytes = 0;
  };

  const std::string& Address(size_t a) const { return client_->options_.addresses[a]; }

  void Abort(const absl::Status& status) {
    absl::MutexLock lock(&mu_);
    if (first_error_.ok()) first_error_ = status;
    aborted_ = true;
    for (Session* s : active_) s->context.TryCancel();
  }

  // Whether worker `a` could take a unit now: its own queue, units of failed sessions, or
  // (work stealing) another address's queue.
  bool HasUnitFor(size_t a) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!queues_[a].empty() || !orphans_.empty()) return true;
    if (!client_->options_.work_stealing) return false;
    for (const std::deque<Unit>& q : queues_) {
      if (!q.empty()) return true;
    }
    return false;
  }

  bool AllQueuesEmpty() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!orphans_.empty()) return false;
    for (const std::deque<Unit>& q : queues_) {
      if (!q.empty()) return false;
    }
    return true;
  }

  // Own queue's head, then orphans, then the tail of the longest other queue.
  bool PopUnitLocked(size_t a, Unit* unit) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (aborted_ || !HasUnitFor(a)) return false;
    if (!queues_[a].empty()) {
      *unit = std::move(queues_[a].front());
      queues_[a].pop_front();
    } else if (!orphans_.empty()) {
      *unit = std::move(orphans_.front());
      orphans_.pop_front();
    } else {
      size_t victim = a;
      for (size_t b = 0; b < queues_.size(); ++b) {
        if (queues_[b].size() > queues_[victim].size()) victim = b;
      }
      *unit = std::move(queues_[victim].back());
      queues_[victim].pop_back();
    }
    ++in_flight_;
    return true;
  }

  // Blocks until worker `a` has a unit (true) or everything is done or aborted (false). A
  // worker without own work waits while others hold units that may fail back to the orphans.
  bool NextUnit(size_t a, Unit* unit) {
    absl::MutexLock lock(&mu_);
    auto ready = [this, a]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return aborted_ || HasUnitFor(a) || (AllQueuesEmpty() && in_flight_ == 0);
    };
    mu_.Await(absl::Condition(&ready));
    return PopUnitLocked(a, unit);
  }

  bool TryNextUnit(size_t a, Unit* unit) {
    absl::MutexLock lock(&mu_);
    return PopUnitLocked(a, unit);
  }

  // Returns `done` units to the call; `retry` (jobs of a failed session without a result)
  // goes to the orphans that every live worker takes first after its own queue.
  void Settle(size_t done, const std::vector<size_t>& retry) {
    absl::MutexLock lock(&mu_);
    if (!retry.empty()) orphans_.push_front(retry);
    in_flight_ -= static_cast<int64_t>(done);
  }

  // Waits up to `d` unless the call aborts first.
  void Sleep(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithTimeout(absl::Condition(&aborted_), d);
  }

  absl::StatusOr<v1::ServerInfo> FetchInfo(size_t a) {
    grpc::ClientContext context;
    const absl::Duration timeout = client_->options_.timeout > absl::ZeroDuration()
                                       ? client_->options_.timeout
                                       : absl::Seconds(30);
    context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
    client_->Authorize(&context);
    v1::ServerInfo info;
    const grpc::Status status =
        client_->stubs_[a]->GetServerInfo(&context, v1::GetServerInfoRequest(), &info);
    if (!status.ok()) return FromGrpc(status, absl::StrCat("server ", Address(a)));
    return info;
  }

  void Worker(size_t a) {
    int failures = 0;
    std::optional<v1::Limits> limits;
    absl::Status last_error;
    Unit unit;
    while (NextUnit(a, &unit)) {
      absl::Status status;
      size_t units_sent = 0;
      std::vector<size_t> incomplete;
      if (!limits.has_value()) {
        absl::StatusOr<v1::ServerInfo> info = FetchInfo(a);
        if (info.ok()) {
          limits = info->limits();
        } else {
          status = info.status();
          incomplete = unit;
          units_sent = 1;
        }
      }
      if (limits.has_value()) {
        status = RunSession(a, *limits, &unit, &units_sent, &incomplete);
      }
      if (status.ok()) {
        failures = 0;
        Settle(units_sent, {});
        continue;
      }
      if (!Retryable(status)) {
        Abort(status);
        Settle(units_sent, {});
        return;
      }
      ++failures;
      last_error = status;
      {
        absl::MutexLock lock(&mu_);
        ++failed_attempts_;
      }
      if (failures >= client_->options_.max_attempts) {
        bool last_one = false;
        {
          absl::MutexLock lock(&mu_);
          last_one = --alive_workers_ == 0;
          // Its queued units become everyone's.
          while (!queues_[a].empty()) {
            orphans_.push_back(std::move(queues_[a].front()));
            queues_[a].pop_front();
          }
        }
        const absl::Status given_up =
            absl::UnavailableError(absl::StrCat("server ", Address(a), " unavailable after ",
                                                failures, " attempts: ", status.message()));
        if (last_one) {
          Abort(given_up);
          Settle(units_sent, {});
        } else {
          Settle(units_sent, incomplete);  // the other servers take it
        }
        return;
      }
      Settle(units_sent, incomplete);
      Sleep(Backoff(client_->options_, failures));
    }
  }

  // Runs one session starting with *unit and taking more units while the queue has some.
  // *units_sent counts the units this session took; *incomplete lists their jobs without a
  // result when the session failed.
  absl::Status RunSession(size_t a, const v1::Limits& limits, Unit* unit, size_t* units_sent,
                          std::vector<size_t>* incomplete) {
    Session session;
    if (client_->options_.timeout > absl::ZeroDuration()) {
      session.context.set_deadline(std::chrono::system_clock::now() +
                                   absl::ToChronoMilliseconds(client_->options_.timeout));
    }
    {
      absl::MutexLock lock(&mu_);
      if (aborted_) {
        *units_sent = 1;
        return first_error_;
      }
      active_.insert(&session);
    }
    client_->Authorize(&session.context);
    session.stream = client_->stubs_[a]->Quantize(&session.context);
    session.reader = std::thread([this, &session, a] { ReadResponses(&session, a); });
    int64_t chunk_bytes = client_->options_.chunk_bytes;
    if (limits.max_receive_message_bytes() > 0) {
      chunk_bytes = std::min(chunk_bytes, limits.max_receive_message_bytes() / 4);
    }
    chunk_bytes = std::max<int64_t>(chunk_bytes, 1024);

    bool writable = true;
    absl::Status local_error;
    v1::QuantizeRequest options_message;
    options_message.mutable_session()->set_priority(client_->options_.priority);
    options_message.mutable_session()->set_client_name(client_->options_.client_name);
    writable = session.stream->Write(options_message);
    // The first unit belongs to this session even when not even the session options could be
    // written (server gone): its jobs are then reported incomplete and retried elsewhere.
    std::vector<size_t> session_jobs(unit->begin(), unit->end());
    ++*units_sent;
    bool first = true;
    while (writable) {
      if (!first) {
        if (!TryNextUnit(a, unit)) break;
        if (ExceedsSessionLimits(*unit, session, limits)) {
          Settle(1, *unit);  // back to the queue for a fresh session
          break;
        }
        ++*units_sent;
        session_jobs.insert(session_jobs.end(), unit->begin(), unit->end());
      }
      first = false;
      for (size_t k = 0; k < unit->size(); ++k) {
        const size_t j = (*unit)[k];
        local_error = CheckLimits(jobs_[j], limits);
        if (!local_error.ok()) break;
        // The unit holds every job of its Hessian: the last one lets the server free it.
        bool last_use = true;
        for (size_t later = k + 1; later < unit->size(); ++later) {
          last_use = last_use && jobs_[(*unit)[later]].hessian_key != jobs_[j].hessian_key;
        }
        writable = SendTensor(&session, j, chunk_bytes, last_use);
        if (!writable) break;
      }
      if (!local_error.ok()) break;
    }
    if (!local_error.ok()) {
      session.context.TryCancel();
    } else if (writable) {
      session.stream->WritesDone();
    }
    session.reader.join();
    const grpc::Status finished = session.stream->Finish();
    {
      absl::MutexLock lock(&mu_);
      active_.erase(&session);
    }
    absl::MutexLock lock(&session.mu);
    for (size_t j : session_jobs) {
      const auto it = session.pending.find(jobs_[j].name);
      if (it == session.pending.end() || !it->second.done) incomplete->push_back(j);
    }
    if (!local_error.ok()) return local_error;
    if (!session.reader_error.ok()) return session.reader_error;
    if (!finished.ok()) return FromGrpc(finished, absl::StrCat("server ", Address(a)));
    if (!incomplete->empty()) {
      return absl::InternalError(absl::StrCat("server ", Address(a),
                                              " ended the stream without "
                                              "results for ",
                                              jobs_[incomplete->front()].name));
    }
    return absl::OkStatus();
  }

  // What a Hessian of a tensor with `cols` inputs costs a session on the server: its diagonal
  // blocks always, and for gptq the whole matrix too.
  static int64_t HessianBlockBytes(int64_t cols) { return cols * 16 * 4; }
  static int64_t FullHessianBytes(int64_t cols) { return cols * cols * 4; }

  // Whether the unit's new Hessians would take the session over the server's limits.
  bool ExceedsSessionLimits(const Unit& unit, const Session& session,
                            const v1::Limits& limits) const {
    std::set<std::string> keys;
    int64_t block_bytes = 0;
    int64_t full_bytes = 0;
    int64_t name_bytes = 0;
    for (size_t j : unit) {
      const TensorJob& job = jobs_[j];
      name_bytes += NameBytes(job.name);
      if (job.hessian_key.empty() || session.hessians_sent.count(job.hessian_key) != 0) continue;
      if (!keys.insert(job.hessian_key).second) continue;
      block_bytes += HessianBlockBytes(job.weights.cols);
      if (SendsFullHessian(job)) full_bytes += FullHessianBytes(job.weights.cols);
    }
    const int64_t max_blocks = limits.max_session_hessian_bytes();
    const int64_t max_full = limits.max_session_full_hessian_bytes();
    const int64_t max_names = limits.max_session_tensor_name_bytes();
    return (max_blocks > 0 && session.hessian_bytes + block_bytes > max_blocks) ||
           (max_full > 0 && full_bytes > 0 && session.full_hessian_bytes + full_bytes > max_full) ||
           (max_names > 0 && session.name_bytes + name_bytes > max_names);
  }

  // What the server counts for a tensor name against max_session_tensor_name_bytes.
  static int64_t NameBytes(const std::string& name) {
    return static_cast<int64_t>(name.size()) + 64;
  }

  absl::Status CheckLimits(const TensorJob& job, const v1::Limits& limits) const {
    const int64_t elements = job.weights.rows * job.weights.cols;
    if (limits.max_tensor_elements() > 0 && elements > limits.max_tensor_elements()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          job.name, ": ", elements, " elements exceed the server's max_tensor_elements ",
          limits.max_tensor_elements()));
    }
    const int64_t row_bytes = job.weights.cols * DTypeSize(job.weights.dtype);
    if (limits.max_receive_message_bytes() > 0 &&
        row_bytes + 4096 > limits.max_receive_message_bytes()) {
      return absl::ResourceExhaustedError(absl::StrCat(job.name, ": one row is ", row_bytes,
                                                       " bytes, over the server's "
                                                       "max_receive_message_bytes ",
                                                       limits.max_receive_message_bytes()));
    }
    return absl::OkStatus();
  }

  // Header, the Hessian's chunks when this session has not seen it, then the weight rows.
  // release: the session's last tensor with this Hessian (HessianRef.release_after).
  bool SendTensor(Session* session, size_t j, int64_t chunk_bytes, bool release) {
    const TensorJob& job = jobs_[j];
    const int64_t rows = job.weights.rows;
    const int64_t cols = job.weights.cols;
    {
      absl::MutexLock lock(&session->mu);
      Session::Pending& p = session->pending[job.name];
      p.job = j;
      p.codes.assign(static_cast<size_t>(rows * cols / 2), 0);
      p.scales.assign(static_cast<size_t>(rows * cols / 16), 0);
    }
    v1::QuantizeRequest request;
    v1::TensorHeader* header = request.mutable_header();
    header->set_name(job.name);
    header->set_rows(rows);
    header->set_cols(cols);
    header->set_dtype(DTypeToProto(job.weights.dtype));
    SearchParamsToProto(job.params, header->mutable_method());
    header->set_global_amax(job.global_amax);
    const bool full = SendsFullHessian(job);
    const bool upper = client_->options_.send_full_hessian_upper;
    const bool has_hessian = (full || job.hessians.data != nullptr) && !job.hessian_key.empty();
    const bool define = has_hessian && session->hessians_sent.count(job.hessian_key) == 0;
    if (has_hessian) {
      header->mutable_hessian()->set_name(job.hessian_key);
      header->mutable_hessian()->set_layout(!full   ? v1::HESSIAN_LAYOUT_BLOCK_DIAGONAL
                                            : upper ? v1::HESSIAN_LAYOUT_FULL_UPPER
                                                    : v1::HESSIAN_LAYOUT_FULL);
      header->mutable_hessian()->set_release_after(release);
    }
    if (!session->stream->Write(request)) return false;
    session->name_bytes += NameBytes(job.name);
    if (define && full) {
      session->hessians_sent.insert(job.hessian_key);
      session->hessian_bytes += HessianBlockBytes(cols);
      session->full_hessian_bytes += FullHessianBytes(cols);
      if (!SendFullHessian(session, job.full_hessian, upper, chunk_bytes)) return false;
    } else if (define) {
      session->hessians_sent.insert(job.hessian_key);
      const int64_t total = job.hessians.num_blocks * 256;
      session->hessian_bytes += HessianBlockBytes(cols);
      const int64_t step = std::max<int64_t>(256, chunk_bytes / 4 / 256 * 256);
      for (int64_t offset = 0; offset < total; offset += step) {
        const int64_t n = std::min(step, total - offset);
        v1::QuantizeRequest chunk;
        chunk.mutable_hessian()->set_element_offset(offset);
        chunk.mutable_hessian()->set_data(reinterpret_cast<const char*>(job.hessians.data + offset),
                                          static_cast<size_t>(n * 4));
        if (!session->stream->Write(chunk)) return false;
      }
    }
    if (has_hessian && release) {
      // The server forgot it with this header; it no longer counts against the session.
      session->hessians_sent.erase(job.hessian_key);
      session->hessian_bytes -= HessianBlockBytes(cols);
      if (full) session->full_hessian_bytes -= FullHessianBytes(cols);
    }
    const int64_t row_bytes = cols * DTypeSize(job.weights.dtype);
    const int64_t rows_per_chunk = std::max<int64_t>(1, chunk_bytes / row_bytes);
    const char* data = static_cast<const char*>(job.weights.data);
    for (int64_t r = 0; r < rows; r += rows_per_chunk) {
      const int64_t n = std::min(rows_per_chunk, rows - r);
      v1::QuantizeRequest chunk;
      v1::WeightChunk* w = chunk.mutable_weights();
      w->set_row_begin(r);
      w->set_num_rows(n);
      w->set_data(data + r * row_bytes, static_cast<size_t>(n * row_bytes));
      if (!session->stream->Write(chunk)) return false;
    }
    return true;
  }

  // The full Hessian in chunks of about chunk_bytes, cut straight from `h`: the whole matrix
  // row-major, or (upper) row r's elements H[r, r..n-1] one row after the other.
  bool SendFullHessian(Session* session, const FullHessianView& h, bool upper,
                       int64_t chunk_bytes) {
    const int64_t n = h.n;
    const int64_t step = std::max<int64_t>(256, chunk_bytes / 4);
    int64_t sent = 0;
    std::string buffer;
    auto flush = [&]() {
      if (buffer.empty()) return true;
      v1::QuantizeRequest chunk;
      chunk.mutable_hessian()->set_element_offset(sent);
      sent += static_cast<int64_t>(buffer.size() / 4);
      chunk.mutable_hessian()->set_data(std::move(buffer));
      buffer.clear();
      return session->stream->Write(chunk);
    };
    const int64_t rows = upper ? n : 1;
    for (int64_t r = 0; r < rows; ++r) {
      // Upper: one row's tail; whole matrix: all n * n elements as one "row".
      const float* begin = upper ? h.data + r * n + r : h.data;
      const int64_t count = upper ? n - r : n * n;
      for (int64_t done = 0; done < count;) {
        const int64_t take = std::min(count - done, step - static_cast<int64_t>(buffer.size() / 4));
        buffer.append(reinterpret_cast<const char*>(begin + done), static_cast<size_t>(take * 4));
        done += take;
        if (static_cast<int64_t>(buffer.size() / 4) == step && !flush()) return false;
      }
    }
    return flush();
  }

  void ReadResponses(Session* session, size_t a) {
    v1::QuantizeResponse response;
    while (session->stream->Read(&response)) {
      absl::Status status = HandleResponse(session, a, &response);
      if (!status.ok()) {
        {
          absl::MutexLock lock(&session->mu);
          if (session->reader_error.ok()) {
            session->reader_error = absl::Status(
                status.code(), absl::StrCat("server ", Address(a), ": ", status.message()));
          }
        }
        Abort(session->reader_error);
        session->context.TryCancel();
      }
    }
  }

  absl::Status HandleResponse(Session* session, size_t a, v1::QuantizeResponse* response) {
    if (response->has_result()) {
      const v1::ResultChunk& chunk = response->result();
      absl::MutexLock lock(&session->mu);
      const auto it = session->pending.find(chunk.tensor_name());
      if (it == session->pending.end() || it->second.done) {
        return absl::InternalError(
            absl::StrCat("result for unexpected tensor '", chunk.tensor_name(), "'"));
      }
      Session::Pending& p = it->second;
      const TensorJob& job = jobs_[p.job];
      const int64_t cols = job.weights.cols;
      if (chunk.row_begin() < 0 || chunk.num_rows() <= 0 ||
          chunk.row_begin() + chunk.num_rows() > job.weights.rows ||
          static_cast<int64_t>(chunk.packed_codes().size()) != chunk.num_rows() * cols / 2 ||
          static_cast<int64_t>(chunk.scales().size()) != chunk.num_rows() * cols / 16) {
        return absl::InternalError(absl::StrCat(job.name, ": malformed result chunk for rows ",
                                                chunk.row_begin(), "+", chunk.num_rows()));
      }
      std::memcpy(p.codes.data() + chunk.row_begin() * cols / 2, chunk.packed_codes().data(),
                  chunk.packed_codes().size());
      std::memcpy(p.scales.data() + chunk.row_begin() * cols / 16, chunk.scales().data(),
                  chunk.scales().size());
      p.rows_covered += chunk.num_rows();
      return absl::OkStatus();
    }
    if (!response->has_summary()) return absl::OkStatus();
    const v1::TensorSummary& summary = response->summary();
    QuantizedTensor result;
    size_t job_index = 0;
    {
      absl::MutexLock lock(&session->mu);
      const auto it = session->pending.find(summary.tensor_name());
      if (it == session->pending.end() || it->second.done) {
        return absl::InternalError(
            absl::StrCat("summary for unexpected tensor '", summary.tensor_name(), "'"));
      }
      Session::Pending& p = it->second;
      const TensorJob& job = jobs_[p.job];
      if (p.rows_covered != job.weights.rows) {
        return absl::InternalError(absl::StrCat(job.name, ": summary after ", p.rows_covered,
                                                " of ", job.weights.rows, " rows"));
      }
      if (summary.global_amax() != job.global_amax) {
        return absl::InternalError(absl::StrCat(job.name, ": server used global amax ",
                                                summary.global_amax(), ", sent ", job.global_amax));
      }
      p.done = true;
      job_index = p.job;
      result.rows = job.weights.rows;
      result.cols = job.weights.cols;
      result.packed_codes = std::move(p.codes);
      result.scales = std::move(p.scales);
      result.global_amax = summary.global_amax();
      result.global_scale = summary.global_scale();
      result.stats = StatsFromProto(summary, job.params);
      result.server_kernel_seconds = static_cast<double>(summary.timings().kernel_us()) * 1e-6;
      result.server_queue_seconds = static_cast<double>(summary.timings().queue_wait_us()) * 1e-6;
    }
    absl::Status delivered = on_result_(job_index, std::move(result));
    if (!delivered.ok()) return delivered;
    absl::MutexLock lock(&mu_);
    delivered_[job_index] = true;
    ++tensors_per_address_[a];
    return absl::OkStatus();
  }

  Client* const client_;
  const absl::Span<const TensorJob> jobs_;
  const QuantizeResultCallback& on_result_;

  absl::Mutex mu_;
  std::vector<std::deque<Unit>> queues_ ABSL_GUARDED_BY(mu_);
  std::deque<Unit> orphans_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> tensors_per_address_ ABSL_GUARDED_BY(mu_);
  int64_t failed_attempts_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int alive_workers_ ABSL_GUARDED_BY(mu_) = 0;
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status first_error_ ABSL_GUARDED_BY(mu_);
  std::set<Session*> active_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> delivered_ ABSL_GUARDED_BY(mu_);
};

std::vector<std::string> ExpandServerAddresses(const std::vector<std::string>& addresses) {
  constexpr std::string_view kDnsScheme = "dns:///";
  std::vector<std::string> out;
  for (const std::string& address : addresses) {
    const size_t colon = address.rfind(':');
    if (address.compare(0, kDnsScheme.size(), kDnsScheme) != 0 || colon == std::string::npos ||
        colon < kDnsScheme.size()) {
      out.push_back(address);
      continue;
    }
    const std::string host = address.substr(kDnsScheme.size(), colon - kDnsScheme.size());
    const std::string port = address.substr(colon + 1);
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0 || found == nullptr) {
      out.push_back(address);  // gRPC reports it as unavailable, naming the entry
      continue;
    }
    std::set<std::string> seen;
    for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
      char ip[NI_MAXHOST];
      if (getnameinfo(a->ai_addr, a->ai_addrlen, ip, sizeof(ip), nullptr, 0, NI_NUMERICHOST) != 0) {
        continue;
      }
      const std::string entry = a->ai_family == AF_INET6 ? absl::StrCat("[", ip, "]:", port)
                                                         : absl::StrCat(ip, ":", port);
      if (seen.insert(entry).second) out.push_back(entry);
    }
    freeaddrinfo(found);
    if (seen.empty()) out.push_back(address);
  }
  return out;
}

absl::StatusOr<std::string> ReadBearerTokenFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadTextFile(path);
  if (!text.ok()) return text.status();
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    absl::string_view token = absl::StripAsciiWhitespace(line);
    if (token.empty() || token[0] == '#') continue;
    if (token.find_first_of(" \t") != absl::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("token file '", path, "': the token must not contain spaces"));
    }
    return std::string(token);
  }
  return absl::InvalidArgumentError(absl::StrCat("token file '", path, "' has no token"));
}

absl::StatusOr<std::unique_ptr<Client>> Client::Create(const ClientOptions& given) {
  ClientOptions options = given;
  options.addresses = ExpandServerAddresses(given.addresses);
  if (options.addresses.empty()) {
    return absl::InvalidArgumentError("no server address given");
  }
  if (options.bearer_token.find_first_of(" \t\r\n") != std::string::npos) {
    return absl::InvalidArgumentError("bearer_token must not contain whitespace");
  }
  if (options.max_attempts < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_attempts must be >= 1, got ", options.max_attempts));
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (options.use_tls) {
    grpc::SslCredentialsOptions ssl;
    const std::pair<const std::string*, std::string*> files[] = {
        {&options.tls_root_certs_path, &ssl.pem_root_certs},
        {&options.tls_client_cert_path, &ssl.pem_cert_chain},
        {&options.tls_client_key_path, &ssl.pem_private_key}};
    for (const auto& [path, target] : files) {
      if (path->empty()) continue;
      absl::StatusOr<std::string> pem = ReadTextFile(*path);
      if (!pem.ok()) return pem.status();
      *target = *std::move(pem);
    }
    credentials = grpc::SslCredentials(ssl);
  }
  std::unique_ptr<Client> client(new Client(options));
  for (const std::string& address : options.addresses) {
    if (address.empty()) return absl::InvalidArgumentError("empty server address");
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    // A separate connection per address entry, even when two entries name one host.
    args.SetInt("grpc.use_local_subchannel_pool", 1);
    client->stubs_.push_back(
        v1::Calibrator::NewStub(grpc::CreateCustomChannel(address, credentials, args)));
  }
  return client;
}

Client::~Client() = default;

void Client::Authorize(grpc::ClientContext* context) const {
  if (!options_.bearer_token.empty()) {
    context->AddMetadata("authorization", "Bearer " + options_.bearer_token);
  }
}

absl::StatusOr<v1::ServerInfo> Client::GetServerInfo(size_t index) {
  if (index >= stubs_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("no address #", index));
  }
  absl::Status last;
  for (int attempt = 1; attempt <= options_.max_attempts; ++attempt) {
    grpc::ClientContext context;
    const absl::Duration timeout =
        options_.timeout > absl::ZeroDuration() ? options_.timeout : absl::Seconds(30);
    context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
    Authorize(&context);
    v1::ServerInfo info;
    const grpc::Status status =
        stubs_[index]->GetServerInfo(&context, v1::GetServerInfoRequest(), &info);
    if (status.ok()) return info;
    last = FromGrpc(status, absl::StrCat("server ", options_.addresses[index]));
    if (!Retryable(last)) return last;
    if (attempt < options_.max_attempts) absl::SleepFor(Backoff(options_, attempt));
  }
  return absl::UnavailableError(
      absl::StrCat("unavailable after ", options_.max_attempts, " attempts: ", last.message()));
}

absl::Status Client::QuantizeTensors(absl::Span<const TensorJob> jobs,
                                     const QuantizeResultCallback& on_result,
                                     ClientCallStats* stats) {
  if (jobs.empty()) return absl::OkStatus();
  std::set<std::string> names;
  for (const TensorJob& job : jobs) {
    if (!names.insert(job.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate tensor name '", job.name, "'"));
    }
  }
  Call call(this, jobs, on_result);
  return call.Run(stats);
}

std::future<absl::Status> Client::QuantizeTensorsAsync(absl::Span<const TensorJob> jobs,
                                                       QuantizeResultCallback on_result) {
  return std::async(std::launch::async, [this, jobs, on_result = std::move(on_result)] {
    return QuantizeTensors(jobs, on_result);
  });
}

absl::StatusOr<QuantizedTensor> Client::Quantize(const TensorJob& job) {
  QuantizedTensor out;
  absl::Status status =
      QuantizeTensors(absl::MakeConstSpan(&job, 1), [&out](size_t, QuantizedTensor result) {
        out = std::move(result);
        return absl::OkStatus();
      });
  if (!status.ok()) return status;
  return out;
}

}  // namespace nvfp4cal
