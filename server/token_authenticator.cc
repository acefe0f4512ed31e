#include "server/token_authenticator.h"

#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/file_util.h"

namespace nvfp4cal::server {

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  // Every byte of the longer string is visited; a length difference is folded in as well.
  const size_t n = a.size() > b.size() ? a.size() : b.size();
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff = static_cast<unsigned char>(diff | (x ^ y));
  }
  return diff == 0;
}

absl::Status ParseTokenFile(std::string_view text, std::vector<AcceptedToken>* tokens) {
  std::vector<AcceptedToken> parsed;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(absl::string_view(text.data(), text.size()), '\n')) {
    ++line_number;
    absl::string_view content = absl::StripAsciiWhitespace(line);
    if (content.empty() || content[0] == '#') continue;
    std::vector<absl::string_view> words =
        absl::StrSplit(content, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (words.size() > 2 || (words.size() == 2 && words[1] != "admin")) {
      return absl::InvalidArgumentError(
          absl::StrCat("token file line ", line_number,
                       ": expected 'TOKEN' or 'TOKEN admin' (a token must not contain spaces)"));
    }
    for (char c : words[0]) {
      const auto u = static_cast<unsigned char>(c);
      if (u < 0x20 || u == 0x7f) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token file line ", line_number, ": a token must not contain control characters"));
      }
    }
    for (const AcceptedToken& earlier : parsed) {
      if (earlier.token == words[0]) {
        return absl::InvalidArgumentError(
            absl::StrCat("token file line ", line_number, ": the token appears twice"));
      }
    }
    parsed.push_back(AcceptedToken{std::string(words[0]), words.size() == 2});
  }
  if (parsed.empty()) {
    return absl::InvalidArgumentError(
        "token file has no token (one per line, optionally 'TOKEN admin'; '#' comments)");
  }
  *tokens = std::move(parsed);
  return absl::OkStatus();
}

absl::Status TokenAuthenticator::LoadFile(const std::string& path) {
  // Regular files only (common/file_util.h): a FIFO must not hang start-up or SIGHUP.
  absl::StatusOr<std::string> text = ReadTextFile(path);
  if (!text.ok()) return text.status();  // names the path
  std::vector<AcceptedToken> tokens;
  absl::Status parsed = ParseTokenFile(*text, &tokens);
  if (!parsed.ok()) {
    return absl::Status(parsed.code(), absl::StrCat("'", path, "': ", parsed.message()));
  }
  return SetTokens(std::move(tokens));
}

absl::Status TokenAuthenticator::SetTokens(std::vector<AcceptedToken> tokens) {
  if (tokens.empty()) return absl::InvalidArgumentError("no tokens given");
  auto shared = std::make_shared<const std::vector<AcceptedToken>>(std::move(tokens));
  absl::MutexLock lock(&mu_);
  tokens_ = std::move(shared);
  return absl::OkStatus();
}

int TokenAuthenticator::num_tokens() const {
  absl::MutexLock lock(&mu_);
  return tokens_ == nullptr ? 0 : static_cast<int>(tokens_->size());
}

absl::Status TokenAuthenticator::Check(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const {
  return Identify(metadata).status();
}

absl::StatusOr<Caller> TokenAuthenticator::Identify(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const {
  const auto it = metadata.find(kAuthorizationMetadataKey);
  if (it == metadata.end()) return IdentifyAuthorization(nullptr);
  const std::string_view value(it->second.data(), it->second.size());
  return IdentifyAuthorization(&value);
}

absl::Status TokenAuthenticator::CheckAuthorization(const std::string_view* authorization) const {
  return IdentifyAuthorization(authorization).status();
}

absl::StatusOr<Caller> TokenAuthenticator::IdentifyAuthorization(
    const std::string_view* authorization) const {
  if (authorization == nullptr) {
    return absl::UnauthenticatedError(
        "missing 'authorization: Bearer <token>' metadata (the server requires a token)");
  }
  const std::string_view prefix(kBearerPrefix);
  if (authorization->size() < prefix.size() || authorization->substr(0, prefix.size()) != prefix) {
    return absl::UnauthenticatedError("authorization metadata is not a 'Bearer <token>' value");
  }
  const std::string_view presented = authorization->substr(prefix.size());
  std::shared_ptr<const std::vector<AcceptedToken>> tokens;
  {
    absl::MutexLock lock(&mu_);
    tokens = tokens_;
  }
  const AcceptedToken* accepted = nullptr;
  if (tokens != nullptr) {
    // No early exit: every accepted token is compared.
    for (const AcceptedToken& token : *tokens) {
      if (ConstantTimeEquals(presented, token.token) && accepted == nullptr) accepted = &token;
    }
  }
  if (accepted == nullptr) return absl::UnauthenticatedError("bearer token not accepted");
  return Caller{accepted->token, accepted->admin};
}

}  // namespace nvfp4cal::server
