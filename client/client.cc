#include "client/client.h"

#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "client/server_stream.h"
#include "common/file_util.h"
#include "common/thread_name.h"
#include "grpcpp/grpcpp.h"
#include "proto/grpc_status.h"

namespace nvfp4cal {
namespace {

absl::Duration Backoff(const ClientOptions& options, int failures) {
  absl::Duration d = options.initial_backoff;
  for (int i = 1; i < failures && d < options.max_backoff; ++i) d *= 2;
  return std::min(d, options.max_backoff);
}

bool Retryable(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable;
}

// Whether a stream's final status is its server's refusal for max_concurrent_streams
// (server/quantize_session.cc: "too many Quantize streams: max_concurrent_streams = ...").
bool RefusedForStreamLimit(const grpc::Status& status) {
  return status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED &&
         absl::StrContains(status.error_message(), "max_concurrent_streams");
}

}  // namespace

// One QuantizeTensors call: a shared queue of units (tensors sharing a Hessian travel together)
// and one worker thread per address entry, each running Quantize sessions (ServerStream) with
// its server; entries naming the same address are that server's concurrent sessions.
class Client::Call {
 public:
  Call(Client* client, absl::Span<const TensorTask> tasks, const QuantizeResultCallback& on_result)
      : client_(client), tasks_(tasks), on_result_(on_result), delivered_(tasks.size(), false) {}

  absl::Status Run(ClientCallStats* stats) {
    // Units: tasks sharing a Hessian key travel together; then round robin over the addresses.
    std::vector<Unit> units;
    std::map<std::string, size_t> unit_of_key;
    for (size_t i = 0; i < tasks_.size(); ++i) {
      const std::string& key = tasks_[i].hessian_key;
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
      std::stable_partition(unit.begin(), unit.end(), [this](size_t j) {
        return client_internal::SendsFullHessian(tasks_[j]);
      });
    }
    const size_t n = client_->stubs_.size();
    const size_t start = client_->next_address_.fetch_add(1) % n;
    {
      absl::MutexLock lock(&mu_);
      queues_.resize(n);
      tensors_per_address_.assign(n, 0);
      for (size_t u = 0; u < units.size(); ++u) {
        // Work stealing: one queue in the caller's order, which is the order the pipeline reads
        // the weights in (its read-ahead memory comes back as results do). Dealt round robin,
        // every stream would run through its own share at its own pace, and the slowest one's
        // units, read long before, would hold that memory while the others wait for weights.
        if (client_->options_.work_stealing) {
          shared_.push_back(std::move(units[u]));
        } else {
          queues_[(start + u) % n].push_back(std::move(units[u]));
        }
      }
    }
    {
      absl::MutexLock lock(&mu_);
      alive_workers_ = static_cast<int>(n);
      worker_alive_.assign(n, true);
    }
    std::vector<std::thread> workers;
    for (size_t a = 0; a < n; ++a) workers.emplace_back([this, a] { Worker(a); });
    for (std::thread& t : workers) t.join();
    absl::MutexLock lock(&mu_);
    if (stats != nullptr) {
      stats->tensors_per_address = tensors_per_address_;
      stats->failed_attempts = failed_attempts_;
      stats->streams_refused = streams_refused_;
    }
    if (!first_error_.ok()) return first_error_;
    for (size_t i = 0; i < tasks_.size(); ++i) {
      if (!delivered_[i]) {
        return absl::InternalError(absl::StrCat(tasks_[i].name, ": no result was received"));
      }
    }
    return absl::OkStatus();
  }

 private:
  using Unit = std::vector<size_t>;
  using ServerStream = client_internal::ServerStream;

  // How a session ended, beyond its status.
  struct SessionEnd {
    // Units the session took from the queues (the first one included).
    size_t units_taken = 0;
    // Its tasks without a result, grouped as the units they came in, for the queues.
    std::vector<Unit> incomplete;
    // The server refused the stream for max_concurrent_streams before any result arrived.
    bool refused = false;
  };

  const std::string& Address(size_t a) const { return client_->options_.addresses[a]; }

  void Abort(const absl::Status& status) {
    absl::MutexLock lock(&mu_);
    if (first_error_.ok()) first_error_ = status;
    aborted_ = true;
    for (ServerStream* s : active_) s->Cancel();
  }

  // Hands a finished tensor of address `a`'s stream to the caller and counts it.
  absl::Status Deliver(size_t a, size_t task, QuantizedTensor result) {
    absl::Status delivered = on_result_(task, std::move(result));
    if (!delivered.ok()) return delivered;
    absl::MutexLock lock(&mu_);
    delivered_[task] = true;
    ++tensors_per_address_[a];
    return absl::OkStatus();
  }

  // Whether worker `a` could take a unit now: its own queue, the shared queue (every unit with
  // work stealing; units of failed sessions), or (work stealing) another address's queue.
  bool HasUnitFor(size_t a) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!queues_[a].empty() || !shared_.empty()) return true;
    if (!client_->options_.work_stealing) return false;
    for (const std::deque<Unit>& q : queues_) {
      if (!q.empty()) return true;
    }
    return false;
  }

  bool AllQueuesEmpty() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!shared_.empty()) return false;
    for (const std::deque<Unit>& q : queues_) {
      if (!q.empty()) return false;
    }
    return true;
  }

  // Own queue's head, then the shared queue's, then the tail of the longest other queue.
  bool PopUnitLocked(size_t a, Unit* unit) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (aborted_ || !HasUnitFor(a)) return false;
    if (!queues_[a].empty()) {
      *unit = std::move(queues_[a].front());
      queues_[a].pop_front();
    } else if (!shared_.empty()) {
      *unit = std::move(shared_.front());
      shared_.pop_front();
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
  // worker without own work waits while others hold units that may fail back to the shared
  // queue.
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

  // Returns `done` units to the call; `retry` (units of a failed session, each cut to its tasks
  // without a result) goes in order to the front of the shared queue that every live worker
  // takes first after its own queue.
  void Settle(size_t done, std::vector<Unit> retry) {
    absl::MutexLock lock(&mu_);
    for (auto it = retry.rbegin(); it != retry.rend(); ++it) shared_.push_front(std::move(*it));
    in_flight_ -= static_cast<int64_t>(done);
  }

  // Worker `a` leaves the call; its queued units become everyone's. Returns whether it was the
  // last live worker.
  bool RetireLocked(size_t a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    worker_alive_[a] = false;
    while (!queues_[a].empty()) {
      shared_.push_back(std::move(queues_[a].front()));
      queues_[a].pop_front();
    }
    return --alive_workers_ == 0;
  }

  // Live workers other than `a` whose entry names `a`'s address.
  int OtherLiveWorkersOf(size_t a) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    int live = 0;
    for (size_t b = 0; b < worker_alive_.size(); ++b) {
      live += b != a && worker_alive_[b] && Address(b) == Address(a) ? 1 : 0;
    }
    return live;
  }

  // After the server refused worker `a`'s session for max_concurrent_streams: while other
  // workers of the same address live, `a` retires and leaves them the session's units (true);
  // the address's last live worker goes on (false), so that the server keeps at least one.
  bool LeaveToOtherStreams(size_t a, SessionEnd* end) {
    int others = 0;
    {
      absl::MutexLock lock(&mu_);
      others = OtherLiveWorkersOf(a);
      if (others == 0) return false;
      RetireLocked(a);
      ++streams_refused_;
    }
    Settle(end->units_taken, std::move(end->incomplete));
    Note(absl::StrCat("note: server ", Address(a),
                      " refused a stream (max_concurrent_streams); going on with ", others,
                      others == 1 ? " stream" : " streams", " to it"));
    return true;
  }

  void Note(const std::string& line) const {
    if (client_->options_.on_note) client_->options_.on_note(line);
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
    NameThisThread("nvf-send");
    int failures = 0;
    std::optional<v1::Limits> limits;
    Unit unit;
    while (NextUnit(a, &unit)) {
      absl::Status status;
      SessionEnd end;
      if (!limits.has_value()) {
        absl::StatusOr<v1::ServerInfo> info = FetchInfo(a);
        if (info.ok()) {
          limits = info->limits();
        } else {
          status = info.status();
          end.units_taken = 1;
          end.incomplete = {unit};
        }
      }
      if (limits.has_value()) status = RunSession(a, *limits, &unit, &end);
      if (status.ok()) {
        failures = 0;
        Settle(end.units_taken, {});
        continue;
      }
      if (end.refused && LeaveToOtherStreams(a, &end)) return;
      // A refusal of the address's last live session is retried like an unavailable server:
      // the stream it exceeds the limit with may be one the server has not released yet.
      if (!end.refused && !Retryable(status)) {
        Abort(status);
        Settle(end.units_taken, {});
        return;
      }
      ++failures;
      {
        absl::MutexLock lock(&mu_);
        ++failed_attempts_;
      }
      if (failures >= client_->options_.max_attempts) {
        bool last_one = false;
        {
          absl::MutexLock lock(&mu_);
          last_one = RetireLocked(a);
        }
        const absl::Status given_up =
            end.refused
                ? absl::ResourceExhaustedError(absl::StrCat("server ", Address(a),
                                                            " refused the stream after ", failures,
                                                            " attempts: ", status.message()))
                : absl::UnavailableError(absl::StrCat("server ", Address(a), " unavailable after ",
                                                      failures, " attempts: ", status.message()));
        if (last_one) {
          Abort(given_up);
          Settle(end.units_taken, {});
        } else {
          Settle(end.units_taken, std::move(end.incomplete));  // the other servers take it
        }
        return;
      }
      Settle(end.units_taken, std::move(end.incomplete));
      Sleep(Backoff(client_->options_, failures));
    }
  }

  // Runs one session starting with *unit and taking more units while the queue has some; *end
  // says what it took and, when it failed, what is left.
  absl::Status RunSession(size_t a, const v1::Limits& limits, Unit* unit, SessionEnd* end) {
    ServerStream stream(
        client_->options_, Address(a), tasks_, limits,
        [this, a](size_t task, QuantizedTensor result) {
          return Deliver(a, task, std::move(result));
        },
        [this](const absl::Status& error) { Abort(error); });
    {
      absl::MutexLock lock(&mu_);
      if (aborted_) {
        end->units_taken = 1;
        return first_error_;
      }
      active_.insert(&stream);
    }
    client_->Authorize(stream.context());
    bool writable = stream.Open(client_->channels_[a].get());
    // The first unit belongs to this session even when not even the session options could be
    // written (server gone): its tasks are then reported incomplete and retried elsewhere.
    std::vector<Unit> session_units = {*unit};
    std::vector<size_t> session_tasks(unit->begin(), unit->end());
    ++end->units_taken;
    absl::Status local_error;
    bool first = true;
    while (writable) {
      if (!first) {
        if (!TryNextUnit(a, unit)) break;
        if (stream.ExceedsSessionLimits(*unit)) {
          Settle(1, {*unit});  // back to the queue for a fresh session
          break;
        }
        ++end->units_taken;
        session_units.push_back(*unit);
        session_tasks.insert(session_tasks.end(), unit->begin(), unit->end());
      }
      first = false;
      local_error = stream.SendUnit(*unit, &writable);
      if (!local_error.ok()) break;
    }
    const grpc::Status finished = stream.Close(/*cancel=*/!local_error.ok(), writable);
    {
      absl::MutexLock lock(&mu_);
      active_.erase(&stream);
    }
    stream.ReleaseCall();  // no Cancel() can come now
    std::vector<size_t> missing;
    const absl::Status reader_error = stream.CollectIncomplete(session_tasks, &missing);
    const std::set<size_t> without_result(missing.begin(), missing.end());
    for (const Unit& taken : session_units) {
      Unit left;
      for (size_t j : taken) {
        if (without_result.count(j) != 0) left.push_back(j);
      }
      if (!left.empty()) end->incomplete.push_back(std::move(left));
    }
    if (!local_error.ok()) return local_error;
    if (!reader_error.ok()) return reader_error;
    if (!finished.ok()) {
      end->refused = RefusedForStreamLimit(finished) && missing.size() == session_tasks.size();
      return FromGrpc(finished, absl::StrCat("server ", Address(a)));
    }
    if (!missing.empty()) {
      return absl::InternalError(absl::StrCat("server ", Address(a),
                                              " ended the stream without "
                                              "results for ",
                                              tasks_[missing.front()].name));
    }
    return absl::OkStatus();
  }

  Client* const client_;
  const absl::Span<const TensorTask> tasks_;
  const QuantizeResultCallback& on_result_;

  absl::Mutex mu_;
  std::vector<std::deque<Unit>> queues_ ABSL_GUARDED_BY(mu_);
  // Units any worker takes, front first: every unit with work stealing (in the caller's order),
  // units of failed sessions (at the front) and of retired addresses.
  std::deque<Unit> shared_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> tensors_per_address_ ABSL_GUARDED_BY(mu_);
  int64_t failed_attempts_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int alive_workers_ ABSL_GUARDED_BY(mu_) = 0;
  // Per address entry: whether its worker still takes units.
  std::vector<bool> worker_alive_ ABSL_GUARDED_BY(mu_);
  int64_t streams_refused_ ABSL_GUARDED_BY(mu_) = 0;
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status first_error_ ABSL_GUARDED_BY(mu_);
  std::set<ServerStream*> active_ ABSL_GUARDED_BY(mu_);
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
    client->channels_.push_back(grpc::CreateCustomChannel(address, credentials, args));
    client->stubs_.push_back(v1::Calibrator::NewStub(client->channels_.back()));
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

absl::Status Client::QuantizeTensors(absl::Span<const TensorTask> tasks,
                                     const QuantizeResultCallback& on_result,
                                     ClientCallStats* stats) {
  if (tasks.empty()) return absl::OkStatus();
  std::set<std::string> names;
  for (const TensorTask& task : tasks) {
    if (!names.insert(task.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate tensor name '", task.name, "'"));
    }
  }
  Call call(this, tasks, on_result);
  return call.Run(stats);
}

std::future<absl::Status> Client::QuantizeTensorsAsync(absl::Span<const TensorTask> tasks,
                                                       QuantizeResultCallback on_result) {
  return std::async(std::launch::async, [this, tasks, on_result = std::move(on_result)] {
    return QuantizeTensors(tasks, on_result);
  });
}

absl::StatusOr<QuantizedTensor> Client::Quantize(const TensorTask& task) {
  QuantizedTensor out;
  absl::Status status =
      QuantizeTensors(absl::MakeConstSpan(&task, 1), [&out](size_t, QuantizedTensor result) {
        out = std::move(result);
        return absl::OkStatus();
      });
  if (!status.ok()) return status;
  return out;
}

}  // namespace nvfp4cal
