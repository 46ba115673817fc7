// Bearer-token authentication: which tenant a call belongs to.
//
// The token file (--auth_tokens FILE) has one "TOKEN TENANT" pair a line,
// separated by spaces or tabs; blank lines and lines starting with '#' are
// skipped. Tokens are opaque (at least 16 printable characters, no spaces);
// tenants match [A-Za-z0-9][A-Za-z0-9_.-]{0,62}. Several tokens may map to
// one tenant. Error messages name the line, never the token.
//
// A call carries "authorization: Bearer TOKEN" in its metadata. With no
// table every call is tenant "" (no authentication).
//
// The table keeps the SHA-256 digest of each token, never the token. A
// lookup hashes the presented token and compares its digest with every
// entry's in constant time, without stopping at a match, so how long it
// takes depends on the presented token's length and the number of tokens,
// not on how much of a valid token the caller guessed.
//
// Thread safety: a TokenTable is immutable once built.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace grpc {
class ServerContextBase;
}  // namespace grpc

namespace normserve::server {

class TokenTable {
 public:
  // Parses the text of a token file; INVALID_ARGUMENT naming the bad line.
  static absl::StatusOr<TokenTable> Parse(absl::string_view text);
  // Reads and parses `path`; NOT_FOUND / INVALID_ARGUMENT.
  static absl::StatusOr<TokenTable> LoadFile(const std::string& path);

  // The tenant of `token`, or UNAUTHENTICATED.
  absl::StatusOr<std::string> TenantFor(absl::string_view token) const;
  size_t size() const { return entries_.size(); }

 private:
  using Digest = std::array<uint8_t, 32>;  // SHA-256.
  struct Entry {
    Digest digest;
    std::string tenant;
  };
  static Digest Hash(absl::string_view token);

  std::vector<Entry> entries_;
};

// Returns the tenant of the call: "" when `tokens` is null, else the tenant
// of its bearer token, or UNAUTHENTICATED (missing, malformed or unknown
// token; the message never repeats the token).
absl::StatusOr<std::string> Authenticate(
    const TokenTable* tokens, const grpc::ServerContextBase& context);

}  // namespace normserve::server
