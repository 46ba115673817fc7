#include "client/cpp/cli_args.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "common/status_macros.h"

namespace normserve::client::cli {
namespace {

struct FlagSpec {
  absl::string_view name;
  bool is_bool;
};

struct CommandSpec {
  absl::string_view name;
  int positional;  // Exact number of positional arguments.
  std::vector<FlagSpec> flags;
};

const std::vector<FlagSpec>& GlobalFlags() {
  static const auto* const kFlags = new std::vector<FlagSpec>{
      {"address", false},    {"timeout_ms", false}, {"tls_ca", false},
      {"tls_cert", false},   {"tls_key", false},    {"tls", true},
      {"token_file", false}, {"help", true},        {"version", true}};
  return *kFlags;
}

const std::vector<CommandSpec>& Commands() {
  static const auto* const kCommands = new std::vector<CommandSpec>{
      {"create",
       0,
       {{"kind", false},
        {"num_features", false},
        {"num_groups", false},
        {"num_channels", false},
        {"world_size", false},
        {"barrier_timeout_ms", false},
        {"normalized_shape", false},
        {"elementwise_affine", true},
        {"bias", true},
        {"eps", false},
        {"momentum", false},
        {"affine", true},
        {"track_running_stats", true},
        {"layout", false},
        {"dtype", false},
        {"spatial_dims", false},
        {"device", false},
        {"id", false},
        {"request_id", false},
        {"retries", false}}},
      {"list", 0, {}},
      {"get", 1, {}},
      {"delete", 1, {{"request_id", false}, {"retries", false}}},
      {"forward",
       1,
       {{"shape", false},
        {"seed", false},
        {"input", false},
        {"output", false},
        {"training", true},
        {"dtype", false},
        {"layout", false},
        {"request_id", false},
        {"expected_version", false},
        {"retries", false}}},
      {"state", 1, {{"output", false}}},
      {"health", 0, {{"service", false}}},
  };
  return *kCommands;
}

const CommandSpec* FindCommand(absl::string_view name) {
  for (const CommandSpec& spec : Commands()) {
    if (spec.name == name) return &spec;
  }
  return nullptr;
}

const FlagSpec* FindFlag(const std::vector<FlagSpec>& flags,
                         absl::string_view name) {
  for (const FlagSpec& flag : flags) {
    if (flag.name == name) return &flag;
  }
  return nullptr;
}

const std::string* GetFlag(const CommandLine& line, absl::string_view name) {
  auto it = line.flags.find(std::string(name));
  return it == line.flags.end() ? nullptr : &it->second;
}

absl::StatusOr<int64_t> ParseInt(absl::string_view flag,
                                 absl::string_view text) {
  int64_t value;
  if (!absl::SimpleAtoi(text, &value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " expects an integer, got '", text, "'"));
  }
  return value;
}

absl::StatusOr<double> ParseDouble(absl::string_view flag,
                                   absl::string_view text) {
  double value;
  if (!absl::SimpleAtod(text, &value) || !std::isfinite(value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " expects a number, got '", text, "'"));
  }
  return value;
}

}  // namespace

const char* UsageText() {
  return R"(usage: normserve-cli [--address=HOST:PORT] [--timeout_ms=N] COMMAND [ARGS]

Commands:
  create    Create a layer; prints it.
              --kind=batch_norm|layer_norm|rms_norm|group_norm|instance_norm|
                     sync_batch_norm (default batch_norm)
              --id=ID  --dtype=float32|float16|bfloat16  --device=cpu|cuda:N
              --request_id=KEY  --retries=N  (see below)
            batch_norm: --num_features=C (required)  --eps=1e-5
              --momentum=0.1|none  --affine[=true|false]
              --track_running_stats[=true|false]  --layout=nchw|nhwc
              --spatial_dims=0..3
            layer_norm, rms_norm: --normalized_shape=D[,D...] (required)
              --eps=E (layer_norm 1e-5; rms_norm unset: float32's epsilon)
              --elementwise_affine[=true|false]  --bias[=true|false]
              (layer_norm only)
            group_norm: --num_groups=G --num_channels=C (required)
              --eps=1e-5  --affine[=true|false]
            instance_norm: as batch_norm (momentum a number), torch's
              defaults: --affine=false --track_running_stats=false
            sync_batch_norm: as batch_norm, plus --world_size=K (required)
              --barrier_timeout_ms=30000
  list      List all layers.
  get ID    Print one layer.
  delete ID Delete a layer.
              --request_id=KEY  --retries=N
  forward ID --shape=N,C[,D,H,W]
            Run Forward; prints shape, mean/std, sum and an FNV-1a 64
            checksum of the output bytes.
              --seed=0        standard normal input from this seed, or
              --input=FILE    raw little-endian float32 input, memory order
              --output=FILE   write the output as raw float32
              --training      training mode (updates running stats)
              --dtype=float32|float16|bfloat16  wire dtype (default float32)
              --layout=nchw|nhwc  memory order (default: the layer's)
              --request_id=KEY  --retries=N
              --expected_version=V  fail with FAILED_PRECONDITION unless
                              the layer is at version V
  state ID --output=FILE
            Write the layer's state dict as JSON:
              {"format": "normserve.state.v1", "layer": ..., "version": N,
               "tensors": {NAME: {"dtype": ..., "shape": [...],
                                  "values": [...]}, ...}}
  health    Call grpc.health.v1.Health/Check; prints the serving status.
              --service=NAME  (default "": the whole server)

Retries (create, delete, forward):
  --request_id=KEY     idempotency key (up to 128 bytes): the server applies
                       a key once; sent again (e.g. after a lost reply) it
                       changes nothing and returns the first result (a
                       training forward: ALREADY_EXISTS "already applied").
                       Keys of create/delete are per tenant, others per layer.
  --retries=N          resend up to N times after UNAVAILABLE,
                       DEADLINE_EXCEEDED or ABORTED, with the same key (a
                       fresh one when --request_id is not given)

Global flags:
  --address=HOST:PORT  server address (default 127.0.0.1:50051)
  --timeout_ms=N       deadline of each call (default 30000)
  --tls                connect with TLS, trusting the system's CAs
  --tls_ca=FILE        connect with TLS, trusting the CAs in this PEM file
  --tls_cert=FILE      client certificate (PEM) for mutual TLS; needs
  --tls_key=FILE       its private key (PEM); both imply --tls
  --token_file=FILE    file holding a bearer token for servers started with
                       --auth_tokens (kept out of the command line)
  --help               print this text
  --version            print the CLI's version

Exit status: 0 on success, 1 when a call fails (prints
"error: CODE: message"), 2 for usage errors.
)";
}

absl::StatusOr<CommandLine> ParseCommandLine(
    const std::vector<std::string>& args) {
  CommandLine line;
  const CommandSpec* spec = nullptr;
  bool flags_done = false;
  for (size_t i = 0; i < args.size(); ++i) {
    absl::string_view arg = args[i];
    if (!flags_done && arg == "--") {
      flags_done = true;
      continue;
    }
    if (flags_done || !absl::ConsumePrefix(&arg, "--")) {
      if (spec == nullptr) {
        spec = FindCommand(arg);
        if (spec == nullptr) {
          return absl::InvalidArgumentError(
              absl::StrCat("unknown command '", arg, "'"));
        }
        line.command = std::string(arg);
      } else {
        line.positional.push_back(std::string(arg));
      }
      continue;
    }
    absl::string_view name = arg;
    std::optional<absl::string_view> value;
    if (size_t eq = arg.find('='); eq != absl::string_view::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    const FlagSpec* flag = FindFlag(GlobalFlags(), name);
    if (flag == nullptr && spec != nullptr) flag = FindFlag(spec->flags, name);
    if (flag == nullptr) {
      return absl::InvalidArgumentError(
          spec == nullptr
              ? absl::StrCat("unknown flag --", name,
                             " (command flags go after the command)")
              : absl::StrCat("command ", spec->name, " does not take flag --",
                             name));
    }
    std::string flag_value;
    if (value.has_value()) {
      flag_value = std::string(*value);
    } else if (flag->is_bool) {
      flag_value = "true";
    } else if (i + 1 < args.size()) {
      flag_value = args[++i];
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("flag --", name, " needs a value"));
    }
    if (flag->is_bool) {
      ASSIGN_OR_RETURN(bool parsed, ParseBool(flag_value));
      flag_value = parsed ? "true" : "false";
    }
    if (!line.flags.emplace(std::string(name), flag_value).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("flag --", name, " given twice"));
    }
  }
  line.help = line.flags.count("help") != 0 && line.flags.at("help") == "true";
  line.version =
      line.flags.count("version") != 0 && line.flags.at("version") == "true";
  if (line.help || line.version) return line;
  if (spec == nullptr) {
    return absl::InvalidArgumentError("no command given");
  }
  if (static_cast<int>(line.positional.size()) != spec->positional) {
    return absl::InvalidArgumentError(absl::StrCat(
        "command ", spec->name, " takes ", spec->positional,
        spec->positional == 1 ? " argument (a layer id)" : " arguments",
        ", got ", line.positional.size()));
  }
  // Check flag values now, so that every usage error is found before any
  // call is made.
  if (line.command == "create" || line.command == "delete" ||
      line.command == "forward") {
    RETURN_IF_ERROR(MutationOptionsFromFlags(line).status());
  }
  if (line.command == "create") {
    RETURN_IF_ERROR(CreateRequestFromFlags(line).status());
  } else if (line.command == "forward") {
    RETURN_IF_ERROR(ForwardArgsFromFlags(line).status());
  } else if (line.command == "state" && GetFlag(line, "output") == nullptr) {
    return absl::InvalidArgumentError("state needs --output=FILE");
  }
  if (line.flags.count("address") != 0 || line.flags.count("timeout_ms") != 0) {
    RETURN_IF_ERROR(ClientOptionsFromFlags(line).status());
  }
  return line;
}

absl::StatusOr<ClientOptions> ClientOptionsFromFlags(const CommandLine& line) {
  ClientOptions options;
  if (const std::string* address = GetFlag(line, "address")) {
    if (address->empty()) {
      return absl::InvalidArgumentError("--address is empty");
    }
    options.target = *address;
  }
  if (const std::string* text = GetFlag(line, "timeout_ms")) {
    ASSIGN_OR_RETURN(int64_t ms, ParseInt("timeout_ms", *text));
    if (ms <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--timeout_ms must be positive, got ", ms));
    }
    options.timeout = absl::Milliseconds(ms);
  }
  const std::string* ca = GetFlag(line, "tls_ca");
  const std::string* cert = GetFlag(line, "tls_cert");
  const std::string* key = GetFlag(line, "tls_key");
  const std::string* tls = GetFlag(line, "tls");
  bool use_tls = ca != nullptr || cert != nullptr || key != nullptr;
  if (tls != nullptr) {
    ASSIGN_OR_RETURN(bool on, ParseBool(*tls));
    use_tls = use_tls || on;
  }
  if (use_tls) {
    ASSIGN_OR_RETURN(options.credentials,
                     TlsCredentialsFromFiles(ca ? *ca : "", cert ? *cert : "",
                                             key ? *key : ""));
  }
  if (const std::string* token_file = GetFlag(line, "token_file")) {
    ASSIGN_OR_RETURN(options.bearer_token, ReadTokenFile(*token_file));
  }
  return options;
}

absl::StatusOr<MutationOptions> MutationOptionsFromFlags(
    const CommandLine& line) {
  MutationOptions options;
  if (const std::string* id = GetFlag(line, "request_id")) {
    if (id->empty() || id->size() > 128) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--request_id must have 1 to 128 bytes, got ", id->size()));
    }
    options.request_id = *id;
  }
  if (const std::string* version = GetFlag(line, "expected_version")) {
    ASSIGN_OR_RETURN(int64_t value, ParseInt("expected_version", *version));
    if (value < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--expected_version must be a version (>= 0), got ", value));
    }
    options.expected_version = value;
  }
  if (const std::string* retries = GetFlag(line, "retries")) {
    ASSIGN_OR_RETURN(int64_t value, ParseInt("retries", *retries));
    if (value < 0 || value > 100) {
      return absl::InvalidArgumentError(
          absl::StrCat("--retries must be 0 to 100, got ", value));
    }
    options.retries = static_cast<int>(value);
  }
  return options;
}

namespace {

// The create flags each kind takes beside the common ones (id, dtype,
// device, request_id, retries); another kind's flag is an error.
const std::vector<std::pair<std::string, std::vector<std::string>>>&
KindFlags() {
  static const auto* const kKinds =
      new std::vector<std::pair<std::string, std::vector<std::string>>>{
          {"batch_norm",
           {"num_features", "eps", "momentum", "affine", "track_running_stats",
            "layout", "spatial_dims"}},
          {"layer_norm",
           {"normalized_shape", "eps", "elementwise_affine", "bias"}},
          {"rms_norm", {"normalized_shape", "eps", "elementwise_affine"}},
          {"group_norm", {"num_groups", "num_channels", "eps", "affine"}},
          {"instance_norm",
           {"num_features", "eps", "momentum", "affine", "track_running_stats",
            "layout", "spatial_dims"}},
          {"sync_batch_norm",
           {"num_features", "eps", "momentum", "affine", "track_running_stats",
            "layout", "spatial_dims", "world_size", "barrier_timeout_ms"}},
      };
  return *kKinds;
}

absl::Status CheckKindFlags(const CommandLine& line, const std::string& kind) {
  const std::vector<std::string>* allowed = nullptr;
  std::vector<std::string> names;
  for (const auto& [name, flags] : KindFlags()) {
    names.push_back(name);
    if (name == kind) allowed = &flags;
  }
  if (allowed == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kind=", kind, " is unknown; expected ", absl::StrJoin(names, ", ")));
  }
  for (const auto& [name, flags] : KindFlags()) {
    for (const std::string& flag : flags) {
      if (GetFlag(line, flag) != nullptr &&
          std::find(allowed->begin(), allowed->end(), flag) == allowed->end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", flag, " does not apply to --kind=", kind));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> RequiredInt(const CommandLine& line, const char* flag,
                                    const std::string& kind) {
  const std::string* value = GetFlag(line, flag);
  if (value == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("create --kind=", kind, " needs --", flag));
  }
  return ParseInt(flag, *value);
}

// The flags every config has: eps, dtype, device.
template <typename Config>
absl::Status CommonFromFlags(const CommandLine& line, Config& config) {
  if (const std::string* eps = GetFlag(line, "eps")) {
    ASSIGN_OR_RETURN(double value, ParseDouble("eps", *eps));
    config.set_eps(value);
  }
  if (const std::string* dtype = GetFlag(line, "dtype")) {
    ASSIGN_OR_RETURN(v1::DType value, ParseDType(*dtype));
    config.set_dtype(value);
  }
  if (const std::string* device = GetFlag(line, "device")) {
    config.set_device(*device);
  }
  return absl::OkStatus();
}

template <typename Config>
absl::Status RowNormFromFlags(const CommandLine& line, Config& config) {
  const std::string* shape = GetFlag(line, "normalized_shape");
  if (shape == nullptr) {
    return absl::InvalidArgumentError(
        "create --kind=layer_norm|rms_norm needs --normalized_shape, e.g. 768");
  }
  ASSIGN_OR_RETURN(std::vector<int64_t> dims, ParseShape(*shape));
  for (int64_t d : dims) config.add_normalized_shape(d);
  if (const std::string* affine = GetFlag(line, "elementwise_affine")) {
    config.set_elementwise_affine(*affine == "true");
  }
  return CommonFromFlags(line, config);
}

// BatchNorm's and InstanceNorm's flags (num_features required).
template <typename Config>
absl::Status ChannelNormFromFlags(const CommandLine& line,
                                  const std::string& kind, Config& config) {
  ASSIGN_OR_RETURN(int64_t c, RequiredInt(line, "num_features", kind));
  config.set_num_features(c);
  if (const std::string* affine = GetFlag(line, "affine")) {
    config.set_affine(*affine == "true");
  }
  if (const std::string* track = GetFlag(line, "track_running_stats")) {
    config.set_track_running_stats(*track == "true");
  }
  if (const std::string* layout = GetFlag(line, "layout")) {
    ASSIGN_OR_RETURN(v1::Layout value, ParseLayout(*layout));
    config.set_layout(value);
  }
  if (const std::string* dims = GetFlag(line, "spatial_dims")) {
    ASSIGN_OR_RETURN(int64_t value, ParseInt("spatial_dims", *dims));
    config.set_spatial_dims(static_cast<int32_t>(value));
  }
  return CommonFromFlags(line, config);
}

}  // namespace

absl::StatusOr<v1::CreateLayerRequest> CreateRequestFromFlags(
    const CommandLine& line) {
  v1::CreateLayerRequest request;
  const std::string* kind_flag = GetFlag(line, "kind");
  const std::string kind = kind_flag ? *kind_flag : "batch_norm";
  RETURN_IF_ERROR(CheckKindFlags(line, kind));
  if (const std::string* id = GetFlag(line, "id")) request.set_layer_id(*id);
  if (kind == "layer_norm") {
    v1::LayerNormConfig& config = *request.mutable_layer_norm();
    RETURN_IF_ERROR(RowNormFromFlags(line, config));
    if (const std::string* bias = GetFlag(line, "bias")) {
      config.set_bias(*bias == "true");
    }
  } else if (kind == "rms_norm") {
    RETURN_IF_ERROR(RowNormFromFlags(line, *request.mutable_rms_norm()));
  } else if (kind == "group_norm") {
    v1::GroupNormConfig& config = *request.mutable_group_norm();
    ASSIGN_OR_RETURN(int64_t groups, RequiredInt(line, "num_groups", kind));
    ASSIGN_OR_RETURN(int64_t c, RequiredInt(line, "num_channels", kind));
    config.set_num_groups(groups);
    config.set_num_channels(c);
    if (const std::string* affine = GetFlag(line, "affine")) {
      config.set_affine(*affine == "true");
    }
    RETURN_IF_ERROR(CommonFromFlags(line, config));
  } else if (kind == "instance_norm") {
    v1::InstanceNormConfig& config = *request.mutable_instance_norm();
    RETURN_IF_ERROR(ChannelNormFromFlags(line, kind, config));
    if (const std::string* momentum = GetFlag(line, "momentum")) {
      ASSIGN_OR_RETURN(double value, ParseDouble("momentum", *momentum));
      config.set_momentum(value);
    }
  } else {
    v1::BatchNormConfig& config =
        kind == "sync_batch_norm"
            ? *request.mutable_sync_batch_norm()->mutable_batch_norm()
            : *request.mutable_batch_norm();
    if (kind == "sync_batch_norm") {
      v1::SyncBatchNormConfig& sync = *request.mutable_sync_batch_norm();
      ASSIGN_OR_RETURN(int64_t k, RequiredInt(line, "world_size", kind));
      sync.set_world_size(static_cast<int32_t>(k));
      if (const std::string* ms = GetFlag(line, "barrier_timeout_ms")) {
        ASSIGN_OR_RETURN(int64_t value, ParseInt("barrier_timeout_ms", *ms));
        sync.set_barrier_timeout_ms(value);
      }
    }
    RETURN_IF_ERROR(ChannelNormFromFlags(line, kind, config));
    if (const std::string* momentum = GetFlag(line, "momentum")) {
      if (absl::AsciiStrToLower(*momentum) == "none") {
        config.mutable_cumulative_average();
      } else {
        ASSIGN_OR_RETURN(double value, ParseDouble("momentum", *momentum));
        config.set_momentum(value);
      }
    }
  }
  return request;
}

absl::StatusOr<ForwardArgs> ForwardArgsFromFlags(const CommandLine& line) {
  ForwardArgs args;
  args.name = line.positional.at(0);
  const std::string* shape = GetFlag(line, "shape");
  if (shape == nullptr) {
    return absl::InvalidArgumentError("forward needs --shape, e.g. 16,8,12,12");
  }
  ASSIGN_OR_RETURN(args.shape, ParseShape(*shape));
  if (const std::string* seed = GetFlag(line, "seed")) {
    ASSIGN_OR_RETURN(int64_t value, ParseInt("seed", *seed));
    args.seed = static_cast<uint64_t>(value);
  }
  if (const std::string* input = GetFlag(line, "input")) {
    if (GetFlag(line, "seed") != nullptr) {
      return absl::InvalidArgumentError("give --input or --seed, not both");
    }
    args.input_path = *input;
  }
  if (const std::string* output = GetFlag(line, "output")) {
    args.output_path = *output;
  }
  if (const std::string* training = GetFlag(line, "training")) {
    args.training = *training == "true";
  }
  if (const std::string* dtype = GetFlag(line, "dtype")) {
    ASSIGN_OR_RETURN(args.dtype, ParseDType(*dtype));
  }
  if (const std::string* layout = GetFlag(line, "layout")) {
    ASSIGN_OR_RETURN(args.layout, ParseLayout(*layout));
  }
  return args;
}

absl::StatusOr<bool> ParseBool(absl::string_view text) {
  const std::string lower = absl::AsciiStrToLower(text);
  if (lower == "true" || lower == "1" || lower == "yes") return true;
  if (lower == "false" || lower == "0" || lower == "no") return false;
  return absl::InvalidArgumentError(
      absl::StrCat("expected true or false, got '", text, "'"));
}

absl::StatusOr<std::vector<int64_t>> ParseShape(absl::string_view text) {
  std::vector<int64_t> shape;
  for (absl::string_view part : absl::StrSplit(text, absl::ByAnyChar(",x"))) {
    int64_t dim;
    if (!absl::SimpleAtoi(part, &dim) || dim < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad shape '", text,
                       "': expected positive integers such as ", "16,8,12,12"));
    }
    shape.push_back(dim);
  }
  return shape;
}

absl::StatusOr<v1::DType> ParseDType(absl::string_view text) {
  const std::string lower = absl::AsciiStrToLower(text);
  if (lower == "float32" || lower == "f32" || lower == "float") {
    return v1::DTYPE_FLOAT32;
  }
  if (lower == "float16" || lower == "f16" || lower == "half") {
    return v1::DTYPE_FLOAT16;
  }
  if (lower == "bfloat16" || lower == "bf16") return v1::DTYPE_BFLOAT16;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown dtype '", text, "'; expected float32, float16 or bfloat16"));
}

absl::StatusOr<v1::Layout> ParseLayout(absl::string_view text) {
  const std::string lower = absl::AsciiStrToLower(text);
  if (lower == "nchw") return v1::LAYOUT_NCHW;
  if (lower == "nhwc") return v1::LAYOUT_NHWC;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown layout '", text, "'; expected nchw or nhwc"));
}

}  // namespace normserve::client::cli
