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
// Thread safety: a TokenTable is immutable once built.
#pragma once

#include <string>

#include "absl/container/flat_hash_map.h"
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
  size_t size() const { return tenants_.size(); }

 private:
  absl::flat_hash_map<std::string, std::string> tenants_;
};

// Returns the tenant of the call: "" when `tokens` is null, else the tenant
// of its bearer token, or UNAUTHENTICATED (missing, malformed or unknown
// token; the message never repeats the token).
absl::StatusOr<std::string> Authenticate(
    const TokenTable* tokens, const grpc::ServerContextBase& context);

}  // namespace normserve::server
