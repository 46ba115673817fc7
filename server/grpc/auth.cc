#include "server/grpc/auth.h"

#include <grpcpp/server_context.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace normserve::server {
namespace {

constexpr size_t kMinTokenLength = 16;
constexpr absl::string_view kBearer = "Bearer ";

bool IsValidTenant(absl::string_view tenant) {
  if (tenant.empty() || tenant.size() > 63) return false;
  for (size_t i = 0; i < tenant.size(); ++i) {
    const char ch = tenant[i];
    const bool alnum = absl::ascii_isalnum(static_cast<unsigned char>(ch));
    if (!alnum && (i == 0 || (ch != '_' && ch != '.' && ch != '-'))) {
      return false;
    }
  }
  return true;
}

bool IsValidToken(absl::string_view token) {
  if (token.size() < kMinTokenLength) return false;
  for (char ch : token) {
    if (!absl::ascii_isgraph(static_cast<unsigned char>(ch))) return false;
  }
  return true;
}

}  // namespace

TokenTable::Digest TokenTable::Hash(absl::string_view token) {
  Digest digest;
  unsigned int length = 0;
  if (EVP_Digest(token.data(), token.size(), digest.data(), &length,
                 EVP_sha256(), nullptr) != 1 ||
      length != digest.size()) {
    // Only a broken libcrypto gets here; never let it authenticate anyone.
    std::abort();
  }
  return digest;
}

absl::StatusOr<TokenTable> TokenTable::Parse(absl::string_view text) {
  TokenTable table;
  absl::flat_hash_set<Digest> seen;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token file line ", line_number, ": expected 'TOKEN TENANT'"));
    }
    if (!IsValidToken(fields[0])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token file line ", line_number, ": a token needs at least ",
          kMinTokenLength, " printable characters"));
    }
    if (!IsValidTenant(fields[1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token file line ", line_number, ": tenant '", fields[1],
          "' is not valid; expected [A-Za-z0-9][A-Za-z0-9_.-]{0,62}"));
    }
    Entry entry{Hash(fields[0]), std::string(fields[1])};
    if (!seen.insert(entry.digest).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token file line ", line_number, ": token repeats an earlier one"));
    }
    table.entries_.push_back(std::move(entry));
  }
  if (table.entries_.empty()) {
    return absl::InvalidArgumentError("token file holds no tokens");
  }
  return table;
}

absl::StatusOr<TokenTable> TokenTable::LoadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read token file ", path));
  }
  std::stringstream text;
  text << in.rdbuf();
  absl::StatusOr<TokenTable> table = Parse(text.str());
  if (!table.ok()) {
    return absl::Status(table.status().code(),
                        absl::StrCat(path, ": ", table.status().message()));
  }
  return table;
}

absl::StatusOr<std::string> TokenTable::TenantFor(
    absl::string_view token) const {
  const Digest digest = Hash(token);
  // Every entry is compared, in constant time, and the loop never stops
  // early: the time taken does not depend on which entry matched, if any.
  // Digests are unique (Parse), so at most one matches.
  const Entry* match = nullptr;
  for (const Entry& entry : entries_) {
    const bool equal =
        CRYPTO_memcmp(entry.digest.data(), digest.data(), digest.size()) == 0;
    match = equal ? &entry : match;
  }
  if (match == nullptr) {
    return absl::UnauthenticatedError("the bearer token is not valid");
  }
  return match->tenant;
}

absl::StatusOr<std::string> Authenticate(
    const TokenTable* tokens, const grpc::ServerContextBase& context) {
  if (tokens == nullptr) return std::string();
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return absl::UnauthenticatedError(
        "this server needs a bearer token: metadata 'authorization: Bearer "
        "TOKEN'");
  }
  absl::string_view value(it->second.data(), it->second.size());
  if (!absl::StartsWith(value, kBearer)) {
    return absl::UnauthenticatedError(
        "the authorization metadata is not 'Bearer TOKEN'");
  }
  value.remove_prefix(kBearer.size());
  return tokens->TenantFor(absl::StripAsciiWhitespace(value));
}

}  // namespace normserve::server
