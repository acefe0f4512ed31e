#include "client/remote_quantizer.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace nvfp4cal {
namespace {

class RemoteQuantizer : public Quantizer {
 public:
  explicit RemoteQuantizer(std::unique_ptr<Client> client) : client_(std::move(client)) {}

  std::string Describe() const override {
    return absl::StrCat("remote ", absl::StrJoin(client_->options().addresses, ","));
  }

  absl::Status QuantizeAll(absl::Span<const TensorTask> tasks,
                           const QuantizeResultCallback& on_result) override {
    return client_->QuantizeTensors(tasks, on_result);
  }

 private:
  std::unique_ptr<Client> client_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Quantizer>> MakeRemoteQuantizer(const ClientOptions& options) {
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(options);
  if (!client.ok()) return client.status();
  return std::unique_ptr<Quantizer>(new RemoteQuantizer(*std::move(client)));
}

absl::StatusOr<std::vector<std::string>> ParseServerList(const std::string& list) {
  std::vector<std::string> addresses;
  for (absl::string_view part : absl::StrSplit(list, ',')) {
    const std::string address(part);
    const size_t colon = address.rfind(':');
    if (address.empty() || colon == std::string::npos || colon + 1 == address.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--server: \"", address, "\" is not HOST:PORT (in \"", list, "\")"));
    }
    addresses.push_back(address);
  }
  return addresses;
}

}  // namespace nvfp4cal
