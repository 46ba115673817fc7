#include "server/grpc/auth.h"

#include <grpcpp/server_context.h>

#include <fstream>
#include <sstream>
#include <vector>

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

absl::StatusOr<TokenTable> TokenTable::Parse(absl::string_view text) {
  TokenTable table;
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
    if (!table.tenants_.emplace(fields[0], fields[1]).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token file line ", line_number, ": token repeats an earlier one"));
    }
  }
  if (table.tenants_.empty()) {
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
  auto it = tenants_.find(token);
  if (it == tenants_.end()) {
    return absl::UnauthenticatedError("the bearer token is not valid");
  }
  return it->second;
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
