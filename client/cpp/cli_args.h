// Command-line parsing for normserve-cli, kept apart from main() so that it
// can be unit tested.
//
//   normserve-cli [--address=HOST:PORT] [--timeout_ms=N] COMMAND [ARGS] [FLAGS]
//
// Flags are written --name=value or --name value; boolean flags are --name
// (true) or --name=true|false. Flags may come before or after the command.
// "--" ends flag parsing. Every parse error is INVALID_ARGUMENT.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/cpp/client.h"
#include "normserve/v1/normserve.pb.h"

namespace normserve::client::cli {

// A command line split into its parts, with every flag checked against the
// command's known flags.
struct CommandLine {
  std::string command;                       // "" when only --help was given.
  std::vector<std::string> positional;       // Arguments after the command.
  std::map<std::string, std::string> flags;  // Name without "--" -> value.
  bool help = false;
  bool version = false;  // --version: print it, nothing else.
};

// Returns the usage text printed by --help.
const char* UsageText();

// Splits `args` (argv without argv[0]) and checks it. Fails on an unknown
// command, a flag the command does not take, a missing or malformed flag
// value, a repeated flag, a missing required flag, or the wrong number of
// positional arguments. With --help nothing else is checked.
absl::StatusOr<CommandLine> ParseCommandLine(
    const std::vector<std::string>& args);

// Builds the client options from --address, --timeout_ms, the TLS flags
// (reading their PEM files) and --token_file.
absl::StatusOr<ClientOptions> ClientOptionsFromFlags(const CommandLine& line);

// Builds the request id, expected version and retries of a mutating command
// (create, delete, forward) from --request_id, --expected_version and
// --retries.
absl::StatusOr<MutationOptions> MutationOptionsFromFlags(
    const CommandLine& line);

// Builds a CreateLayer request from the create command's flags.
absl::StatusOr<v1::CreateLayerRequest> CreateRequestFromFlags(
    const CommandLine& line);

// Arguments of the forward command.
struct ForwardArgs {
  std::string name;
  std::vector<int64_t> shape;
  uint64_t seed = 0;
  std::string input_path;   // Raw float32 input; "" means random normal.
  std::string output_path;  // Raw float32 output; "" means do not write.
  bool training = false;
  v1::DType dtype = v1::DTYPE_FLOAT32;
  v1::Layout layout = v1::LAYOUT_UNSPECIFIED;
};
absl::StatusOr<ForwardArgs> ForwardArgsFromFlags(const CommandLine& line);

// Value parsers shared by the commands.
absl::StatusOr<bool> ParseBool(absl::string_view text);
// "16,8,12,12" or "16x8x12x12"; every dimension >= 1.
absl::StatusOr<std::vector<int64_t>> ParseShape(absl::string_view text);
// "float32" (or "f32", "float"), "float16" ("f16", "half"), "bfloat16"
// ("bf16").
absl::StatusOr<v1::DType> ParseDType(absl::string_view text);
// "nchw" or "nhwc" (any case).
absl::StatusOr<v1::Layout> ParseLayout(absl::string_view text);

}  // namespace normserve::client::cli
