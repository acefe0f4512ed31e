// TokenAuthenticator: bearer tokens accepted by the Calibrator service, read from a file and
// reloadable while the server runs (nvfp4cal-server reloads it on SIGHUP).
//
// The token file holds one token per line, optionally followed by the word `admin`; blank lines
// and lines starting with '#' are ignored, surrounding spaces are trimmed. A call is accepted
// when its metadata carries `authorization: Bearer <token>` with one of the tokens. The token
// is also the caller's identity for the job API: each token sees only the jobs it submitted,
// an admin token sees (lists, reads, cancels) every job. The comparison takes the same time
// whatever the position of the first differing byte, and tokens are never logged or put into
// status messages.
//
//   TokenAuthenticator auth;
//   absl::Status loaded = auth.LoadFile("/etc/nvfp4cal/tokens");   // at start: must succeed
//   absl::Status ok = auth.Check(context->client_metadata());       // UNAUTHENTICATED or OK
//   ... on SIGHUP: auth.LoadFile(path) again; on error the previous tokens stay in force.
#ifndef NVFP4CAL_SERVER_TOKEN_AUTHENTICATOR_H_
#define NVFP4CAL_SERVER_TOKEN_AUTHENTICATOR_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/support/string_ref.h"

namespace nvfp4cal::server {

// Metadata key and scheme of the bearer token (HTTP's Authorization header, lower case as
// gRPC metadata keys are).
inline constexpr char kAuthorizationMetadataKey[] = "authorization";
inline constexpr char kBearerPrefix[] = "Bearer ";

// Byte-wise equality whose running time depends only on the lengths, not on where the strings
// differ.
bool ConstantTimeEquals(std::string_view a, std::string_view b);

// One accepted token and whether it may see every client's jobs.
struct AcceptedToken {
  std::string token;
  bool admin = false;
};

// Who made an accepted call.
struct Caller {
  // The token presented (compared, never logged); empty when no token is required.
  std::string identity;
  // An admin token, or no tokens configured at all (then every caller shares one view).
  bool admin = true;
};

// Parses a token file's text: one token per line, optionally followed by `admin`, '#' comments
// and blank lines ignored. INVALID_ARGUMENT when no token remains, a token contains a control
// character, a line has another word after the token, or a token appears twice (the message
// gives the line number, never the token).
absl::Status ParseTokenFile(std::string_view text, std::vector<AcceptedToken>* tokens);

class TokenAuthenticator {
 public:
  // Replaces the accepted tokens with those of `path`. On error (NOT_FOUND, INVALID_ARGUMENT)
  // the previous tokens stay in force.
  absl::Status LoadFile(const std::string& path);
  // Replaces the accepted tokens (tests). INVALID_ARGUMENT for an empty list.
  absl::Status SetTokens(std::vector<AcceptedToken> tokens);

  // Number of tokens currently accepted.
  int num_tokens() const;

  // OK when `metadata` has an authorization entry "Bearer <accepted token>"; otherwise
  // UNAUTHENTICATED saying what was wrong (missing entry, not a bearer token, unknown token).
  absl::Status Check(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const;
  // The same for the value of the authorization entry alone (nullptr: none sent).
  absl::Status CheckAuthorization(const std::string_view* authorization) const;
  // Check, returning who called: the token and whether it is an admin token.
  absl::StatusOr<Caller> Identify(
      const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const;

 private:
  absl::StatusOr<Caller> IdentifyAuthorization(const std::string_view* authorization) const;

  mutable absl::Mutex mu_;
  std::shared_ptr<const std::vector<AcceptedToken>> tokens_ ABSL_GUARDED_BY(mu_);
};

}  // namespace nvfp4cal::server

#endif  // NVFP4CAL_SERVER_TOKEN_AUTHENTICATOR_H_
